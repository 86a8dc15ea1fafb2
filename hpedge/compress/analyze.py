"""Contribution analysis: score the removal of every block and every sub-component.

For each candidate the model generates images for seeded calibration prompts with that part
disabled, and the result is compared with the intact model's images on the same seeds:

* distortion = mean squared pixel difference / variance of the intact images (always available);
* for pipelines with an evaluator (the digits zoo), the evaluator's accuracy drop is added.

harm = distortion + accuracy drop; higher = more important. Disabling a block makes it an identity
(both streams pass through); disabling a sub-component zeroes its output (its residual contribution,
or for the AdaLN modulation linears w_norm*, the modulation, which also closes the stream's gates).
Results are written after every entry, so an interrupted analysis resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from hpedge.compress.importance import Entry, Importance, load
from hpedge.compress.processes import Processes
from hpedge.errors import HpedgeError
from hpedge.evaluation.scorers import load_scorer
from hpedge.io import atomic_file
from hpedge.models import adapters
from hpedge.models.denoise import family_of
from hpedge.models.sampling import defaults, sample, with_overrides
from hpedge.prompts import PROMPTS_FILE, calibration, read_prompts
from hpedge.zoo.evaluator import evaluator_for


@dataclass
class AnalysisSettings:
    prompts: int = 40
    steps: int | None = None  # None: the model's default
    seed: int = 0
    components: bool = True
    resolution: int | None = None  # square side in pixels; None: the model's default size
    guidance: float | None = None  # None: the model's default
    prompts_file: str | None = None  # one prompt per line; None: the project's calibration set
    scorer: str | None = None  # e.g. "clip=FOLDER": a learned score's relative drop is added to the harm

    def check(self) -> None:
        """Numbers in range and the prompts file readable, before the pipeline is loaded."""
        for name, v in (("num-prompts", self.prompts), ("steps", self.steps), ("resolution", self.resolution)):
            if v is not None and v < 1:
                raise HpedgeError(f"--{name} must be at least 1, got {v}")
        if self.guidance is not None and self.guidance < 0:
            raise HpedgeError(f"--guidance must not be negative, got {self.guidance}")
        if self.prompts_file is not None:
            read_prompts(self.prompts_file)


class _Skip:
    """Stands in for a block: both streams pass through unchanged."""

    def __call__(self, hidden_states: Any = None, encoder_hidden_states: Any = None, *args: Any, **kwargs: Any) -> Any:
        return encoder_hidden_states, hidden_states


@contextmanager
def ablated(transformer: Any, block: int, component: str | None = None) -> Iterator[None]:
    """Temporarily disable one block (component None) or one sub-component of it."""
    import torch

    ref = adapters.blocks(transformer)[block]
    if component is None:
        holder = transformer.single_transformer_blocks if ref.kind == "single" else transformer.transformer_blocks
        original = holder[ref.local]
        skip = torch.nn.Module()
        skip.forward = _Skip()  # type: ignore[method-assign]
        holder._modules[str(ref.local)] = skip
        try:
            yield
        finally:
            holder._modules[str(ref.local)] = original
        return
    comps = adapters.components(ref)
    if component not in comps:
        raise HpedgeError(f"block {block} has no component {component!r} (has: {', '.join(comps)})")
    mods = comps[component] if isinstance(comps[component], list) else [comps[component]]

    def zero(_m: Any, _i: Any, out: Any) -> Any:
        if isinstance(out, tuple):
            return tuple(o * 0 if hasattr(o, "shape") else o for o in out)
        return out * 0

    handles = [m.register_forward_hook(zero) for m in mods]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _fingerprint(pipe: Any, settings: AnalysisSettings, gen: dict[str, Any], texts: list[str]) -> str:
    h = hashlib.sha256(json.dumps([asdict(settings), gen, texts], sort_keys=True).encode())
    h.update(json.dumps(dict(pipe.transformer.config), sort_keys=True, default=str).encode())
    for name, p in sorted(pipe.transformer.state_dict().items())[:8]:
        h.update(name.encode())
        h.update(np.ascontiguousarray(p.detach().float().flatten()[:64].cpu().numpy()).tobytes())
    return h.hexdigest()[:16]


def analyze(pipe: Any, model_path: Path | None, out: Path | None, settings: AnalysisSettings | None = None,
            progress: Callable[[str, int, int], None] | None = None, procs: Processes | None = None) -> Importance:
    """Run (or resume) the contribution analysis; writes ``out`` (hpedge format) when given.

    With several processes (``procs``) each rank scores every world-th ablation and keeps its results in its
    own ``OUT.partial-RANK`` file (so each share resumes on its own); the main process merges them into
    ``out``, which every rank then reads. ``out`` is required then."""

    s = settings or AnalysisSettings()
    world, rank = (procs.world, procs.rank) if procs else (1, 0)
    if world > 1 and out is None:
        raise HpedgeError("a contribution analysis over several processes needs a file to merge into")
    evaluator = evaluator_for(model_path)
    gen = with_overrides(defaults(pipe, model_path), height=s.resolution, width=s.resolution, steps=s.steps,
                         guidance=s.guidance)
    texts, prompt_objs = calibration(evaluator, s.prompts, s.seed, s.prompts_file)
    if s.prompts_file is not None:
        evaluator = None  # an evaluator's judge needs its own prompts
    seeds = [s.seed * 7919 + i for i in range(len(texts))]
    tr = pipe.transformer
    refs = adapters.blocks(tr)
    todo = [(r.index, c) for r in refs for c in [None, *(adapters.components(r) if s.components else [])]]
    fp = _fingerprint(pipe, s, gen.to_dict(), texts)
    if _cached(out, fp):
        return load(out)  # type: ignore[arg-type]
    if procs:
        procs.barrier()  # every rank has looked at ``out`` before the main process may write it
    partial = _partial_file(out, rank, world) if out else None
    done = _read_partial(partial, fp)
    mine = procs.share(todo) if procs else todo

    judge = evaluator.judge() if evaluator is not None else None
    scorer = load_scorer(s.scorer) if s.scorer else None

    def run() -> tuple[np.ndarray, float, float]:
        imgs = sample(pipe, texts, gen, seeds=seeds, batch_size=16)  # (N, H, W, C): every channel counts
        acc = float(np.mean([v.correct for v in judge.judge(imgs[..., 0], prompt_objs)])) if judge else float("nan")
        score = float(scorer.score(imgs, texts).mean()) if scorer else float("nan")
        return imgs, acc, score

    ref_imgs, ref_acc, ref_score = run()
    var = float(ref_imgs.var()) + 1e-12
    for k, (block, comp) in enumerate(mine):
        key = f"{block}\t{comp or ''}"
        if progress:
            progress(f"block {block} {comp or '(whole)'}", k, len(mine))
        if key in done:
            continue
        with ablated(tr, block, comp):
            imgs, acc, score = run()
        distortion = float(((imgs - ref_imgs) ** 2).mean()) / var
        drop = (ref_acc - acc) if judge else 0.0
        score_drop = (ref_score - score) / max(abs(ref_score), 1e-6) if scorer else 0.0
        done[key] = {"harm": distortion + drop + score_drop, "distortion": distortion, "accuracy": acc,
                     **({"score": score, "score_drop": score_drop} if scorer else {})}
        if partial:
            _write_partial(partial, fp, done)
    if world > 1:
        assert out is not None and procs is not None
        if not _merge_ranks(procs, out, fp, todo, done):
            return load(out)  # a rank other than the main one: the main process merged and wrote ``out``
    imp = Importance(
        family=family_of(tr), num_blocks=len(refs),
        metric="relative pixel distortion (all channels)" + (" + evaluator accuracy drop" if judge else "")
               + (f" + relative {scorer.name} score drop" if scorer else ""),
        entries=_entries(done, todo), fingerprint=fp,
        settings={**asdict(s), "baseline_accuracy": ref_acc, "sampling": gen.to_dict(),
                  **({"scorer": scorer.describe(), "baseline_score": ref_score} if scorer else {}), "prompt_list": texts,
                  "prompts_source": s.prompts_file or (f"{evaluator.name} grammar" if evaluator else str(PROMPTS_FILE.name)),
                  "seeds": seeds},
    )
    if out:
        with atomic_file(out) as tmp:
            tmp.write_text(json.dumps(imp.to_dict(), indent=2))
        for r in range(world):
            _partial_file(out, r, world).unlink(missing_ok=True)
    if world > 1:
        procs.barrier()  # type: ignore[union-attr]
    return imp


def _cached(out: Path | None, fp: str) -> bool:
    """Whether ``out`` already holds the analysis of this model and these settings."""
    if out is None or not out.exists():
        return False
    try:
        return bool(json.loads(out.read_text()).get("fingerprint") == fp)
    except json.JSONDecodeError:
        return False


def _entries(done: dict[str, dict[str, Any]], todo: list[tuple[int, str | None]]) -> list[Entry]:
    """The scored ablations in the order of the work list (each block, then its components)."""
    order = {f"{b}\t{c or ''}": i for i, (b, c) in enumerate(todo)}
    entries = []
    for key, d in sorted(done.items(), key=lambda kv: order.get(kv[0], len(order))):
        b, c = key.split("\t")
        entries.append(Entry(int(b), c or None, d["harm"], {k: v for k, v in d.items() if k != "harm"}))
    return entries


def _merge_ranks(procs: Processes, out: Path, fp: str, todo: list[tuple[int, str | None]],
                 done: dict[str, dict[str, Any]]) -> bool:
    """The main process merges every rank's share into ``done`` (True); the other ranks wait for ``out`` (False)."""
    procs.barrier()
    if procs.rank != 0:
        procs.barrier()
        return False
    for r in range(1, procs.world):
        done.update(_read_partial(_partial_file(out, r, procs.world), fp))
    missing = [f"{b}/{c or 'block'}" for b, c in todo if f"{b}\t{c or ''}" not in done]
    if missing:
        raise HpedgeError(f"the contribution analysis is missing {len(missing)} entries after merging the ranks' "
                          f"shares (first: {missing[0]}); run again with --resume")
    return True


