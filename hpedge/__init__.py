"""hpedge: HierarchicalPrune compression and edge deployment for SD3/SD3.5 and FLUX pipelines.

Importing this package is cheap: torch, diffusers and the export stack are imported lazily by the
modules that need them.
"""

from hpedge.errors import HpedgeError

__version__ = "0.1.0"
__all__ = ["HpedgeError", "__version__"]
