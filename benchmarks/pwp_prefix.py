"""PWP's frozen prefix replayed from the teacher vs recomputed, side by side in one run.

    python benchmarks/run.py pwp-prefix [--steps 20] [--reps 2]

On zoo:digits-sd3 with the README cut (blocks 6, 9, 10 removed; PWP freezes kept blocks 0-5): the same
distillation (same pool, seeds, batches) with ``replay_frozen_prefix`` on and off, alternating, so both see
the same machine state. Prints seconds per step, their ratio and the largest relative loss difference.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from common import header, write

CUT = [6, 9, 10]


def add_parser(sub) -> None:  # type: ignore[no-untyped-def]
    p = sub.add_parser("pwp-prefix")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)


def pwp_prefix(args) -> None:  # type: ignore[no-untyped-def]
    from hpedge.compress.distill import DistillSettings, distill
    from hpedge.models import adapters
    from hpedge.models.loading import load_pipeline, resolve
    from hpedge.models.sampling import defaults

    ref = resolve("zoo:digits-sd3")
    pipe = load_pipeline(ref)
    gen = defaults(pipe, ref.path)
    prompts = [f"a {d} on the left" for d in range(10)] * 4
    work = Path(tempfile.mkdtemp(prefix="pwp-prefix-"))
    student, kept = adapters.prune(pipe.transformer, CUT)  # builds the shared sample pool outside the timed runs
    distill(pipe, student, kept, None, prompts, work / "shared", DistillSettings(steps=0, pool_size=32, sgd="off", pwp=True), gen,
            resume=False)
    seconds: dict[bool, list[float]] = {True: [], False: []}
    losses: dict[bool, list[list[float]]] = {}
    for rep in range(args.reps):
        for replay in (True, False) if rep % 2 == 0 else (False, True):
            student, kept = adapters.prune(pipe.transformer, CUT)
            s = DistillSettings(steps=args.steps, batch_size=args.batch_size, pool_size=32, checkpoint_every=10**9,
                                sgd="off", pwp=True, replay_frozen_prefix=replay)
            t0 = time.perf_counter()
            _, state, _ = distill(pipe, student, kept, None, prompts, work / "shared", s, gen, resume=False)
            seconds[replay].append((time.perf_counter() - t0) / args.steps)
            losses[replay] = state.losses
            for ck in (work / "shared" / "checkpoints").glob("step-*"):  # the pool is shared, the checkpoints not
                import shutil

                shutil.rmtree(ck)
    diff = max(abs(a - b) / max(abs(b), 1e-12) for la, lb in zip(losses[True], losses[False]) for a, b in zip(la[1:], lb[1:]))
    best = {k: min(v) for k, v in seconds.items()}
    text = header("PWP prefix: replayed from the teacher vs recomputed (zoo:digits-sd3, cut 6, 9, 10)")
    text += (f"{args.steps} distillation steps per run, batch {args.batch_size}, {args.reps} runs of each mode alternating; "
             "the same pool (built before the timed runs), seeds and batches. Kept blocks 0-5 are frozen by PWP.\n\n"
             "| frozen prefix | s / step (best of runs) | all runs | vs recomputed |\n|---|---|---|---|\n"
             f"| recomputed | {best[False]:.3f} | {', '.join(f'{x:.3f}' for x in seconds[False])} | 1.00x |\n"
             f"| replayed | {best[True]:.3f} | {', '.join(f'{x:.3f}' for x in seconds[True])} | {best[True] / best[False]:.2f}x |\n\n"
             f"Largest relative difference of the recorded losses (total, output, feature) between the modes: {diff:.2e}.\n\n"
             "| step | total (replayed) | total (recomputed) | output | feature |\n|---|---|---|---|---|\n")
    for la, lb in zip(losses[True], losses[False]):
        text += f"| {int(la[0])} | {la[1]:.6f} | {lb[1]:.6f} | {la[2]:.6f} / {lb[2]:.6f} | {la[3]:.6f} / {lb[3]:.6f} |\n"
    write("pwp-prefix.md", text)
