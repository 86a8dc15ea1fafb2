"""Run an hpedge package: tokenize -> text encoder -> denoising loop -> VAE decode.

Needs only numpy, ``tokenizers`` and ONNX Runtime; a package whose engines were built runs them instead
(``variant="engine"``, chosen by ``auto`` on a GPU that can run them: an RTX card for TensorRT-RTX engines,
the board for Jetson ones), with CuPy for device memory. torch, diffusers and ModelOpt are not imported. The
package's manifest and the sha256 of every file are verified before any compute.

:mod:`~hpedge.runtime.format` is the package format (layout, manifest, hashes, references);
:mod:`~hpedge.runtime.package` the reader and its generation loop; :mod:`~hpedge.runtime.schedule` the noise
schedule; :mod:`~hpedge.runtime.sampler` the prompt-embedding and latent plumbing.
"""

from hpedge.runtime.package import Package, open_package
from hpedge.runtime.schedule import initial_latents, sigmas

__all__ = ["Package", "initial_latents", "open_package", "sigmas"]
