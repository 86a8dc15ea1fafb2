"""Per-prompt verdicts in eval results and the paired student/teacher ratio."""

import numpy as np
import pytest

from hpedge.errors import HpedgeError
from hpedge.zoo.evaluate import (JUDGE_WEIGHTS, EvalResult, EvalSettings, paired_difference, paired_ratio, real_canvases,
                                      score)
from hpedge.zoo.judge import Judge
from hpedge.zoo.digits import eval_prompts


def _result(correct: list[int], **settings) -> EvalResult:
    return EvalResult(model="m", overall=float(np.mean(correct)), categories={}, seen_phrasings=0.0, heldout_phrasings=0.0,
                      frechet_distance=0.0, samples=len(correct), settings={"per_category": 1, **settings}, correct=correct)


def test_score_records_one_verdict_per_prompt_consistent_with_overall():
    s = EvalSettings(per_category=4)
    prompts = eval_prompts(s.per_category, seed=s.prompt_seed)
    canv = real_canvases(prompts, s.prompt_seed)
    canv[::2] = 0.0  # blank every other canvas: those must be judged wrong
    r = score(canv, prompts, "real", s, Judge(str(JUDGE_WEIGHTS)))
    assert len(r.correct) == len(prompts) == r.samples
    assert all(c == 0 for c in r.correct[::2])
    assert r.overall == pytest.approx(np.mean(r.correct))
    assert sum(r.correct[1::2]) > 0


def test_paired_ratio_point_value_and_interval():
    rng = np.random.default_rng(1)
    t = (rng.random(400) < 0.8).astype(int)
    same = paired_ratio(_result(list(t)), _result(list(t)), n_boot=500)
    assert same["ratio"] == 1.0 and same["ci95"] == [1.0, 1.0]  # identical verdicts: no uncertainty at all
    s = t.copy()
    s[np.flatnonzero(t)[:40]] = 0  # the student loses 40 of the teacher's correct prompts
    r = paired_ratio(_result(list(t)), _result(list(s)), n_boot=2000)
    assert r["ratio"] == pytest.approx(s.sum() / t.sum())
    assert r["ci95"][0] < r["ratio"] < r["ci95"][1] < 1.0
    assert r["teacher_only_correct"] == 40 and r["student_only_correct"] == 0


def test_paired_difference_separates_a_real_lead_from_noise():
    rng = np.random.default_rng(2)
    t = (rng.random(500) < 0.9).astype(int)
    a = t.copy()
    b = t.copy()
    b[np.flatnonzero(t)[:60]] = 0  # b loses 60 of the teacher's prompts that a keeps: a clear lead
    d = paired_difference(_result(list(t)), _result(list(a)), _result(list(b)), n_boot=2000)
    assert d["difference"] == pytest.approx(60 / t.sum()) and d["outside"] and 0 < d["ci95"][0] < d["difference"] < d["ci95"][1]
    c = t.copy()
    c[np.flatnonzero(t)[:2]] = 0  # a lead of 2 prompts out of 500 is within the noise
    d = paired_difference(_result(list(t)), _result(list(a)), _result(list(c)), n_boot=2000)
    assert not d["outside"] and d["ci95"][0] <= 0 < d["ci95"][1]
    with pytest.raises(HpedgeError, match="different settings"):
        paired_difference(_result([1, 0]), _result([1, 0]), _result([1, 0], seed=3))


def test_paired_ratio_refuses_unpaired_results():
    with pytest.raises(HpedgeError, match="different settings"):
        paired_ratio(_result([1, 0, 1]), _result([1, 0, 1], seed=3))
    with pytest.raises(HpedgeError, match="per-prompt verdicts"):
        paired_ratio(_result([1, 0, 1]), _result([1, 0]))
    with pytest.raises(HpedgeError, match="teacher judged no prompt correct"):
        paired_ratio(_result([0, 0]), _result([1, 0]))
