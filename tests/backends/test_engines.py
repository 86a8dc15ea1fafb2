"""Engine libraries behind one interface: real TensorRT-RTX builds here (no GPU needed), the Turing refusal,
the engine cache, profile validation, and standard TensorRT's explanation where it cannot be installed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hpedge.backends import engines as eng
from hpedge.backends import trt_api
from hpedge.errors import HpedgeError

ROOT = Path(__file__).resolve().parents[2]
RTX = eng.library("tensorrt_rtx").build_availability(("8.9",))
needs_rtx = pytest.mark.skipif(not RTX.ok, reason=f"TensorRT-RTX not importable: {RTX.reason}")


def _int4_graph(path: Path, k: int = 256, n: int = 256, layers: int = 3) -> Path:
    """x @ DequantizeLinear(int4 W, fp16 scales, block 128) repeated: the pattern of ModelOpt's INT4 graphs."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        w = rng.integers(-8, 8, size=(k, n))
        inits += [helper.make_tensor(f"w{i}", TensorProto.INT4, [k, n], w.flatten().tolist()),
                  numpy_helper.from_array(rng.uniform(0.01, 0.1, (k // 128, n)).astype(np.float16), f"s{i}")]
        nodes += [helper.make_node("DequantizeLinear", [f"w{i}", f"s{i}"], [f"d{i}"], axis=0, block_size=128),
                  helper.make_node("MatMul", [x, f"d{i}"], [f"y{i}"])]
        x = f"y{i}"
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["b", k])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT16, ["b", n])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]), path)
    return path


def _settings(caps: tuple[str, ...]) -> eng.BuildSettings:
    return eng.BuildSettings({"x": ((1, 256), (2, 256), (8, 256))}, caps, 3, 1 << 28)


@needs_rtx
@pytest.mark.parametrize("caps", [("8.6",), ("8.9",), ("12.0",), ("8.6", "8.9", "12.0")])
def test_rtx_builds_int4_engines_without_a_gpu(tmp_path, caps) -> None:
    from hpedge.backends import trt_rtx

    onnx = _int4_graph(tmp_path / "m.onnx")
    blob = trt_rtx.build(onnx, _settings(caps))
    assert len(blob) > 3 * 256 * 256 // 2  # at least the 4-bit weights
    assert not trt_rtx.run_availability(caps).ok  # running needs an RTX GPU; this machine has none


@needs_rtx
def test_rtx_refuses_int4_for_turing_with_the_library_reason(tmp_path) -> None:
    from hpedge.backends import trt_rtx

    with pytest.raises(HpedgeError, match="Cannot compile for target.*sm75.*int4"):
        trt_rtx.build(_int4_graph(tmp_path / "m.onnx"), _settings(("7.5",)))
    # and the export says so before any work, with the way out
    msg = eng.precision_refusal("tensorrt_rtx", ("7.5",), {"int4", "fp16"})
    assert msg and "Turing" in msg and "--engine skip" in msg
    assert eng.precision_refusal("tensorrt_rtx", ("8.6", "8.9"), {"int4"}) is None


@needs_rtx
def test_rebuild_with_an_unchanged_key_comes_from_the_cache(tmp_path, monkeypatch) -> None:
    from hpedge.backends import trt_rtx

    monkeypatch.setenv("HPEDGE_CACHE_DIR", str(tmp_path / "cache"))
    onnx = _int4_graph(tmp_path / "m.onnx")
    first = eng.build_cached(trt_rtx, onnx, "a" * 64, tmp_path / "p1" / "transformer.plan", _settings(("8.9",)))
    assert first["cache"] == "miss" and (tmp_path / "cache" / "engines" / f"{first['cache_key']}.plan").exists()

    def no_build(*_a, **_k):
        raise AssertionError("rebuilt although the cache key was unchanged")

    monkeypatch.setattr(trt_rtx, "build", no_build)
    again = eng.build_cached(trt_rtx, onnx, "a" * 64, tmp_path / "p2" / "transformer.plan", _settings(("8.9",)))
    assert again["cache"] == "hit" and again["cache_key"] == first["cache_key"]
    assert (tmp_path / "p2" / again["file"]).read_bytes() == (tmp_path / "p1" / first["file"]).read_bytes()
    with pytest.raises(AssertionError, match="rebuilt"):  # another ONNX digest is another key: built again
        eng.build_cached(trt_rtx, onnx, "b" * 64, tmp_path / "p3" / "transformer.plan", _settings(("8.9",)))


def test_cache_key_covers_every_input() -> None:
    base = eng.cache_key("a" * 64, {"opt": 3}, "tensorrt_rtx", "1.7", ["8.9"])
    assert base == eng.cache_key("a" * 64, {"opt": 3}, "tensorrt_rtx", "1.7", ["8.9"])
    assert len({base, eng.cache_key("b" * 64, {"opt": 3}, "tensorrt_rtx", "1.7", ["8.9"]),
                eng.cache_key("a" * 64, {"opt": 4}, "tensorrt_rtx", "1.7", ["8.9"]),
                eng.cache_key("a" * 64, {"opt": 3}, "tensorrt", "1.7", ["8.9"]),
                eng.cache_key("a" * 64, {"opt": 3}, "tensorrt_rtx", "1.8", ["8.9"]),
                eng.cache_key("a" * 64, {"opt": 3}, "tensorrt_rtx", "1.7", ["8.6"])}) == 6


