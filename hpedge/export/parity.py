"""Parity checks with Polygraphy (the only module that imports ``polygraphy``).

On captured real inputs: PyTorch (reference) vs ONNX Runtime fp32 (element-wise atol/rtol from the
profile, through Polygraphy's ``CompareFunc.simple``), vs ONNX Runtime INT4 and TensorRT (judged by
cosine similarity and PSNR against the reference, since an element-wise tolerance is meaningless for
4-bit weights), plus an end-to-end image check done by the caller. Engines run through their own adapters
(:mod:`hpedge.backends.engines`; Polygraphy's TensorRT runner only knows standard TensorRT) and are judged
here by the same :func:`compare_quality`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Check:
    name: str
    passed: bool
    metrics: dict[str, float]
    limits: dict[str, float]


@dataclass
class ParityReport:
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "checks": [asdict(c) for c in self.checks]}

    def failures(self) -> list[str]:
        return [f"{c.name} {c.metrics} vs {c.limits}" for c in self.checks if not c.passed]


def quality(ref: np.ndarray, out: np.ndarray) -> dict[str, float]:
    r, o = ref.astype(np.float64).ravel(), out.astype(np.float64).ravel()
    cos = float(r @ o / (np.linalg.norm(r) * np.linalg.norm(o) + 1e-12))
    mse = float(((r - o) ** 2).mean())
    peak = float(np.abs(r).max()) or 1.0
    psnr = float(10 * np.log10(peak**2 / mse)) if mse > 0 else float("inf")
    return {"cosine": cos, "psnr_db": psnr, "max_abs": float(np.abs(r - o).max())}


def _quiet() -> None:
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.WARNING


def run_onnxrt(onnx_path: Path, feeds: list[dict[str, np.ndarray]], name: str, device: str = "auto") -> Any:
    """Polygraphy run of an ONNX file on ONNX Runtime (CUDA where present, else CPU; no pre-packed weight
    copies: see :func:`hpedge.backends.ort.session`); returns its RunResults."""
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.comparator import Comparator

    from hpedge.backends import ort

    _quiet()
    runner = OnnxrtRunner(lambda: ort.session(onnx_path, device, low_memory=True), name=name)
    return Comparator.run([runner], data_loader=feeds)


def outputs_of(results: Any) -> list[np.ndarray]:
    (_, iterations), = list(results.items())
    return [np.asarray(next(iter(it.values()))) for it in iterations]


def reference_results(reference: list[np.ndarray], output_name: str, runner: str = "pytorch") -> Any:
    """Outputs computed elsewhere as Polygraphy results of runner ``runner``."""
    from polygraphy.comparator import RunResults
    from polygraphy.comparator.struct import IterationResult

    return RunResults([(runner, [IterationResult({output_name: r}, runner_name=runner) for r in reference])])


def compare_fp32(reference: list[np.ndarray], results: Any, output_name: str, atol: float, rtol: float,
                 name: str = "transformer fp32: ONNX Runtime vs PyTorch") -> Check:
    """Element-wise comparison through Polygraphy's Comparator.compare_accuracy."""
    from polygraphy.comparator import Comparator, RunResults

    try:
        from polygraphy.comparator import SimpleCompareFunc as simple
    except ImportError:  # older Polygraphy
        from polygraphy.comparator import CompareFunc

        simple = CompareFunc.simple

    _quiet()
    merged = RunResults(list(reference_results(reference, output_name).items()) + list(results.items()))
    acc = Comparator.compare_accuracy(merged, compare_func=simple(atol=atol, rtol=rtol, check_shapes=True))
    passed = bool(acc)
    outs = outputs_of(results)
    err = max(float(np.abs(r - o).max()) for r, o in zip(reference, outs))
    return Check(name, passed, {"max_abs": err}, {"atol": atol, "rtol": rtol})


def compare_quality(name: str, reference: list[np.ndarray], outs: list[np.ndarray], min_cosine: float,
                    min_psnr: float) -> Check:
    qs = [quality(r, o) for r, o in zip(reference, outs)]
    cos = min(q["cosine"] for q in qs)
    psnr = min(q["psnr_db"] for q in qs)
    return Check(name, cos >= min_cosine and psnr >= min_psnr, {"min_cosine": cos, "min_psnr_db": psnr},
                 {"min_cosine": min_cosine, "min_psnr_db": min_psnr})


def polygraphy_version() -> str:
    import polygraphy

    return str(polygraphy.__version__)
