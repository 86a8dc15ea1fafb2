"""Device targets: profiles and their schema (:mod:`~hpedge.targets.profiles`), the shapes an engine covers
(:mod:`~hpedge.targets.shapes`) and a package's device memory (:mod:`~hpedge.targets.footprint`).

Below compress and export, which both size against a target; above models, whose meta-device builds the
footprint measures."""
