"""Per-GPU memory of a distillation step, estimated without weights (``hpedge plan ... --distill``).

The static part is counted from parameter numbers: the frozen teacher in the mixed-precision dtype, the pruned
student (trainable parameters in fp32 master weights, PWP's frozen prefix and embedders in the teacher's dtype),
fp32 gradients and AdamW's two fp32 moments for the trainable parameters, and, under bf16 / fp16 autocast, the
half-precision copies of the trainable weights that autocast keeps for the step.

Activations are not guessed from a formula: the student's forward pass runs on the meta device (shapes only,
no memory, no arithmetic) at the chosen per-GPU batch and resolution, with the same frozen parameters as the
run, and every tensor autograd saves for the backward pass is counted once (by storage). Attention is counted
as a memory-efficient kernel saves it (queries, keys, values, output, log-sum-exp: what flash / memory-
efficient SDPA keep on GPUs and the CPU flash kernel keeps), not as an N x N score matrix. With gradient
checkpointing (diffusers' per-block checkpointing) a block keeps only its inputs, and the largest block is
recomputed during the backward pass. The teacher features the feature loss compares (kept blocks only; under
PWP not the frozen prefix) and the step's batch are added.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hpedge.errors import HpedgeError
from hpedge.models import adapters
from hpedge.models.denoise import Conditioning, family_of, predict
from hpedge.models.families import family as family_facts
from hpedge.models.loading import resolve
from hpedge.models.meta import meta_transformer, text_tokens
from hpedge.models.sampling import defaults_of_ref

BYTES = {"no": 4, "bf16": 2, "fp16": 2}


@dataclass
class DistillMemory:
    batch_per_gpu: int
    height: int
    width: int
    text_tokens: int
    mixed_precision: str
    rows: dict[str, int] = field(default_factory=dict)  # static parts, bytes
    activations: int = 0  # without gradient checkpointing
    activations_checkpointed: int = 0

    def total(self, checkpointing: bool) -> int:
        return sum(self.rows.values()) + (self.activations_checkpointed if checkpointing else self.activations)

    def to_dict(self) -> dict[str, Any]:
        return {"batch_per_gpu": self.batch_per_gpu, "height": self.height, "width": self.width,
                "text_tokens": self.text_tokens, "mixed_precision": self.mixed_precision, "rows": self.rows,
                "activations": self.activations, "activations_checkpointed": self.activations_checkpointed,
                "total": self.total(False), "total_checkpointed": self.total(True)}


def estimate(teacher: Any, remove: list[int], *, batch_per_gpu: int, height: int, width: int, text_tokens: int,
             mixed_precision: str = "bf16", pwp: bool = True, lambda_feat: float = 0.1) -> DistillMemory:
    """The memory of one distillation step on one GPU. ``teacher`` may live on the meta device."""
    import torch

    if mixed_precision not in BYTES:
        raise HpedgeError(f"--mixed-precision must be no, bf16 or fp16, got {mixed_precision!r}")
    patch = int(teacher.config.get("patch_size", 2))
    if height % (8 * patch) or width % (8 * patch):
        raise HpedgeError(f"--resolution must be a multiple of {8 * patch} pixels for this transformer")
    teacher = teacher.to("meta")
    student, kept = adapters.prune(teacher, set(remove))
    first_removed = next((i for i in range(len(kept) + 1) if i >= len(kept) or kept[i] != i), len(kept))
    trainable = _mark_trainable(student, first_removed if pwp else 0)
    half = BYTES[mixed_precision]
    n_teacher = sum(p.numel() for p in teacher.parameters())
    n_student = sum(p.numel() for p in student.parameters())
    m = DistillMemory(batch_per_gpu, height, width, text_tokens, mixed_precision)
    buffers = sum(b.numel() for b in teacher.buffers() if b.is_floating_point())  # shared with the student
    m.rows["teacher (frozen; its buffers shared with the student)"] = half * (n_teacher + buffers)
    # trainable parameters in fp32 master weights; frozen ones (PWP) held in the mixed-precision dtype
    m.rows["student (fp32 trainable, frozen in the teacher's dtype)"] = 4 * trainable + half * (n_student - trainable)
    m.rows["gradients (fp32, trainable)"] = 4 * trainable
    m.rows["AdamW moments (fp32, trainable)"] = 8 * trainable
    if half == 2:
        m.rows["autocast weight copies (trainable)"] = 2 * trainable
    dtype = torch.float32 if half == 4 else torch.bfloat16
    tokens_img = (height // 8 // patch) * (width // 8 // patch)
    dim = _inner_dim(teacher)
    feat_blocks = len(kept) - (first_removed if pwp else 0)
    m.rows["teacher features (feature KD)"] = (half * batch_per_gpu * (tokens_img + text_tokens) * dim * feat_blocks
                                               if lambda_feat > 0 else 0)
    m.rows["batch and conditioning"] = 4 * batch_per_gpu * (
        3 * _latent_channels(teacher) * (height // 8) * (width // 8)
        + text_tokens * int(teacher.config.get("joint_attention_dim", 4096)) + int(teacher.config.get("pooled_projection_dim", 2048)))
    outside, per_block, inputs = _saved_bytes(student, batch_per_gpu, height, width, text_tokens, dtype)
    m.activations = outside + sum(per_block)
    m.activations_checkpointed = outside + sum(inputs) + max(per_block, default=0)
    return m


def _mark_trainable(student: Any, prefix: int) -> int:
    """requires_grad as distill() sets it (PWP: the prefix blocks and the input embedders frozen); returns the
    number of trainable parameters."""

    frozen: set[int] = set()
    for ref in adapters.blocks(student)[:prefix]:
        frozen |= {id(p) for p in ref.module.parameters()}
    embedders = ("pos_embed", "x_embedder", "context_embedder", "time_text_embed")
    n = 0
    for name, p in student.named_parameters():
        train = id(p) not in frozen and not (prefix and name.split(".")[0] in embedders)
        p.requires_grad_(train)
        n += p.numel() if train else 0
    return n


def _inner_dim(tr: Any) -> int:
    c = tr.config
    return int(c["num_attention_heads"]) * int(c["attention_head_dim"])


def _latent_channels(tr: Any) -> int:
    c = tr.config
    return int(c["in_channels"]) // family_facts(family_of(tr)).latent_packing


# Over 80 lines on purpose: one meta-device run whose hooks, dispatch mode and counters share their state.
def _saved_bytes(student: Any, batch: int, height: int, width: int, text_tokens: int, dtype: Any
                 ) -> tuple[int, list[int], list[int]]:
    """Bytes autograd saves in the student's forward pass on the meta device: outside the blocks, per block,
    and each block's inputs (what a checkpointed block keeps)."""
    import torch
    import torch.nn.functional as F

    student = student.to(dtype)
    params = {p.untyped_storage()._cdata for p in student.parameters()}
    seen: set[int] = set()
    current: list[int | None] = [None]
    per_block = [0] * len(adapters.blocks(student))
    inputs = [0] * len(per_block)
    outside = [0]

    def count(t: Any) -> int:
        s = t.untyped_storage()
        key = s._cdata
        if key in params or key in seen:
            return 0
        seen.add(key)
        return int(s.nbytes())

    def pack(t: Any) -> Any:
        b = count(t)
        if current[0] is None:
            outside[0] += b
        else:
            per_block[current[0]] += b
        return t

    def enter(pos: int) -> Any:
        def hook(_m: Any, args: Any, kwargs: Any) -> None:
            current[0] = pos
            inputs[pos] = sum(int(a.untyped_storage().nbytes()) for a in [*args, *kwargs.values()]
                              if torch.is_tensor(a))
        return hook

    def leave(_m: Any, _i: Any, _o: Any) -> None:
        current[0] = None

    handles = []
    for pos, ref in enumerate(adapters.blocks(student)):
        handles.append(ref.module.register_forward_pre_hook(enter(pos), with_kwargs=True))
        handles.append(ref.module.register_forward_hook(leave))

    class _Attention(torch.autograd.Function):
        """Saves what memory-efficient attention saves: q, k, v, the output and the log-sum-exp."""

        @staticmethod
        def forward(ctx: Any, q: Any, k: Any, v: Any) -> Any:
            out = torch.empty_like(q)
            lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
            ctx.save_for_backward(q, k, v, out, lse)
            return out

        @staticmethod
        def backward(ctx: Any, g: Any) -> Any:  # never run (meta); here for completeness
            q, k, v, _, _ = ctx.saved_tensors
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)

    def sdpa(q: Any, k: Any, v: Any, *args: Any, **kwargs: Any) -> Any:
        return _Attention.apply(q, k, v)

    h, w = height // 8, width // 8
    c = _latent_channels(student)
    cfg = student.config
    x = torch.empty(batch, c, h, w, device="meta", dtype=dtype)
    sigma = torch.empty(batch, device="meta", dtype=dtype)
    cond = Conditioning(torch.empty(batch, text_tokens, int(cfg["joint_attention_dim"]), device="meta", dtype=dtype),
                        torch.empty(batch, int(cfg["pooled_projection_dim"]), device="meta", dtype=dtype),
                        torch.empty(text_tokens, 3, device="meta", dtype=dtype) if family_facts(family_of(student)).position_ids else None,
                        3.5 if cfg.get("guidance_embeds") else None)
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = sdpa
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            predict(student, x, sigma, cond)
    finally:
        F.scaled_dot_product_attention = original
        for hd in handles:
            hd.remove()
    # a block that saves nothing (no input or weight needs a gradient: PWP's prefix) keeps no inputs either
    return outside[0], per_block, [i if b else 0 for i, b in zip(inputs, per_block)]


def estimate_for(model: str, remove: list[int], batch: int, processes: int, resolution: int | None,
                 mixed_precision: str, pwp: bool) -> DistillMemory:
    """:func:`estimate` for a model name or folder as ``hpedge plan --distill`` takes it: the global ``batch``
    shared by ``processes`` GPUs, at ``resolution`` (default: the model's) and its text length."""
    if processes < 1 or batch % processes:
        raise HpedgeError(f"--batch-size {batch} must be a multiple of --processes {processes}")
    ref = resolve(model, allow_architecture=True)
    d = defaults_of_ref(ref)
    side = resolution or (d.height if d else 1024)
    tokens = text_tokens(ref.family, d.max_sequence_length if d else 256)
    return estimate(meta_transformer(ref), remove, batch_per_gpu=batch // processes, height=side, width=side,
                    text_tokens=tokens, mixed_precision=mixed_precision, pwp=pwp)
