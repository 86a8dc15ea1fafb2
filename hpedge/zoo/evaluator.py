"""The evaluator hook: what a zoo pipeline's marker (``hpedge_zoo.json``) adds to the real path.

Real pipelines have no evaluator (:func:`evaluator_for` returns None) and take the project's prompts and image
distortion alone; a digits pipeline brings its prompt grammar, its judge (accuracy drop in the contribution
analysis) and its 500-prompt score. Resolved once from the marker; the real path never compares names.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np

from hpedge.errors import HpedgeError
from hpedge.models.sampling import zoo_marker
from hpedge.zoo.digits import eval_prompts, sample_prompt
from hpedge.zoo.evaluate import JUDGE_WEIGHTS, EvalSettings, evaluate, paired_ratio
from hpedge.zoo.judge import Judge


class DigitsEvaluator:
    """The digits zoo's grammar, judge and score."""

    name = "digits"

    def calibration_prompts(self, n: int, seed: int) -> tuple[list[str], list[Any]]:
        prompts = eval_prompts(max(1, n // 5), seed=10_000 + seed, heldout_fraction=0.0)
        return [p.text for p in prompts], prompts

    def training_prompts(self, n: int, seed: int) -> list[str]:
        rng = np.random.default_rng(50_000 + seed)
        return [sample_prompt(rng).text for _ in range(n)]

    def judge(self) -> Judge:
        return Judge(str(JUDGE_WEIGHTS))

    def compare(self, teacher: Any, teacher_name: str, student: Any, student_name: str, per_category: int,
                say: Callable[..., None]) -> dict[str, Any]:
        """Teacher and student scored on the same prompts and seeds, with the paired ratio and its interval."""
        es = EvalSettings(per_category=per_category)
        say("evaluating teacher", 0, 2)
        t_res = evaluate(teacher, teacher_name, es)[0]
        say("evaluating student", 1, 2)
        s_res = evaluate(student, student_name, es)[0]
        paired = paired_ratio(t_res, s_res) if t_res.overall else None
        return {"teacher": asdict(t_res), "student": asdict(s_res),
                "student_over_teacher": paired["ratio"] if paired else float("nan"), "paired": paired}


EVALUATORS = {"digits": DigitsEvaluator}


def evaluator_for(path: Path | None) -> DigitsEvaluator | None:
    """The evaluator a pipeline folder's marker names, or None (every real pipeline)."""
    name = zoo_marker(path).get("evaluator")
    if name is None:
        return None
    if name not in EVALUATORS:
        raise HpedgeError(f"{path}: hpedge_zoo.json names an unknown evaluator {name!r} (known: {', '.join(EVALUATORS)})")
    return EVALUATORS[name]()
