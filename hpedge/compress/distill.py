"""Knowledge distillation of the pruned student from the original teacher, on Hugging Face Accelerate.

* Positional Weight Preservation (PWP): every kept block before the first removed position, and the
  input embedders, are frozen.
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
* Checkpoints (safetensors + JSON, no pickle) every N steps; ``resume`` continues from the newest.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from hpedge.errors import HpedgeError
from hpedge.models import adapters
from hpedge.models.denoise import Conditioning, encode, predict
from hpedge.models.sampling import Defaults


@dataclass
class DistillSettings:
    steps: int = 600
    batch_size: int = 16
    lr: float = 3e-4
    lambda_out: float = 1.0
    lambda_feat: float = 0.1
    weighting: str = "logit_normal"  # SD3 density / weighting scheme
    sgd: str = "continuous"  # continuous | binary | off
    sgd_min_weight: float = 0.1
    pwp: bool = True
    pool_size: int = 256
    pool_steps: int | None = None  # None: the model's default steps
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    seed: int = 0
    mixed_precision: str = "no"  # no | bf16 | fp16
    gradient_checkpointing: bool = False
    data_dir: str | None = None
    replay_frozen_prefix: bool = True  # under PWP: feed the student the teacher's prefix outputs (see _replaying)


@dataclass
class TrainState:
    step: int = 0
    losses: list[list[float]] = field(default_factory=list)  # [step, total, out, feat]
    seconds: float = 0.0


def check_pwp_leaves_a_block(remove: list[int], num_blocks: int, s: DistillSettings) -> None:
    """Refuse a distillation in which PWP would freeze every kept block.

    PWP freezes each kept block before the first removed position. When the cut is the last blocks of the
    model (HPP's choice whenever the final blocks matter least), no kept block sits after it, and only the
    output layers (norm_out, proj_out) would be distilled: the run would cost its full time for a student
    that is the truncated teacher with a retuned output head. Said as one error instead of done silently.
    """
    if not s.pwp or s.steps == 0 or not remove:
        return
    if sorted(remove) == list(range(min(remove), num_blocks)):
        raise HpedgeError(
            f"PWP would freeze every kept block: the cut removes the last {len(remove)} blocks ({min(remove)}-{num_blocks - 1}), "
            "so no kept block sits after the first removed position and only the output layers would be distilled; "
            "pass --no-pwp (SGDistill still scales each block's updates by its sensitivity) or choose a cut that keeps a "
            "later block (--remove-blocks); with the same OUT add --resume to reuse the contribution analysis")


def update_weights(kept: list[int], first_removed: int, harm: dict[int, float] | None, s: DistillSettings
                   ) -> dict[int, float]:
    """Per kept block (original index): its update weight in [0, 1] (0 = frozen)."""
    weights = {b: 1.0 for b in kept}
    if s.pwp:
        for b in kept:
            if b < first_removed:
                weights[b] = 0.0
    trainable = [b for b in kept if weights[b] > 0]
    if s.sgd == "off" or not trainable:
        return weights
    if harm is None:
        raise HpedgeError("SGDistill needs block sensitivities: provide an importance table or pass --sgd off")
    vals = np.array([harm.get(b, 0.0) for b in trainable])
    if s.sgd == "continuous":
        scale = max([*harm.values(), 0.0])  # the model's largest block harm
        norm = np.clip(vals / scale, 0.0, 1.0) if scale > 0 else np.zeros_like(vals)
        for b, v in zip(trainable, norm):
            weights[b] = s.sgd_min_weight + (1 - s.sgd_min_weight) * (1 - float(v))
    elif s.sgd == "binary":
        order = np.argsort(-vals)
        for rank, j in enumerate(order):
            weights[trainable[j]] = 0.0 if rank < len(trainable) // 2 else 1.0
    else:
        raise HpedgeError(f"unknown --sgd mode {s.sgd!r} (continuous, binary, off)")
    return weights


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


def _rel_mse(a: Any, b: Any) -> Any:
    return ((a.float() - b.float()) ** 2).mean() / (b.float().var() + 1e-6)


def build_pool(pipe: Any, prompts: list[str], s: DistillSettings, gen: Defaults,
               progress: Callable[[int], None] | None = None) -> tuple[Any, list[str]]:
    """x0 latents (N, C, h, w) in the transformer's normalised space: the teacher's own samples at the
    sampling defaults ``gen`` (its guidance, T5 length, size; ``pool_steps`` if set), or a folder."""
    import torch

    from hpedge.models.sampling import sample, with_overrides

    if s.data_dir:
        return _pool_from_folder(pipe, Path(s.data_dir), gen.height, gen.width)
    d = with_overrides(gen, steps=s.pool_steps)
    out = []
    bs = max(1, min(32, (32 * 256 * 256) // (d.height * d.width)))  # 32 samples at 256 px, 2 at 1024 px
    for i in range(0, len(prompts), bs):
        chunk = prompts[i : i + bs]
        seeds = [s.seed * 1_000_003 + i + j for j in range(len(chunk))]
        out.append(sample(pipe, chunk, d, seeds=seeds, output="latent"))
        if progress:
            progress(len(chunk))
    return torch.cat(out), prompts


def _pool_from_folder(pipe: Any, folder: Path, height: int, width: int) -> tuple[Any, list[str]]:
    import torch
    from PIL import Image

    if not folder.is_dir():
        raise HpedgeError(f"--data {folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp"})
    pairs = [(p, p.with_suffix(".txt")) for p in files if p.with_suffix(".txt").exists()]
    if not pairs:
        raise HpedgeError(f"--data {folder} has no images with same-named .txt captions")
    channels = pipe.vae.config.in_channels
    xs, caps = [], []
    for img_path, cap in pairs:
        img = Image.open(img_path).convert("L" if channels == 1 else "RGB").resize((width, height))
        a = np.asarray(img, dtype=np.float32) / 127.5 - 1
        xs.append(a[None] if channels == 1 else a.transpose(2, 0, 1))
        caps.append(cap.read_text().strip())
    x = torch.from_numpy(np.stack(xs))
    with torch.no_grad():
        z = pipe.vae.encode(x.to(pipe.vae.device, pipe.vae.dtype)).latent_dist.sample()
    shift = pipe.vae.config.shift_factor or 0.0
    return ((z - shift) * pipe.vae.config.scaling_factor).float().cpu(), caps


def _save_checkpoint(ckdir: Path, student: Any, opt: Any, state: TrainState, keep: int) -> None:
    import torch
    from safetensors.torch import save_file

    final = ckdir / f"step-{state.step:07d}"
    tmp = ckdir / f".step-{state.step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in student.state_dict().items()}, str(tmp / "student.safetensors"))
    tensors: dict[str, Any] = {}
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        for k, v in opt.state.get(p, {}).items():
            if torch.is_tensor(v):
                tensors[f"{i}.{k}"] = v.detach().contiguous().cpu().reshape(v.shape)
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps(asdict(state)))
    os.replace(tmp, final)
    for old in sorted(ckdir.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(ckdir: Path) -> Path | None:
    found = sorted(ckdir.glob("step-*")) if ckdir.exists() else []
    return found[-1] if found else None


def _load_checkpoint(path: Path, student: Any, opt: Any) -> TrainState:
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        student.load_state_dict(load_file(str(path / "student.safetensors")))
        tensors = load_file(str(path / "optimizer.safetensors"))
        state = TrainState(**json.loads((path / "state.json").read_text()))
    except (SafetensorError, OSError, RuntimeError, ValueError, KeyError, TypeError) as e:
        raise HpedgeError(f"checkpoint {path} is corrupt or incomplete ({str(e).splitlines()[0][:120]}); "
                          "delete it to resume from an earlier one") from None
    params = [p for g in opt.param_groups for p in g["params"]]
    for key, v in tensors.items():
        if key == "rng.torch":
            torch.set_rng_state(v)
            continue
        i, name = key.split(".", 1)
        opt.state[params[int(i)]][name] = v
    return state


def distill(teacher_pipe: Any, student: Any, kept: list[int], harm: dict[int, float] | None, prompts: list[str],
            work: Path, s: DistillSettings, gen: Defaults, resume: bool,
            progress: Callable[[str, int, int, dict[str, float]], None] | None = None) -> tuple[Any, TrainState, dict[int, float]]:
    """Train ``student`` (pruned, kept[k] = teacher index of student block k). Returns (student, state, weights)."""
    import torch
    from accelerate import Accelerator
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    accelerator = Accelerator(mixed_precision=s.mixed_precision)
    torch.manual_seed(s.seed + accelerator.process_index)
    rng = np.random.default_rng(s.seed + accelerator.process_index)
    teacher = teacher_pipe.transformer
    teacher.requires_grad_(False).eval()
    first_removed = next((i for i in range(len(kept) + 1) if i >= len(kept) or kept[i] != i), len(kept))
    weights = update_weights(kept, first_removed, harm, s)

    # pool of x0 and the frozen text conditioning
    work.mkdir(parents=True, exist_ok=True)
    pool_file = work / "pool.safetensors"
    if pool_file.exists():
        from safetensors.torch import load_file

        saved = load_file(str(pool_file))
        x0_pool = saved["x0"]
        texts = json.loads((work / "pool_prompts.json").read_text())
    else:
        x0_pool, texts = build_pool(teacher_pipe, prompts, s, gen)
        from safetensors.torch import save_file

        save_file({"x0": x0_pool.contiguous()}, str(pool_file))
        (work / "pool_prompts.json").write_text(json.dumps(texts))
    with torch.no_grad():
        cond_all = encode(teacher_pipe, texts, gen.max_sequence_length,
                          gen.guidance if gen.guidance_kind == "distilled" else None)

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
    opt = torch.optim.AdamW(groups, lr=s.lr, weight_decay=0.0)
    ckdir = work / "checkpoints"
    state = TrainState()
    if resume:
        last = latest_checkpoint(ckdir)
        if last is not None:
            state = _load_checkpoint(last, student, opt)
    student, opt = accelerator.prepare(student, opt)
    teacher.to(accelerator.device)
    unwrapped = accelerator.unwrap_model(student)
    # feature KD looks at the kept blocks only; under PWP, not at the frozen prefix (its terms are exactly 0)
    prefix = first_removed if s.pwp else 0
    t_cap = _Capture(teacher, positions=set(kept))
    s_cap = _Capture(unwrapped, positions=set(range(prefix if s.replay_frozen_prefix else 0, len(kept))))
    t0 = time.time() - state.seconds
    n = x0_pool.shape[0]
    trainable_params = [p for g in opt.param_groups for p in g["params"]]
    try:
        # advance the data RNG past the steps already taken, so a resumed run sees the same batches
        for _ in range(state.step):
            rng.integers(n, size=s.batch_size)
        while state.step < s.steps:
            idx = rng.integers(n, size=s.batch_size)
            x0 = x0_pool[idx].to(accelerator.device)
            cond = Conditioning(cond_all.prompt_embeds[idx], cond_all.pooled[idx], cond_all.text_ids, cond_all.guidance)
            u = compute_density_for_timestep_sampling(s.weighting, s.batch_size, logit_mean=0.0, logit_std=1.0,
                                                      mode_scale=1.29)
            sigma = u.to(x0.device).float()
            w = compute_loss_weighting_for_sd3(s.weighting, sigmas=sigma).float()
            noise = torch.randn_like(x0)
            sb = sigma[:, None, None, None]
            xt = (1 - sb) * x0 + sb * noise
            with torch.no_grad(), accelerator.autocast():
                t_out = predict(teacher, xt.to(teacher.dtype), sigma, cond)
            with accelerator.autocast(), _replaying(unwrapped, prefix if s.replay_frozen_prefix else 0, kept, t_cap.out):
                s_out = predict(unwrapped if accelerator.num_processes == 1 else student, xt, sigma, cond)
            l_out = (w[:, None, None, None] * (s_out.float() - t_out.float()) ** 2).mean()
            l_feat = torch.zeros((), device=x0.device)
            if s.lambda_feat > 0:
                terms = []
                for pos, orig in enumerate(kept):
                    if pos < prefix:
                        continue
                    s_ctx, s_img = s_cap.out[pos]
                    t_ctx, t_img = t_cap.out[orig]
                    terms.append(_rel_mse(s_img, t_img))
                    if s_ctx is not None and t_ctx is not None:
                        terms.append(_rel_mse(s_ctx, t_ctx))
                l_feat = torch.stack(terms).mean()
            loss = s.lambda_out * l_out + s.lambda_feat * l_feat
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise HpedgeError(f"distillation diverged at step {state.step} (loss {loss_value}); lower --lr")
            opt.zero_grad()
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(trainable_params, 1.0)
            opt.step()
            state.step += 1
            state.seconds = time.time() - t0
            if state.step % 10 == 0 or state.step == s.steps:
                state.losses.append([state.step, loss_value, float(l_out.detach()), float(l_feat.detach())])
            if progress:
                progress("distilling", state.step, s.steps, {"loss": loss_value})
            if accelerator.is_main_process and (state.step % s.checkpoint_every == 0 or state.step == s.steps):
                _save_checkpoint(ckdir, unwrapped, opt, state, s.keep_checkpoints)
    finally:
        t_cap.close()
        s_cap.close()
    accelerator.wait_for_everyone()
    student = accelerator.unwrap_model(student)
    student.eval()
    student.requires_grad_(False)
    if s.gradient_checkpointing:
        student.disable_gradient_checkpointing()
    return student, state, weights