def test_standard_tensorrt_explains_itself() -> None:
    import importlib.util

    av = eng.library("tensorrt").build_availability(("8.7",))
    if importlib.util.find_spec("tensorrt") is None:  # these hosts: the registry's tensorrt is a stub
        assert not av.ok and av.reason.startswith("TensorRT is not installed here (import tensorrt failed")
    elif trt_api.gpu_compute_capability() is None:
        assert not av.ok and "no NVIDIA GPU is visible" in av.reason
    else:  # a board or a GPU host: ok for its own architecture only
        assert av.ok == (trt_api.gpu_compute_capability() == "8.7"), av.reason


def _profile(tmp_path: Path, name: str, **change) -> str:
    d = json.loads((ROOT / "hpedge" / "profiles" / f"{name}.json").read_text())
    d.update(change)
    path = tmp_path / f"{name}-{len(change)}-{abs(hash(json.dumps(change, sort_keys=True)))}.json"
    path.write_text(json.dumps(d))
    return str(path)


def test_profiles_name_their_engine_library_and_capabilities(tmp_path) -> None:
    from hpedge.targets.profiles import all_profiles, load_profile

    libs = {p.name: (p.engine.library, p.engine.compute_capabilities, p.build_on) for p in all_profiles()}
    assert libs["rtx4090"] == ("tensorrt_rtx", ("8.9",), "host") and libs["rtx5090"][1] == ("12.0",)
    assert libs["jetson-orin-nano-8gb"] == ("tensorrt", ("8.7",), "device")
    portable = load_profile(_profile(tmp_path, "rtx4090", engine={"library": "tensorrt_rtx",
                                                                  "compute_capabilities": ["8.6", "8.9", "12.0"]}))
    assert portable.engine.portable
    bad = {
        "hpedge-profile/1 has no engine section": dict(schema="hpedge-profile/1"),
        "cannot target compute capability 8.7": dict(engine={"library": "tensorrt_rtx", "compute_capabilities": ["8.9", "8.7"]}),
        "must include the device's own 8.9": dict(engine={"library": "tensorrt_rtx", "compute_capabilities": ["8.6"]}),
        "engine.library must be one of": dict(engine={"library": "onnx", "compute_capabilities": ["8.9"]}),
    }
    for msg, change in bad.items():
        with pytest.raises(HpedgeError, match=msg):
            load_profile(_profile(tmp_path, "rtx4090", **change))
    with pytest.raises(HpedgeError, match="one GPU architecture"):
        load_profile(_profile(tmp_path, "jetson-orin-nano-8gb", engine={"library": "tensorrt", "compute_capabilities": ["8.7", "8.9"]}))
    with pytest.raises(HpedgeError, match="built on the host"):
        load_profile(_profile(tmp_path, "jetson-orin-nano-8gb", engine={"library": "tensorrt_rtx", "compute_capabilities": ["8.6"]},
                              compute_capability="8.6"))


STUBS = ROOT / ".typings" / "tensorrt"


@pytest.mark.skipif(not STUBS.exists(), reason="tensorrt-stubs not installed in .typings (see the README test command)")
def test_engine_modules_type_check_against_tensorrt_stubs(tmp_path) -> None:
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
    files = [str(ROOT / "hpedge" / "backends" / f) for f in ("trt.py", "trt_rtx.py", "engines.py", "trt_api.py")]
    r = subprocess.run([sys.executable, "-m", "mypy", "--follow-imports=silent", "--ignore-missing-imports",
                        "--no-incremental", *files], capture_output=True, text=True, env=env, cwd=ROOT)
    ours = [ln for ln in r.stdout.splitlines() if ln.startswith("hpedge/") or "/hpedge/backends/" in ln]
    assert "error: Cannot find" not in r.stdout and "syntax" not in r.stdout, r.stdout[-2000:]
    assert not ours, "\n".join(ours)  # errors inside the third-party stubs themselves are not ours to fix


def test_rtx_targets_are_the_librarys_list_less_what_nvidia_does_not_support() -> None:
    from hpedge.backends import trt_rtx
    from hpedge.errors import HpedgeError
    from hpedge.targets.profiles import RTX_COMPUTE_CAPABILITIES

    assert RTX_COMPUTE_CAPABILITIES == trt_rtx.RUNS_ON and "8.0" not in RTX_COMPUTE_CAPABILITIES
    lib = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu12 is not installed")
    enum = {f"{n[2:-1]}.{n[-1]}" for n in dir(lib.ComputeCapability) if n.startswith("SM")}
    assert set(RTX_COMPUTE_CAPABILITIES) == enum - set(trt_rtx.NOT_IN_SUPPORT_MATRIX)
    with pytest.raises(HpedgeError, match="cannot target compute capability 8.0"):
        trt_rtx_profile = {"library": "tensorrt_rtx", "compute_capabilities": ["8.6", "8.0"]}
        from hpedge.targets.profiles import _parse_engine

        _parse_engine(trt_rtx_profile, "test", "8.6", "discrete", "host")


def test_compute_capability_from_the_cuda_runtime_where_nvml_is_absent(monkeypatch) -> None:
    """Jetson boards have no NVML: the CUDA runtime's device attributes answer instead."""
    import ctypes
    import sys

    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml fails, as on a board

    class Cudart:
        def cudaDeviceGetAttribute(self, out, attr, device):  # noqa: N802 - the CUDA runtime's name
            out._obj.value = {trt_api.CUDA_ATTR_CC_MAJOR: 8, trt_api.CUDA_ATTR_CC_MINOR: 7}[attr]
            return 0

    monkeypatch.setattr(ctypes, "CDLL", lambda name: Cudart())
    assert trt_api.gpu_compute_capability() == "8.7"

    def missing(name):
        raise OSError(name)

    monkeypatch.setattr(ctypes, "CDLL", missing)
    assert trt_api.gpu_compute_capability() is None