def _partial_file(out: Path, rank: int, world: int) -> Path:
    """A rank's results so far (``.partial`` in a single process)."""
    return out.with_name(out.name + (".partial" if world == 1 else f".partial-{rank}-of-{world}"))


def _read_partial(path: Path | None, fp: str) -> dict[str, dict[str, Any]]:
    if path is None or not path.exists():
        return {}
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}  # written atomically, so only a foreign file can be unreadable: start that share over
    return state["entries"] if state.get("fingerprint") == fp else {}


def _write_partial(path: Path, fp: str, done: dict[str, dict[str, Any]]) -> None:

    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps({"fingerprint": fp, "entries": done}))


def heatmap(imp: Importance, path: Path) -> None:
    """PNG: blocks (rows) x [whole block, components] (columns), darker red = more harmful to remove."""
    from PIL import Image, ImageDraw

    comps = sorted({e.component for e in imp.entries if e.component})
    cols = ["block"] + comps
    table = {(e.block, e.component or "block"): e.harm for e in imp.entries}
    vals = np.array(list(table.values()) or [0.0])
    lo, hi = float(vals.min()), float(vals.max()) or 1.0
    cw, ch, left, top = 90, 18, 40, 36
    img = Image.new("RGB", (left + cw * len(cols), top + ch * imp.num_blocks + 4), "white")
    d = ImageDraw.Draw(img)
    d.text((2, 2), f"harm of removal ({imp.metric})"[:100], fill="black")
    for j, c in enumerate(cols):
        d.text((left + j * cw + 2, top - 14), c[:14], fill="black")
    for b in range(imp.num_blocks):
        d.text((4, top + b * ch + 3), str(b), fill="black")
        for j, c in enumerate(cols):
            v = table.get((b, c))
            x0, y0 = left + j * cw, top + b * ch
            if v is None:
                d.rectangle([x0, y0, x0 + cw - 2, y0 + ch - 2], fill=(230, 230, 230))
                continue
            t = (v - lo) / (hi - lo) if hi > lo else 0.0
            col = (255, int(255 * (1 - t)), int(255 * (1 - t)))
            d.rectangle([x0, y0, x0 + cw - 2, y0 + ch - 2], fill=col)
            d.text((x0 + 3, y0 + 3), f"{v:.3g}", fill="black" if t < 0.6 else "white")

    with atomic_file(path) as tmp:
        img.save(tmp, format="PNG")
