"""The TensorRT module: exercised where TensorRT and a GPU exist, skipped here with the reason."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hpedge.export import trt

ROOT = Path(__file__).resolve().parents[2]
AV = trt.availability()


def test_availability_explains_itself() -> None:
    assert AV.ok or AV.reason  # when not ok, the reason is what users and the skip below print


@pytest.mark.skipif(not AV.ok, reason=f"TensorRT engine build not possible here: {AV.reason}")
def test_build_engine_from_exported_onnx(sd3_package_for_trt, tmp_path) -> None:  # pragma: no cover - needs a GPU
    import json

    m = json.loads((sd3_package_for_trt / "manifest.json").read_text())
    io = m["components"]["transformer"]["io"]["inputs"]
    shapes = {k: (tuple(v["min"]), tuple(v["opt"]), tuple(v["max"])) for k, v in io.items()}
    facts = trt.build_engine(sd3_package_for_trt / "transformer/int4/model.onnx", tmp_path / "e.plan", shapes, 3, 1 << 30)
    assert (tmp_path / "e.plan").stat().st_size > 0 and facts["strongly_typed"]


@pytest.fixture
def sd3_package_for_trt(sd3_package):  # pragma: no cover
    return sd3_package


def test_cache_key_covers_every_input() -> None:
    base = trt.cache_key("a" * 64, {"opt_level": 3}, "10.13", "8.9")
    assert base != trt.cache_key("b" * 64, {"opt_level": 3}, "10.13", "8.9")
    assert base != trt.cache_key("a" * 64, {"opt_level": 4}, "10.13", "8.9")
    assert base != trt.cache_key("a" * 64, {"opt_level": 3}, "10.14", "8.9")
    assert base != trt.cache_key("a" * 64, {"opt_level": 3}, "10.13", "8.7")


STUBS = ROOT / ".typings" / "tensorrt"


@pytest.mark.skipif(not STUBS.exists(), reason="tensorrt-stubs not installed in .typings (see the README test command)")
def test_trt_module_type_checks_against_tensorrt_stubs(tmp_path) -> None:
    import re
    import shutil

    # tensorrt-stubs 10.13 has two syntax slips mypy cannot parse (IPluginV3 parameters named `in`, and
    # add_scale_nd's defaulted parameters before a required one); check against a copy with only those mended
    stubs = tmp_path / "stubs"
    shutil.copytree(ROOT / ".typings", stubs)
    for f in stubs.rglob("*.pyi"):
        text = re.sub(r"\bin: list\[", "in_: list[", f.read_text())
        f.write_text(text.replace(", channel_axis: int) -> IScaleLayer", ", channel_axis: int = ...) -> IScaleLayer"))
    env = dict(os.environ, MYPYPATH=str(stubs))
    r = subprocess.run([sys.executable, "-m", "mypy", "--follow-imports=silent", "--ignore-missing-imports",
                        "--no-incremental", str(ROOT / "hpedge" / "export" / "trt.py")],
                       capture_output=True, text=True, env=env, cwd=ROOT)
    ours = [ln for ln in r.stdout.splitlines() if ln.startswith("hpedge/") or "/hpedge/export/trt.py" in ln]
    assert "error: Cannot find" not in r.stdout and "syntax" not in r.stdout, r.stdout[-2000:]
    assert not ours, "\n".join(ours)  # errors inside the third-party stubs themselves are not ours to fix


@pytest.mark.parametrize("engine_error", [0.0, 1.0])
def test_build_adds_the_engine_only_if_it_matches_the_stored_reference(sd3_package, tmp_path, monkeypatch, engine_error) -> None:
    """`hpedge build`'s logic around TensorRT: the adapter calls are replaced (no engine is made or timed
    here); the engine's outputs are the stored PyTorch reference, exact or with an error as large as the
    signal. A failing engine is deleted and the package stays as it was."""
    import json
    import shutil

    from hpedge.errors import HpedgeError
    from hpedge.export import parity as par
    from hpedge.export import pipeline
    from hpedge.runtime import read_manifest

    pkg = tmp_path / "pkg"
    shutil.copytree(sd3_package, pkg)
    _, ref = pipeline.load_reference(pkg, read_manifest(pkg))
    rng = np.random.default_rng(0)
    outs = [r + engine_error * np.abs(r).mean() * rng.standard_normal(r.shape).astype(np.float32) for r in ref]
    monkeypatch.setattr(trt, "availability", lambda cc=None: trt.Availability(True, "ok", "10.x (replaced)", cc or "8.9"))

    def fake_build(onnx_path, engine_path, *a, **k):
        engine_path.parent.mkdir(parents=True, exist_ok=True)
        engine_path.write_bytes(b"not an engine")
        return {"file": engine_path.name, "tensorrt": "replaced", "strongly_typed": True}

    monkeypatch.setattr(trt, "build_engine", fake_build)
    monkeypatch.setattr(par, "run_trt", lambda engine, feeds, name: None)
    monkeypatch.setattr(par, "outputs_of", lambda results: outs)
    before = (pkg / "manifest.json").read_text()
    if engine_error:
        with pytest.raises(HpedgeError, match="failed parity") as e:
            pipeline.build(pkg)
        assert e.value.exit_code == HpedgeError.CHECK_FAILED
        assert (pkg / "manifest.json").read_text() == before and not list((pkg / "engines").glob("*.plan"))
    else:
        m = pipeline.build(pkg)
        assert m["engine"]["status"] == "built" and m["engine"]["parity"]["passed"]
        assert m["engine"]["parity"]["min_cosine"] > 0.999
        assert "engines/" + m["engine"]["file"] in m["files"] and json.loads((pkg / "manifest.json").read_text()) == m
