"""Benchmark: gpu (run through ``python benchmarks/run.py gpu``)."""

from __future__ import annotations

import argparse

from common import header, write
from memory import REAL_SCALE_CUTS


# --------------------------------------------------------------------------------------------- gpu
def _int4_weight_only(model, group: int = 128) -> tuple[int, float]:
    """Replace every nn.Linear whose input dim is a multiple of ``group`` by a weight-only INT4 module
    (symmetric round-to-nearest, one bf16 scale per ``group`` inputs, two nibbles per byte; the same
    layers and the same byte formula as the planner's INT4 column). Returns the number replaced and the
    relative error of the quantized weights, |W - W_q| / |W| over all of them."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Int4Linear(nn.Module):
        def __init__(self, lin: nn.Linear):
            super().__init__()
            out_f, in_f = lin.weight.shape
            w = lin.weight.detach().float().view(out_f, in_f // group, group)
            scale = (w.abs().amax(-1, keepdim=True) / 7).clamp(min=1e-12)
            q = (torch.clamp(torch.round(w / scale), -8, 7) + 8).to(torch.uint8).view(out_f, in_f)
            self.register_buffer("packed", q[:, 0::2] | (q[:, 1::2] << 4))
            self.squared_error = float(((q.view_as(w).float() - 8) * scale - w).square().sum())
            self.squared_norm = float(w.square().sum())
            self.register_buffer("scale", scale.squeeze(-1).to(torch.bfloat16))
            self.bias = lin.bias
            self.shape = (out_f, in_f)

        def forward(self, x):  # dequantize to bf16, then the ordinary GEMM (PyTorch has no fused INT4 GEMM for large M)
            out_f, in_f = self.shape
            q = torch.stack((self.packed & 15, self.packed >> 4), -1).view(out_f, in_f // group, group)
            w = ((q.to(torch.bfloat16) - 8) * self.scale[..., None]).view(out_f, in_f)
            return F.linear(x, w, self.bias)

    done = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.in_features % group == 0:
                done.append(Int4Linear(child))
                setattr(parent, name, done[-1])
    norm = sum(m.squared_norm for m in done)
    return len(done), (sum(m.squared_error for m in done) / norm) ** 0.5 if norm else 0.0


def gpu(args: argparse.Namespace) -> None:
    """Real-scale SD3 transformer step on a CUDA GPU in PyTorch, random weights: bf16 original vs pruned vs
    pruned with INT4 weight-only linears. Step latency (CUDA events, median) and peak allocated memory."""
    import statistics

    import torch

    from hpedge.compress.plan import Budget, make_plan, parse_blocks
    from hpedge.models import adapters
    from hpedge.models.architectures import ARCHITECTURES, build_on_meta

    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/run.py gpu needs a CUDA GPU (torch.cuda.is_available() is False here)")
    family, _ = ARCHITECTURES[args.arch]
    if family != "sd3":
        raise SystemExit(f"benchmarks/run.py gpu times SD3-family architectures only; {args.arch} is {family}")
    cut = args.cut or {n: c for n, c, _ in REAL_SCALE_CUTS}[args.arch]
    dev = torch.device("cuda")
    torch.manual_seed(0)

    model = build_on_meta(args.arch)
    plan = make_plan(model, Budget(remove_blocks=cut))
    real_buffers = {n: b.clone() for n, b in model.named_buffers() if not b.is_meta}  # e.g. the sin-cos position table
    model = model.to(torch.bfloat16).to_empty(device=dev)  # (in place: no other reference may keep it alive)
    with torch.no_grad():
        for n, p in model.named_parameters():  # random weights, scaled so activations stay finite through every block
            if p.ndim >= 2:
                p.normal_(0.0, p[0].numel() ** -0.5)
            elif "norm" in n and n.endswith("weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
        for n, b in model.named_buffers():
            b.copy_(real_buffers[n]) if n in real_buffers else b.normal_(0.0, 0.02)
    model.eval()
    c = model.config
    side = args.resolution // 8  # VAE latent
    b = args.batch
    inputs = {"hidden_states": torch.randn(b, c.in_channels, side, side, device=dev, dtype=torch.bfloat16),
              "encoder_hidden_states": torch.randn(b, args.text_tokens, c.joint_attention_dim, device=dev, dtype=torch.bfloat16),
              "pooled_projections": torch.randn(b, c.pooled_projection_dim, device=dev, dtype=torch.bfloat16),
              "timestep": torch.full((b,), 500.0, device=dev)}

    def weight_bytes(m) -> int:  # parameters and the INT4 buffers; not the sin-cos position table (a constant)
        return sum(t.numel() * t.element_size() for n, t in (*m.named_parameters(), *m.named_buffers()) if not n.endswith(".pos_embed"))

    table = sum(t.numel() * t.element_size() for n, t in model.named_buffers() if n.endswith(".pos_embed"))

    def run(m) -> dict:
        with torch.inference_mode():
            for _ in range(3):
                m(**inputs, return_dict=False)
            torch.cuda.synchronize()
            if torch.cuda.memory_allocated() > weight_bytes(m) + table + 2**30:  # inputs are a few MB
                raise SystemExit("more than this model is allocated on the GPU (another reference keeps an earlier "
                                 "model alive): the peak column would be wrong")
            torch.cuda.reset_peak_memory_stats()
            ts = []
            for _ in range(args.reps):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                out = m(**inputs, return_dict=False)[0]
                e.record()
                torch.cuda.synchronize()
                ts.append(s.elapsed_time(e))
        if not torch.isfinite(out).all():
            raise SystemExit("non-finite transformer output: the random initialisation is off, no numbers written")
        return {"ms": statistics.median(ts), "spread": (min(ts), max(ts)), "weights": weight_bytes(m),
                "peak": torch.cuda.max_memory_allocated(), "out": out.float()}

    rows = [("original bf16", run(model))]
    pruned, _ = adapters.prune(model, parse_blocks(cut))
    del model
    torch.cuda.empty_cache()
    rows.append(("pruned bf16", run(pruned)))
    n_int4, w_err = _int4_weight_only(pruned)
    torch.cuda.empty_cache()
    rows.append(("pruned, INT4 weight-only", run(pruned)))
    ref = rows[1][1]["out"]
    err = float((rows[2][1]["out"] - ref).norm() / ref.norm())

    name = torch.cuda.get_device_name(dev)
    text = header(f"Real-scale {args.arch} transformer step on {name}, PyTorch, random weights")
    text += (f"- GPU: **{name}** ({torch.cuda.get_device_properties(dev).total_memory / 2**30:.0f} GiB), torch {torch.__version__}, "
             f"CUDA {torch.version.cuda}\n"
             f"- one transformer step at {args.resolution}x{args.resolution} (latent {side}x{side}, {(side // 2) ** 2} image tokens), "
             f"{args.text_tokens} text tokens, batch {b} (a classifier-free-guidance pair); 3 warm-up steps, then the median "
             f"(min-max) of {args.reps} steps timed with CUDA events; peak = torch.cuda.max_memory_allocated during the timed steps "
             "(weights + activations)\n"
             f"- pruned: blocks {cut} removed ({plan.kept_ratio:.1%} of the parameters kept), as `hpedge compress` would cut it; "
             f"random weights (N(0, 1/fan_in)), so the numbers are speed and memory only, not quality\n"
             f"- INT4 weight-only: the {n_int4} linear layers whose input dim is a multiple of 128 hold 4-bit weights (symmetric "
             "round-to-nearest, one bf16 scale per 128 inputs; the planner's INT4 layers) and are dequantized to bf16 for the ordinary "
             "GEMM at every call. PyTorch has no fused INT4 GEMM for this many tokens, so this row shows the memory a weight-only "
             "INT4 transformer needs, not the speed of an INT4 engine (that is TensorRT's job; no TensorRT here). Weight relative "
             f"error {w_err:.3f}; transformer output vs the pruned bf16 output on the same inputs {err:.3f} (random weights, "
             "whose errors compound through the blocks unlike trained ones: a sanity check, not quality; the digits packages' "
             "parity in latency.md is the quality check).\n"
             f"- weights = parameters (and the INT4 weights and scales); the sin-cos position table ({table / 1e9:.2f} GB, a "
             "constant buffer) is in the peak but not in the weights column, as in the planner\n"
             f"- planner (`python benchmarks/run.py memory`): original bf16 {plan.bytes_bf16_before / 1e9:.2f} GB, pruned bf16 "
             f"{plan.bytes_bf16_after / 1e9:.2f} GB, pruned INT4 {plan.bytes_int4_after / 1e9:.2f} GB\n\n")
    text += "| variant | weights on the GPU | peak memory (step) | step latency | latency vs original | peak vs original |\n|---|---|---|---|---|---|\n"
    base = rows[0][1]
    for label, r in rows:
        text += (f"| {label} | {r['weights'] / 1e9:.2f} GB | {r['peak'] / 1e9:.2f} GB | {r['ms']:.1f} ms ({r['spread'][0]:.1f}-"
                 f"{r['spread'][1]:.1f}) | {r['ms'] / base['ms']:.2f}x | {r['peak'] / base['peak']:.2f}x |\n")
    write(args.results_name or f"gpu-{args.arch}.md", text)
