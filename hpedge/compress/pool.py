"""The distillation's sample pool: the teacher's own samples for the training prompts (data-free), or a folder of
images with same-named ``.txt`` captions, VAE-encoded once and kept in the work folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from hpedge.compress.processes import Processes
from hpedge.compress.settings import DistillSettings
from hpedge.errors import HpedgeError
from hpedge.io import atomic_file
from hpedge.models.sampling import Defaults, sample, with_overrides


def build_pool(pipe: Any, prompts: list[str], s: DistillSettings, gen: Defaults, seeds: list[int] | None = None,
               progress: Callable[[int], None] | None = None) -> tuple[Any, list[str]]:
    """x0 latents (N, C, h, w) in the transformer's normalised space: the teacher's own samples at the
    sampling defaults ``gen`` (its guidance, T5 length, size; ``pool_steps`` if set), or a folder.
    ``seeds`` (one per prompt) default to the pool's own; ``progress(k)`` gets the samples done so far."""
    import torch

    if s.data_dir:
        return _pool_from_folder(pipe, Path(s.data_dir), gen.height, gen.width)
    d = with_overrides(gen, steps=s.pool_steps)
    out = []
    bs = max(1, min(32, (32 * 256 * 256) // (d.height * d.width)))  # 32 samples at 256 px, 2 at 1024 px
    seeds = seeds if seeds is not None else [_pool_seed(s, i) for i in range(len(prompts))]
    for i in range(0, len(prompts), bs):
        chunk = prompts[i : i + bs]
        out.append(sample(pipe, chunk, d, seeds=seeds[i : i + bs], output="latent"))
        if progress:
            progress(i + len(chunk))
    return torch.cat(out), prompts


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
ENCODE_BATCH = 16  # images VAE-encoded together: a caption folder of any size is read a batch at a time


def data_pairs(folder: Path) -> list[tuple[Path, Path]]:
    """The (image, caption) pairs of a ``--data`` folder, every image opened and checked (header and data) and
    every caption read: a bad folder is refused in one line before any long step."""
    from PIL import Image, UnidentifiedImageError

    if not folder.is_dir():
        raise HpedgeError(f"--data {folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    pairs = [(p, p.with_suffix(".txt")) for p in files if p.with_suffix(".txt").exists()]
    if not pairs:
        raise HpedgeError(f"--data {folder} has no images ({', '.join(sorted(IMAGE_SUFFIXES))}) with same-named .txt captions")
    for img, cap in pairs:
        try:
            with Image.open(img) as im:
                im.verify()
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise HpedgeError(f"--data: {img} is not a readable image ({e})") from None
        try:
            if not cap.read_text(encoding="utf-8").strip():
                raise HpedgeError(f"--data: caption {cap} is empty")
        except UnicodeDecodeError:
            raise HpedgeError(f"--data: caption {cap} is not UTF-8 text") from None
    return pairs


def _pool_from_folder(pipe: Any, folder: Path, height: int, width: int) -> tuple[Any, list[str]]:
    import torch
    from PIL import Image

    channels = pipe.vae.config.in_channels
    shift = pipe.vae.config.shift_factor or 0.0
    zs, caps = [], []
    pairs = data_pairs(folder)
    for k in range(0, len(pairs), ENCODE_BATCH):
        xs = []
        for img_path, cap in pairs[k : k + ENCODE_BATCH]:
            img = Image.open(img_path).convert("L" if channels == 1 else "RGB").resize((width, height))
            a = np.asarray(img, dtype=np.float32) / 127.5 - 1
            xs.append(a[None] if channels == 1 else a.transpose(2, 0, 1))
            caps.append(cap.read_text(encoding="utf-8").strip())
        x = torch.from_numpy(np.stack(xs))
        with torch.no_grad():
            z = pipe.vae.encode(x.to(pipe.vae.device, pipe.vae.dtype)).latent_dist.sample()
        zs.append(((z - shift) * pipe.vae.config.scaling_factor).float().cpu())
    return torch.cat(zs), caps


def _pool(procs: Processes, work: Path, pipe: Any, prompts: list[str], s: DistillSettings, gen: Defaults,
          progress: Callable[[int, int], None] | None) -> tuple[Any, list[str]]:
    """The x0 pool, split across ranks: rank r samples prompts r, r + world, ...; each share is written
    atomically to ``pool-R-of-W.safetensors`` (resumable on its own); every rank then reads all shares
    and puts the samples back in prompt order, so the pool equals a single-process run's."""
    import torch
    from safetensors.torch import load_file, save_file

    if s.data_dir:  # a captioned folder: encoded by every rank (one VAE pass per image)
        return build_pool(pipe, prompts, s, gen)
    n = len(prompts)

    def shares(world: int) -> list[Path]:
        return [work / f"pool-{r}-of-{world}.safetensors" for r in range(world)]

    def complete(world: int) -> bool:
        return all(p.exists() for p in shares(world))

    have = sorted({int(p.stem.rsplit("-", 1)[1]) for p in work.glob("pool-*-of-*.safetensors")})
    world = next((w for w in have if complete(w)), procs.world)
    if not complete(world):
        mine = shares(world)[procs.rank]
        if not mine.exists():
            idx = procs.share(list(range(n)))  # world == procs.world: no other complete set exists
            x0, _ = build_pool(pipe, [prompts[i] for i in idx], s, gen, seeds=[_pool_seed(s, i) for i in idx],
                               progress=(lambda k: progress(k * world, n)) if progress else None)
            with atomic_file(mine) as tmp:
                save_file({"x0": x0.contiguous(), "index": torch.tensor(idx, dtype=torch.int64)}, str(tmp),
                          metadata={"prompts": str(n)})
        procs.barrier()
    x0_all: Any = None
    for path in shares(world):
        part = load_file(str(path))
        if x0_all is None:
            x0_all = torch.empty((n, *part["x0"].shape[1:]), dtype=part["x0"].dtype)
        x0_all[part["index"]] = part["x0"]
    return x0_all, prompts


def _pool_seed(s: DistillSettings, i: int) -> int:
    """The sampling seed of the pool's i-th prompt (independent of how the pool is split)."""
    return s.seed * 1_000_003 + i
