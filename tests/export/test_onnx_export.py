"""The transformer export leaves nothing of the model behind."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

from hpedge.export import onnx_export as ox


def test_the_dynamo_export_keeps_no_reference_to_the_model(tmp_path: Path) -> None:
    """onnxscript's rewrite rules (module-level) kept the last graph they matched, and with it every parameter of
    the exported module: after an export of a large model its whole weights stayed in memory."""
    from hpedge.testing import tiny_pipeline

    pipe = tiny_pipeline("sd3.5-medium")
    spec = ox.transformer_spec(pipe, (128, 128, 128), (1, 1, 2), 512)
    ox.export_transformer(pipe.transformer, spec, tmp_path / "model.onnx", "dynamo")
    params = [weakref.ref(p) for p in pipe.transformer.parameters()]
    pipe.transformer = None
    gc.collect()
    assert not [r for r in params if r() is not None]
