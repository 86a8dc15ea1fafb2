"""The distillation memory estimate (``hpedge plan --distill``) against a measured peak, side by side in one run.

    python benchmarks/run.py distill-memory [--layers 8] [--resolution 256] [--batch 2] [--steps 3]

A mid-size model on the CPU: an SD3.5 Medium-configured transformer at its real width (1536, 24 heads, dual
attention on the first half of the blocks) and reduced depth, with the tiny fixture's text encoders and VAE.
One block is cut mid-way, so PWP freezes the prefix and the later blocks train. Each configuration (fp32 and
bf16 autocast; with and without gradient checkpointing) runs in its own process: the pipeline is loaded (the
teacher, in the mixed-precision dtype), its resident memory read (VmRSS), then ``distill()`` runs a few steps
while a thread samples VmRSS every 5 ms. measured = peak - that baseline: everything the distillation adds to
the resident teacher (student, gradients, AdamW, activations, features, batches). It is compared with the
estimate's rows less the teacher's; the totals add the teacher's exact bytes to both. The sample pool is made
once beforehand, in a process of its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import ROOT, header, write

CHILD = Path(__file__).resolve()
CONFIGS = [("no", False), ("no", True), ("bf16", False), ("bf16", True)]
NAME = "sd3.5-medium"


def add_parser(sub) -> None:  # type: ignore[no-untyped-def]
    p = sub.add_parser("distill-memory")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)


def _pipeline(folder: Path, layers: int) -> Path:
    """The fixture with its transformer at SD3.5 Medium's width and ``layers`` blocks (random weights)."""
    import torch

    from hpedge.models.architectures import ARCHITECTURES, transformer_class
    from hpedge.testing import tiny_pipeline, tiny_transformer_config
    from hpedge.models.loading import make_stock_loadable

    real = ARCHITECTURES[NAME][1]
    cfg = tiny_transformer_config(NAME)
    cfg.update(num_layers=layers, num_attention_heads=real["num_attention_heads"],
               attention_head_dim=real["attention_head_dim"], caption_projection_dim=real["caption_projection_dim"],
               dual_attention_layers=list(range(layers // 2)))
    torch.manual_seed(0)
    pipe = tiny_pipeline(NAME)
    pipe.transformer = transformer_class("sd3")(**cfg)
    pipe.save_pretrained(folder, safe_serialization=True)
    make_stock_loadable(folder)
    return folder


def _settings(args, mp: str, ckpt: bool, steps: int):  # type: ignore[no-untyped-def]
    from hpedge.compress.distill import DistillSettings

    return DistillSettings(steps=steps, batch_size=args["batch"], pool_size=4, pool_steps=2, checkpoint_every=10**9,
                           sgd="off", pwp=True, mixed_precision=mp, gradient_checkpointing=ckpt)


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def child(args: dict) -> dict:
    import torch

    from hpedge.compress.distill import distill
    from hpedge.models import adapters
    from hpedge.models.loading import TORCH_DTYPES, load_pipeline
    from hpedge.models.sampling import defaults, with_overrides

    torch.set_num_threads(2)
    pipe = load_pipeline(args["src"])
    pipe.to("cpu", TORCH_DTYPES[args["mp"]])
    for p in pipe.transformer.parameters():  # resident (not pages of the mmapped file) before the baseline
        p.data = p.data.clone()
    gen = with_overrides(defaults(pipe, Path(args["src"])), height=args["resolution"], width=args["resolution"])
    prompts = [f"a photo of thing {i}" for i in range(4)]
    s = _settings(args, args["mp"], args["ckpt"], args["steps"])
    import gc

    gc.collect()
    base = _rss()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.005)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.time()
    student, kept = adapters.prune(pipe.transformer, {args["cut"]})
    trained = [base]

    def at_step(what: str, k: int, n: int, _info: dict) -> None:
        if what == "distilling" and k == n:  # the last step is done: what follows is the checkpoint (host memory)
            trained[0] = max(peak[0], _rss())

    distill(pipe, student, kept, None, prompts, Path(args["work"]), s, gen, resume=False, progress=at_step)
    seconds = time.time() - t0
    done.set()
    th.join()
    return {"baseline": base, "peak": trained[0], "measured": trained[0] - base, "seconds": seconds,
            "peak_with_checkpoint": peak[0]}


def distill_memory(args) -> None:  # type: ignore[no-untyped-def]
    from hpedge.compress.memory import estimate
    from hpedge.models.loading import load_transformer

    tmp = Path(tempfile.mkdtemp(prefix="hpedge-distill-memory-"))
    src = _pipeline(tmp / "mid", args.layers)
    cut = args.layers // 2
    common = {"src": str(src), "work": str(tmp / "work"), "resolution": args.resolution, "batch": args.batch,
              "steps": args.steps, "cut": cut}
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{CHILD.parent}"}
    # the sample pool, once, in its own process (its peak is not a training peak)
    subprocess.run([sys.executable, str(CHILD), json.dumps({**common, "mp": "no", "ckpt": False, "steps": 0})],
                   env=env, check=True, capture_output=True)
    tr = load_transformer(str(src))
    params = sum(p.numel() for p in tr.parameters())
    rows = []
    for mp, ckpt in CONFIGS:
        r = subprocess.run([sys.executable, str(CHILD), json.dumps({**common, "mp": mp, "ckpt": ckpt})],
                           env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(r.stderr[-3000:])
        got = json.loads(r.stdout.strip().splitlines()[-1])
        m = estimate(load_transformer(str(src)), [cut], batch_per_gpu=args.batch, height=args.resolution,
                     width=args.resolution, text_tokens=77 + 256, mixed_precision=mp)
        teacher = next(v for k, v in m.rows.items() if k.startswith("teacher (frozen"))
        est = m.total(ckpt) - teacher
        rows.append((mp, ckpt, m, teacher, est, got))
    gib = 2**30
    text = header(f"Distillation memory: `hpedge plan --distill`'s estimate vs a measured peak ({NAME} width, {args.layers} blocks, CPU)")
    text += (f"Transformer: {params / 1e9:.3f} B parameters (SD3.5 Medium's width 1536, {args.layers} blocks, dual attention in "
             f"blocks 0-{args.layers // 2 - 1}), block {cut} removed (PWP freezes blocks 0-{cut - 1}); {args.resolution} px, "
             f"batch {args.batch}, 77 + 256 text tokens, {args.steps} steps; tiny text encoders and VAE. " + __doc__.split("\n\n")[2]
             .replace("\n", " ") + "\n\n")
    text += ("| precision | gradient checkpointing | estimate, without teacher | measured peak - baseline | estimate / measured | "
             "total estimate | total measured (+ teacher) | s |\n|---|---|---|---|---|---|---|---|\n")
    worst = 0.0
    for mp, ckpt, m, teacher, est, got in rows:
        ratio = est / got["measured"]
        worst = max(worst, abs(ratio - 1))
        text += (f"| {mp} | {'yes' if ckpt else 'no'} | {est / gib:.3f} GiB | {got['measured'] / gib:.3f} GiB | {ratio:.2f} | "
                 f"{(est + teacher) / gib:.3f} GiB | {(got['measured'] + teacher) / gib:.3f} GiB | {got['seconds']:.0f} |\n")
    text += f"\nLargest deviation of the estimate (without the teacher) from the measured peak: {worst:.0%} (target: within 20 %).\n\n"
    text += "Estimate rows (bf16, checkpointing):\n\n| row | GiB |\n|---|---|\n"
    m = rows[3][2]
    for k, v in m.rows.items():
        text += f"| {k} | {v / gib:.3f} |\n"
    text += f"| activations (checkpointed) | {m.activations_checkpointed / gib:.3f} |\n| activations (not checkpointed) | {m.activations / gib:.3f} |\n"
    write("distill-memory.md", text)


if __name__ == "__main__":
    print(json.dumps(child(json.loads(sys.argv[1]))))
