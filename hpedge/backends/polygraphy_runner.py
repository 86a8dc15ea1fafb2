"""Polygraphy adapter: the only module that imports ``polygraphy``.

ONNX Runtime runs through Polygraphy's ``OnnxrtRunner`` (sessions from :func:`hpedge.backends.ort.session`),
and element-wise comparisons through its ``Comparator.compare_accuracy``; results are Polygraphy's
``RunResults``. Engines run through their own adapters (Polygraphy's TensorRT runner only knows standard
TensorRT).
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from hpedge.backends import ort


def _quiet() -> None:
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.WARNING


def run_onnxrt(onnx_path: Path, feeds: list[dict[str, np.ndarray]], name: str, device: str = "auto",
                split: Callable[[dict[str, np.ndarray]], list[dict[str, np.ndarray]]] | None = None,
                data_dir: Path | None = None) -> Any:
    """Polygraphy run of an ONNX file on ONNX Runtime (CUDA where present, else CPU; no pre-packed weight
    copies: see :func:`hpedge.backends.ort.session`); returns its RunResults, one iteration per feed.

    ``split``: each feed is run as the parts it returns (e.g. one batch row at a time: a run then holds one row's
    attention scores, which grow with batch x tokens^2) and its parts' outputs are joined along the first axis, so
    the results, and every metric over them, are those of the whole feed. ``data_dir``: where the graph's external
    data is, if not beside it (:func:`hpedge.backends.ort.session`)."""
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.comparator import Comparator, RunResults
    from polygraphy.comparator.struct import IterationResult

    _quiet()
    runner = OnnxrtRunner(lambda: ort.session(onnx_path, device, low_memory=True, data_dir=data_dir), name=name)
    parts = [split(f) for f in feeds] if split is not None else [[f] for f in feeds]
    results = Comparator.run([runner], data_loader=[p for ps in parts for p in ps])
    del runner
    gc.collect()  # the session goes now, not at some later collection: the next check starts without it
    ort.return_freed_memory()
    if split is None:
        return results
    (runner_name, iterations), = list(results.items())
    joined, i = [], 0
    for ps in parts:
        its = iterations[i : i + len(ps)]
        i += len(ps)
        joined.append(IterationResult({k: np.concatenate([np.asarray(it[k]) for it in its]) for k in its[0]},
                                      runner_name=runner_name))
    return RunResults([(runner_name, joined)])


def outputs_of(results: Any) -> list[np.ndarray]:
    (_, iterations), = list(results.items())
    return [np.asarray(next(iter(it.values()))) for it in iterations]


def reference_results(reference: list[np.ndarray], output_name: str, runner: str = "pytorch") -> Any:
    """Outputs computed elsewhere as Polygraphy results of runner ``runner``."""
    from polygraphy.comparator import RunResults
    from polygraphy.comparator.struct import IterationResult

    return RunResults([(runner, [IterationResult({output_name: r}, runner_name=runner) for r in reference])])


def matches_elementwise(reference: list[np.ndarray], results: Any, output_name: str, atol: float, rtol: float) -> bool:
    """Polygraphy's ``Comparator.compare_accuracy`` with its simple element-wise comparison."""
    from polygraphy.comparator import Comparator, RunResults

    try:
        from polygraphy.comparator import SimpleCompareFunc as simple
    except ImportError:  # older Polygraphy
        from polygraphy.comparator import CompareFunc

        simple = CompareFunc.simple

    _quiet()
    merged = RunResults(list(reference_results(reference, output_name).items()) + list(results.items()))
    return bool(Comparator.compare_accuracy(merged, compare_func=simple(atol=atol, rtol=rtol, check_shapes=True)))


def version() -> str:
    import polygraphy

    return str(polygraphy.__version__)
