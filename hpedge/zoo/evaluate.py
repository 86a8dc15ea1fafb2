"""``hpedge eval``: GenEval-style per-category scores and a Frechet distance for digits pipelines.

Images are generated for a fixed, seeded prompt set (guidance 1 by default), judged by the project's
digit classifier, and compared with real canvases of the same prompts (held-out bundled digits) by the
Frechet distance of the classifier's 64-d features.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hpedge.errors import HpedgeError
from hpedge.zoo.digits import CATEGORIES, Prompt, eval_prompts, render

JUDGE_WEIGHTS = Path(__file__).resolve().parent / "models" / "judge" / "digit-classifier.safetensors"


@dataclass
class EvalSettings:
    per_category: int = 100  # 5 categories -> 500 prompts (the benchmark setting)
    steps: int = 16
    guidance: float = 1.0
    seed: int = 0
    batch_size: int = 50
    prompt_seed: int = 1234


@dataclass
class EvalResult:
    model: str
    overall: float
    categories: dict[str, float]
    seen_phrasings: float
    heldout_phrasings: float
    frechet_distance: float
    samples: int
    settings: dict[str, Any] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    correct: list[int] = field(default_factory=list)  # per prompt (eval_prompts order): 1 = judged correct

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def generate(pipe: Any, prompts: list[str], seeds: list[int], steps: int, guidance: float, batch_size: int = 50,
             progress: Any = None) -> np.ndarray:
    """Digits canvases in [0, 1], shape (N, 32, 32); sample i uses ``torch.Generator().manual_seed(seeds[i])``.

    The digits pipelines' sampling defaults (32 px, T5 length 16, how guidance is applied) come from the
    zoo marker; the call itself is the shared ``hpedge.models.sampling.sample``.
    """

    kind = "cfg" if type(pipe).__name__.startswith("StableDiffusion3") else "true_cfg"
    d = Defaults(32, 32, steps, guidance, kind, MAX_LENGTH, None, "digits evaluator")
    out = []
    for i in range(0, len(prompts), batch_size):
        imgs = sample(pipe, prompts[i : i + batch_size], d, seeds=seeds[i : i + batch_size])
        out.append(imgs[..., 0])
        if progress is not None:
            progress(len(imgs))
    return np.concatenate(out).astype(np.float32)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(s1 @ s2, disp=False)
    covmean = np.real(covmean)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def real_canvases(prompts: list[Prompt], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([render(p.items, rng, split="test") for p in prompts])


def evaluate(pipe: Any, model_name: str, settings: EvalSettings | None = None, progress: Any = None,
             judge: Any = None) -> tuple[EvalResult, np.ndarray, list[Prompt]]:

    s = settings or EvalSettings()
    prompts = eval_prompts(s.per_category, seed=s.prompt_seed)
    seeds = [s.seed * 100_000 + i for i in range(len(prompts))]
    canv = generate(pipe, [p.text for p in prompts], seeds, s.steps, s.guidance, s.batch_size, progress)
    return score(canv, prompts, model_name, s, judge or Judge(str(JUDGE_WEIGHTS))), canv, prompts


def score(canv: np.ndarray, prompts: list[Prompt], model_name: str, s: EvalSettings, judge: Any) -> EvalResult:
    verdicts = judge.judge(canv, prompts)
    ok = np.array([v.correct for v in verdicts], dtype=float)
    cats = {c: float(ok[[p.category == c for p in prompts]].mean()) for c in CATEGORIES}
    held = np.array([p.heldout for p in prompts])
    failures: dict[str, int] = {}
    for v in verdicts:
        if not v.correct:
            key = v.reason.split(":")[0] if "saw" in v.reason else v.reason.split(" (")[0]
            failures[key] = failures.get(key, 0) + 1
    fd = frechet_distance(judge.features(canv), judge.features(real_canvases(prompts, s.prompt_seed)))
    return EvalResult(
        model=model_name,
        overall=float(ok.mean()),
        categories=cats,
        seen_phrasings=float(ok[~held].mean()) if (~held).any() else float("nan"),
        heldout_phrasings=float(ok[held].mean()) if held.any() else float("nan"),
        frechet_distance=fd,
        samples=len(prompts),
        settings=asdict(s),
        failures=dict(sorted(failures.items(), key=lambda kv: -kv[1])[:10]),
        correct=[int(v) for v in ok],
    )


def paired_ratio(teacher: EvalResult | dict[str, Any], student: EvalResult | dict[str, Any], n_boot: int = 10_000,
                 seed: int = 0) -> dict[str, Any]:
    """Student/teacher overall-score ratio with a paired bootstrap 95 % interval.

    Both results must come from the same prompts and sampling seeds (same ``settings``); each bootstrap
    draw resamples prompts, keeping a prompt's teacher and student verdicts together, so the interval
    reflects how much the ratio depends on which prompts happened to be drawn.
    """
    t = asdict(teacher) if isinstance(teacher, EvalResult) else teacher
    s = asdict(student) if isinstance(student, EvalResult) else student
    if t.get("settings") != s.get("settings"):
        raise HpedgeError(f"teacher and student were evaluated with different settings: {t.get('settings')} vs {s.get('settings')}")
    tc, sc = np.asarray(t.get("correct") or [], dtype=float), np.asarray(s.get("correct") or [], dtype=float)
    if len(tc) == 0 or len(tc) != len(sc):
        raise HpedgeError("a paired ratio needs per-prompt verdicts ('correct') of equal length in both results; "
                          "re-run `hpedge eval` (results written by earlier hpedge versions lack them)")
    if tc.sum() == 0:
        raise HpedgeError("the teacher judged no prompt correct: the ratio is undefined")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(tc), size=(n_boot, len(tc)))
    tb = tc[idx].sum(1)
    ratios = np.where(tb > 0, sc[idx].sum(1) / np.maximum(tb, 1), np.nan)
    lo, hi = np.nanpercentile(ratios, [2.5, 97.5])
    return {"ratio": float(sc.sum() / tc.sum()), "ci95": [float(lo), float(hi)], "samples": len(tc),
            "n_boot": n_boot, "student_only_correct": int(((sc == 1) & (tc == 0)).sum()),
            "teacher_only_correct": int(((tc == 1) & (sc == 0)).sum())}


def paired_difference(teacher: EvalResult | dict[str, Any], a: EvalResult | dict[str, Any], b: EvalResult | dict[str, Any],
                      n_boot: int = 10_000, seed: int = 0) -> dict[str, Any]:
    """How far student ``a`` leads student ``b``, both as a share of the teacher, with a paired bootstrap 95 %
    interval: each draw resamples prompts and keeps the three verdicts of a prompt together. ``outside`` is
    true when the interval excludes 0 (the lead is not explained by which prompts happened to be drawn)."""
    rs = [asdict(r) if isinstance(r, EvalResult) else r for r in (teacher, a, b)]
    if len({json.dumps(r.get("settings"), sort_keys=True) for r in rs}) != 1:
        raise HpedgeError("the three results were evaluated with different settings: a paired difference needs the same prompts")
    tc, ac, bc = (np.asarray(r.get("correct") or [], dtype=float) for r in rs)
    if len(tc) == 0 or not len(tc) == len(ac) == len(bc):
        raise HpedgeError("a paired difference needs per-prompt verdicts ('correct') of equal length in all three results")
    if tc.sum() == 0:
        raise HpedgeError("the teacher judged no prompt correct: shares of the teacher are undefined")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(tc), size=(n_boot, len(tc)))
    tb = tc[idx].sum(1)
    diffs = np.where(tb > 0, (ac[idx].sum(1) - bc[idx].sum(1)) / np.maximum(tb, 1), np.nan)
    lo, hi = np.nanpercentile(diffs, [2.5, 97.5])
    return {"difference": float((ac.sum() - bc.sum()) / tc.sum()), "ci95": [float(lo), float(hi)],
            "outside": bool(lo > 0 or hi < 0), "n_boot": n_boot, "samples": len(tc)}


from hpedge.evaluation.image import save_grid  # noqa: E402
from hpedge.models.sampling import Defaults, sample
from hpedge.zoo.judge import Judge
from hpedge.zoo.text import MAX_LENGTH


def grid_of_result(canv: np.ndarray, prompts: list[Prompt], path: Path, per_category: int = 8) -> None:
    idx = []
    for c in CATEGORIES:
        idx += [i for i, p in enumerate(prompts) if p.category == c][:per_category]
    save_grid([canv[i] for i in idx], [prompts[i].text for i in idx], path, cols=per_category)
