"""The distillation run shared by tests/compress/test_fsdp.py (one process) and fsdp_worker.py (FSDP2, two)."""

from pathlib import Path
from typing import Any

from hpedge.compress.distill import DistillSettings, distill
from hpedge.models import adapters
from hpedge.models.loading import load_pipeline
from hpedge.models.sampling import defaults, with_overrides

REMOVE = {2}
SIZE = 64


def settings(steps: int) -> DistillSettings:
    # SGDistill continuous: every trainable block its own learning rate (param group); PWP freezes blocks 0-1
    return DistillSettings(steps=steps, batch_size=4, pool_size=8, checkpoint_every=2, sgd="continuous", pwp=True)


def run(src: str, work: Path, steps: int, resume: bool = False, procs: Any = None) -> tuple[Any, Any]:
    pipe = load_pipeline(src)
    gen = with_overrides(defaults(pipe, Path(src)), height=SIZE, width=SIZE, steps=2)
    student, kept = adapters.prune(pipe.transformer, REMOVE)
    student.float()
    harm = {b: 0.1 * (b + 1) for b in range(len(kept) + len(REMOVE))}
    prompts = [f"a photo of object number {i}" for i in range(8)]
    student, state, _ = distill(pipe, student, kept, harm, prompts, work, settings(steps), gen, resume=resume,
                                procs=procs)
    return student, state
