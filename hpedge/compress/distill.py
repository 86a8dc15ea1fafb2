"""Knowledge distillation of the pruned student from the original teacher, on Hugging Face Accelerate.

* Positional Weight Preservation (PWP): every kept block before the first removed position, and the
  input embedders, are frozen. On unless given (``resolve_pwp``), except for a cut that leaves no kept block
  after the first removed position (PWP would freeze them all): distilled without PWP, said and recorded.
* Sensitivity-Guided Distillation (SGDistill): each trainable block gets an update weight (a learning
  rate multiplier) that decreases with its sensitivity. Sensitivity is the block's harm in the
  contribution analysis (how much removing it distorts the original model's output), divided by the
  largest block harm of the whole model: s in [0, 1] (negative harm counts as 0), and the weight is
  ``w = w_min + (1 - w_min) * (1 - s)`` (continuous, default). Normalising by the whole model, not
  min-max over the trainable blocks, keeps a block's weight a function of its own sensitivity: with
  min-max the most sensitive trainable block always sat at ``w_min``, however mildly sensitive it
  was. ``binary`` reproduces the reference's rule: 0 for the more sensitive half of the trainable
  blocks and 1 for the rest.
* Loss: lambda_out * weighted MSE(student output, teacher output) + lambda_feat * mean over kept
  blocks of MSE(student block k, teacher block kept[k]) / Var(teacher block), both streams; SD3-style
  logit-normal timestep sampling and ``compute_loss_weighting_for_sd3`` weighting.
* Data-free by default: x0 are the teacher's own samples for the calibration prompts; a folder of
  images with same-named ``.txt`` captions may be given instead.
* Data parallel over the processes of a launch (DDP, FSDP, DeepSpeed; see ``distill``); checkpoints every N
  steps are ``accelerator.save_state`` folders (the model as safetensors; Accelerate pickles the optimizer
  and RNG states with torch.save and reads them with ``weights_only=True``) plus a JSON state; ``resume``
  continues from the newest complete one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

from hpedge.compress.pool import _pool
from hpedge.compress.processes import Processes
from hpedge.compress.pwp import resolve_pwp, update_weights
from hpedge.compress.settings import DistillSettings
from hpedge.compress.sparsity import keep_masked
from hpedge.errors import HpedgeError
from hpedge.models import adapters
from hpedge.models.denoise import Conditioning, encode, predict
from hpedge.models.sampling import Defaults


@dataclass
class TrainState:
    step: int = 0
    losses: list[list[float]] = field(default_factory=list)  # [step, total, out, feat], means over the ranks
    seconds: float = 0.0
    resumed_from: int | None = None  # the checkpoint step a resumed run continued from


class _Capture:
    """Forward hooks recording the (context, image) outputs of the blocks at ``positions`` (all if None)."""

    def __init__(self, transformer: Any, positions: set[int] | None = None) -> None:
        self.out: dict[int, tuple[Any, Any]] = {}
        self.handles = []
        for pos, ref in enumerate(adapters.blocks(transformer)):
            if positions is None or pos in positions:
                self.handles.append(ref.module.register_forward_hook(self._hook(pos)))

    def _hook(self, pos: int) -> Callable[..., None]:
        def fn(_m: Any, _i: Any, out: Any) -> None:
            self.out[pos] = out

        return fn

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _returning(outputs: dict[int, tuple[Any, Any]], block: int) -> Callable[..., tuple[Any, Any]]:
    def forward(*_args: Any, **_kwargs: Any) -> tuple[Any, Any]:
        return outputs[block]

    return forward


@contextmanager
def _replaying(student: Any, prefix: int, kept: list[int], teacher_out: dict[int, tuple[Any, Any]]) -> Iterator[None]:
    """Under PWP the student's first ``prefix`` blocks are the teacher's blocks 0..prefix-1, frozen, after frozen
    embedders: their outputs equal the teacher's bit for bit. For one forward pass each of them is replaced by
    a module that returns the teacher's captured output, so the frozen prefix is not recomputed."""
    import torch

    refs = adapters.blocks(student)[:prefix]
    saved = []
    for ref in refs:
        holder = student.single_transformer_blocks if ref.kind == "single" else student.transformer_blocks
        replay = torch.nn.Module()
        replay.forward = _returning(teacher_out, kept[ref.index])  # type: ignore[method-assign]
        saved.append((holder, str(ref.local), holder._modules[str(ref.local)]))
        holder._modules[str(ref.local)] = replay
    try:
        yield
    finally:
        for holder, key, module in saved:
            holder._modules[key] = module


def _global_variances(procs: Processes, tensors: list[Any]) -> Any:
    """The variance of each teacher feature over the GLOBAL batch (sums and sums of squares added over the
    ranks), so that the feature loss of a slice, averaged over the ranks, equals a single-process run's."""
    import torch

    stats = torch.stack([torch.stack([t.double().sum(), (t.double() ** 2).sum(),
                                      torch.tensor(float(t.numel()), dtype=torch.float64, device=t.device)])
                         for t in tensors])
    if procs.world > 1:
        stats = procs.accelerator.reduce(stats, reduction="sum")
    s1, s2, n = stats[:, 0], stats[:, 1], stats[:, 2]
    return ((s2 - s1 * s1 / n) / (n - 1)).float()


def _save_checkpoint(procs: Processes, ckdir: Path, state: TrainState, keep: int) -> None:
    """``accelerator.save_state`` (model as safetensors; optimizer, every rank's RNG and, under FSDP /
    DeepSpeed, each rank's shards as Accelerate writes them) into a temporary folder that the main process
    renames once every rank has written, so a killed rank never leaves a half-written checkpoint."""
    final = ckdir / f"step-{state.step:07d}"
    tmp = ckdir / f".step-{state.step:07d}.tmp"
    if procs.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    procs.barrier()
    procs.accelerator.save_state(str(tmp), safe_serialization=True)
    procs.barrier()
    if procs.is_main:
        (tmp / "state.json").write_text(json.dumps({**asdict(state), "processes": procs.world}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted(ckdir.glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    procs.barrier()


def latest_checkpoint(ckdir: Path) -> Path | None:
    found = sorted(p for p in ckdir.glob("step-*") if (p / "state.json").exists()) if ckdir.exists() else []
    return found[-1] if found else None


def _load_checkpoint(procs: Processes, path: Path) -> TrainState:
    from safetensors import SafetensorError

    try:
        saved = json.loads((path / "state.json").read_text())
        if saved.pop("processes", procs.world) != procs.world and procs.kind in ("fsdp", "deepspeed"):
            raise ValueError("sharded by a different number of processes")
        procs.accelerator.load_state(str(path))
        state = TrainState(**saved)
    except (SafetensorError, OSError, RuntimeError, ValueError, KeyError, TypeError) as e:
        raise HpedgeError(f"checkpoint {path} cannot be resumed ({str(e).splitlines()[0][:160]}); "
                          "delete it to resume from an earlier one") from None
    return state


def _step_draws(s: DistillSettings, step: int, n: int, shape: tuple[int, ...]) -> tuple[Any, Any, Any]:
    """The global batch of one step: pool indices, sigmas and noise, drawn from a generator seeded by
    (seed, step) on the CPU. Every rank draws the same global batch and takes its slice, so the global batch
    equals a single-process run's, and a resumed run draws the same batches without restoring any RNG."""
    import torch
    from diffusers.training_utils import compute_density_for_timestep_sampling

    g = torch.Generator().manual_seed(s.seed * 1_000_003 + 7 * step + 1)
    idx = torch.randint(n, (s.batch_size,), generator=g)
    u = compute_density_for_timestep_sampling(s.weighting, s.batch_size, logit_mean=0.0, logit_std=1.0,
                                              mode_scale=1.29, generator=g)
    noise = torch.randn((s.batch_size, *shape), generator=g)
    return idx, u.float(), noise


# Over 80 lines on purpose: one training loop whose Accelerate-prepared model, optimizer, pool shard, RNG draws
# and checkpoint state live together; split, each piece would take and return most of them.
def distill(teacher_pipe: Any, student: Any, kept: list[int], harm: dict[int, float] | None, prompts: list[str],
            work: Path, s: DistillSettings, gen: Defaults, resume: bool,
            progress: Callable[[str, int, int, dict[str, float]], None] | None = None,
            procs: Processes | None = None, masks: dict[str, Any] | None = None,
            student_text: dict[str, Any] | None = None) -> tuple[Any, TrainState, dict[int, float]]:
    """Train ``student`` (pruned, kept[k] = teacher index of student block k). Returns (student, state, weights).

    ``masks`` (weight sparsity, :mod:`hpedge.compress.sparsity`: layer name -> True where a weight stays): pruned
    weights get no gradient and are zeroed again after every step, so they stay exactly zero. ``student_text``
    (pruned text encoders by pipeline attribute): the student is conditioned on their prompt embeddings, the teacher
    on its own encoders' (the student learns to make up for both).

    Data parallel over ``procs`` (one process when None): each step's global batch of ``batch_size`` is drawn
    identically on every rank (``_step_draws``) and each rank trains on its slice, so the optimisation equals a
    single-process run's up to the ranks' feature-loss normalisation (per-slice variance). The student is
    wrapped as the launch configuration says (DDP, FSDP, DeepSpeed); hooks, the PWP replay and the family's
    forward arguments use the unwrapped module. Text encoders and VAE leave the accelerator while training."""
    import torch
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    procs = procs or Processes.start(s.mixed_precision)
    accelerator = procs.accelerator
    if masks and procs.kind in ("fsdp", "deepspeed"):
        raise HpedgeError(f"weight sparsity keeps its masks on whole parameters: distil it on one process or with DDP, "
                          f"not {procs.kind}")
    if s.batch_size % procs.world:
        raise HpedgeError(f"--batch-size {s.batch_size} is the global batch: it must be a multiple of the "
                          f"{procs.world} processes")
    local = s.batch_size // procs.world
    lo, hi = procs.rank * local, (procs.rank + 1) * local
    torch.manual_seed(s.seed + procs.rank)
    teacher = teacher_pipe.transformer
    teacher.requires_grad_(False).eval()
    first_removed = next((i for i in range(len(kept) + 1) if i >= len(kept) or kept[i] != i), len(kept))
    if s.pwp is None:  # hpedge's default, as `hpedge compress` resolves it before calling
        n = len(adapters.blocks(teacher))
        s = replace(s, pwp=resolve_pwp(sorted(set(range(n)) - set(kept)), n, s)[0])
    weights = update_weights(kept, first_removed, harm, s)

    # pool of x0 (split across ranks) and the frozen text conditioning (kept on the CPU, a batch at a time moved)
    if procs.is_main:
        work.mkdir(parents=True, exist_ok=True)
    procs.barrier()
    x0_pool, texts = _pool(procs, work, teacher_pipe, prompts, s, gen,
                           (lambda k, n: progress("teacher samples", k, n, {"loss": float("nan")}))
                           if progress and procs.is_main else None)
    guidance = gen.guidance if gen.guidance_kind == "distilled" else None
    with torch.no_grad():
        cond_all = _on_cpu(encode(teacher_pipe, texts, gen.max_sequence_length, guidance), procs.device)
        cond_s_all = cond_all
        if student_text:
            with _encoders(teacher_pipe, student_text):
                cond_s_all = _on_cpu(encode(teacher_pipe, texts, gen.max_sequence_length, guidance), procs.device)
    offloaded = _offload_all_but_transformer(teacher_pipe)

    # parameter groups: frozen (PWP), per-block learning rates (SGDistill), the rest at full rate
    student.train()
    if s.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    groups: list[dict[str, Any]] = []
    in_blocks: set[int] = set()
    for pos, ref in enumerate(adapters.blocks(student)):
        ps = list(ref.module.parameters())
        in_blocks |= {id(p) for p in ps}
        w = weights[kept[pos]]
        for p in ps:
            p.requires_grad_(w > 0)
        if w > 0:
            groups.append({"params": ps, "lr": s.lr * w, "block": kept[pos]})
    embedders = ("pos_embed", "x_embedder", "context_embedder", "time_text_embed")
    rest = []
    for name, p in student.named_parameters():
        if id(p) in in_blocks:
            continue
        frozen = s.pwp and name.split(".")[0] in embedders
        p.requires_grad_(not frozen)
        if not frozen:
            rest.append(p)
    if rest:
        groups.append({"params": rest, "lr": s.lr, "block": -1})
    if not groups:
        raise HpedgeError("nothing to train: every kept block is frozen (PWP/SGDistill); remove later blocks or pass --no-pwp")
    # trainable parameters in fp32 master weights; frozen ones (PWP's prefix and embedders) need no fp32 copy and
    # stay in the teacher's dtype (they are its copies), converted one by one (no full fp32 student at any time);
    # buffers are the teacher's own (adapters.prune shares them). Sharded wrappers (FSDP, DeepSpeed) get fp32 throughout: they keep one dtype per parameter group.
    keep = teacher.dtype if procs.kind not in ("fsdp", "deepspeed") else torch.float32
    for p in student.parameters():
        p.data = p.data.float() if p.requires_grad else p.data.to(keep)
    opt = torch.optim.AdamW(groups, lr=s.lr, weight_decay=0.0)
    teacher.to(procs.device)
    if procs.kind == "deepspeed":  # there is no DataLoader to take the micro-batch from
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = local
    student, opt = accelerator.prepare(student, opt)
    ckdir = work / "checkpoints"
    state = TrainState()
    if not resume and procs.is_main:
        shutil.rmtree(ckdir, ignore_errors=True)  # a run that does not resume starts over
    procs.barrier()
    if resume:
        last = latest_checkpoint(ckdir)
        if last is not None:
            state = _load_checkpoint(procs, last)
            state.resumed_from = state.step
    unwrapped = accelerator.unwrap_model(student)
    kept_weights = keep_masked(unwrapped, masks) if masks else []
    # feature KD looks at the kept blocks only; under PWP, not at the frozen prefix (its terms are exactly 0)
    prefix = first_removed if s.pwp else 0
    replay = prefix if s.replay_frozen_prefix else 0
    t_cap = _Capture(teacher, positions=set(kept))
    s_cap = _Capture(unwrapped, positions=set(range(replay, len(kept))))
    t0 = time.time() - state.seconds
    n = x0_pool.shape[0]
    trainable_params = [p for g in opt.param_groups for p in g["params"]]
    try:
        while state.step < s.steps:
            idx, sigma, noise = _step_draws(s, state.step, n, tuple(x0_pool.shape[1:]))
            idx, sigma, noise = idx[lo:hi], sigma[lo:hi].to(procs.device), noise[lo:hi].to(procs.device)
            x0 = x0_pool[idx].to(procs.device)
            cond, cond_s = (Conditioning(c.prompt_embeds[idx].to(procs.device), c.pooled[idx].to(procs.device),
                                         c.text_ids, c.guidance) for c in (cond_all, cond_s_all))
            w = compute_loss_weighting_for_sd3(s.weighting, sigmas=sigma).float()
            sb = sigma[:, None, None, None]
            xt = (1 - sb) * x0 + sb * noise
            with torch.no_grad(), accelerator.autocast():
                t_out = predict(teacher, xt.to(teacher.dtype), sigma, cond)
            with accelerator.autocast(), _replaying(unwrapped, replay, kept, t_cap.out):
                s_out = predict(unwrapped, xt, sigma, cond_s, module=student)
            l_out = (w[:, None, None, None] * (s_out.float() - t_out.float()) ** 2).mean()
            l_feat = torch.zeros((), device=x0.device)
            if s.lambda_feat > 0:
                pairs = []
                for pos, orig in enumerate(kept):
                    if pos < prefix:
                        continue
                    s_ctx, s_img = s_cap.out[pos]
                    t_ctx, t_img = t_cap.out[orig]
                    pairs.append((s_img, t_img))
                    if s_ctx is not None and t_ctx is not None:
                        pairs.append((s_ctx, t_ctx))
                var = _global_variances(procs, [t for _, t in pairs])
                l_feat = torch.stack([((a.float() - b.float()) ** 2).mean() / (v + 1e-6)
                                      for (a, b), v in zip(pairs, var)]).mean()
            loss = s.lambda_out * l_out + s.lambda_feat * l_feat
            if not math.isfinite(float(loss.detach())):
                raise HpedgeError(f"distillation diverged at step {state.step} (loss {float(loss.detach())}); lower --lr")
            opt.zero_grad()
            accelerator.backward(loss)
            for p, keep in kept_weights:  # a pruned weight gets no update (AdamW's moments of it stay 0)
                if p.grad is not None:
                    p.grad.mul_(keep)
            accelerator.clip_grad_norm_(trainable_params, 1.0)
            opt.step()
            with torch.no_grad():
                for p, keep in kept_weights:
                    p.mul_(keep)
            state.step += 1
            state.seconds = time.time() - t0
            log = state.step % 10 == 0 or state.step == s.steps
            if log or progress:
                loss_value, out_value, feat_value = (procs.mean(float(v.detach())) for v in (loss, l_out, l_feat))
                if log:
                    state.losses.append([state.step, loss_value, out_value, feat_value])
                if progress and procs.is_main:
                    progress("distilling", state.step, s.steps, {"loss": loss_value})
            if state.step % s.checkpoint_every == 0 or state.step == s.steps:
                _save_checkpoint(procs, ckdir, state, s.keep_checkpoints)
    finally:
        t_cap.close()
        s_cap.close()
    procs.barrier()
    student = _gathered(procs, student, unwrapped) if procs.kind in ("fsdp", "deepspeed") else unwrapped
    student.eval()
    student.requires_grad_(False)
    if s.gradient_checkpointing:
        student.disable_gradient_checkpointing()
    _restore(offloaded)
    return student, state, weights


def _gathered(procs: Processes, wrapped: Any, unwrapped: Any) -> Any:
    """After sharded training (FSDP, DeepSpeed ZeRO-3) the main process's full student: the gathered state dict
    (a collective: every rank calls it) loaded into a fresh module of the pruned student's configuration."""
    from accelerate import init_empty_weights

    full = procs.accelerator.get_state_dict(wrapped)
    if not procs.is_main:
        return unwrapped  # not used: the main process evaluates and writes OUT
    with init_empty_weights():
        plain = type(unwrapped).from_config(unwrapped.config)
    plain.load_state_dict({k: v.detach().cpu().float() for k, v in full.items()}, strict=True, assign=True)
    return plain


def _on_cpu(c: Conditioning, device: Any) -> Conditioning:
    """Prompt embeddings kept on the CPU (a batch at a time moved), text ids on the training device."""
    return Conditioning(c.prompt_embeds.cpu(), c.pooled.cpu(), None if c.text_ids is None else c.text_ids.to(device),
                        c.guidance)


@contextmanager
def _encoders(pipe: Any, text: dict[str, Any]) -> Iterator[None]:
    """``pipe`` encoding with the text encoders ``text`` (by attribute) in place of its own."""
    kept = {a: getattr(pipe, a) for a in text}
    for a, m in text.items():
        setattr(pipe, a, m.to(kept[a].device))
    try:
        yield
    finally:
        for a, m in kept.items():
            setattr(pipe, a, m)


def _offload_all_but_transformer(pipe: Any) -> list[tuple[Any, Any]]:
    """Move text encoders and VAE to the CPU while training (on an accelerator they only cost memory then)."""
    moved = []
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
        m = getattr(pipe, name, None)
        if m is not None and m.device.type != "cpu":
            moved.append((m, m.device))
            m.to("cpu")
    return moved


def _restore(moved: list[tuple[Any, Any]]) -> None:
    for m, device in moved:
        m.to(device)
