"""The C++ embedding samples in examples/cpp: built with CMake and run against the Python runtime.

Where the SDKs are missing the tests skip and say why. ONNX Runtime's Python wheel carries
``libonnxruntime.so`` but not the C API headers, and Debian 12 has no ONNX Runtime package, so on
hpedge's CI machines the headers must come from an unpacked ONNX Runtime release: set
``ONNXRUNTIME_ROOT`` (``include/``, ``lib/``) or ``HPEDGE_ORT_INCLUDE_DIR`` (headers only; the wheel's
library is used).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

SAMPLES = Path(__file__).resolve().parents[2] / "examples" / "cpp"


def _ort_include() -> Path | None:
    candidates = []
    if os.environ.get("HPEDGE_ORT_INCLUDE_DIR"):
        candidates.append(Path(os.environ["HPEDGE_ORT_INCLUDE_DIR"]))
    if os.environ.get("ONNXRUNTIME_ROOT"):
        candidates.append(Path(os.environ["ONNXRUNTIME_ROOT"]) / "include")
    candidates += [Path("/usr/include/onnxruntime"), Path("/usr/local/include/onnxruntime"),
                   Path("/usr/include"), Path("/usr/local/include")]
    return next((c for c in candidates if (c / "onnxruntime_c_api.h").is_file()), None)


def _ort_library(tmp: Path) -> Path | None:
    """ONNXRUNTIME_ROOT/lib, else the Python wheel's library behind the sonames the linker wants."""
    root = os.environ.get("ONNXRUNTIME_ROOT")
    if root and (Path(root) / "lib" / "libonnxruntime.so").exists():
        return Path(root) / "lib" / "libonnxruntime.so"
    import onnxruntime

    libs = sorted((Path(onnxruntime.__file__).parent / "capi").glob("libonnxruntime.so.*"))
    if not libs:
        return None
    shim = tmp / "ortlib"
    shim.mkdir()
    for name in ("libonnxruntime.so", "libonnxruntime.so.1"):
        (shim / name).symlink_to(libs[0])
    return shim / "libonnxruntime.so"


def _cmake_build(build: Path, *defines: str) -> None:
    subprocess.run(["cmake", "-S", str(SAMPLES), "-B", str(build), *defines], check=True, capture_output=True, text=True)
    subprocess.run(["cmake", "--build", str(build)], check=True, capture_output=True, text=True)


def test_ort_sample_matches_python(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    if shutil.which("cmake") is None or shutil.which("c++") is None:
        pytest.skip("cmake or a C++ compiler is not installed")
    include = _ort_include()
    if include is None:
        pytest.skip("ONNX Runtime C API headers not found (the pip wheel ships libonnxruntime but no headers and "
                    "Debian 12 has no package): set ONNXRUNTIME_ROOT to an unpacked onnxruntime-linux-x64 release "
                    "or HPEDGE_ORT_INCLUDE_DIR to its include/ folder")
    lib = _ort_library(tmp_path)
    if lib is None:
        pytest.skip("no libonnxruntime.so found (ONNXRUNTIME_ROOT/lib or the onnxruntime wheel)")
    build = tmp_path / "build"
    _cmake_build(build, f"-DONNXRUNTIME_INCLUDE_DIR={include}", f"-DONNXRUNTIME_LIBRARY={lib}")

    from hpedge.runtime import Package

    sd3_package = request.getfixturevalue("sd3_package")  # exported only when the sample can run
    step = Package(sd3_package, device="cpu").save_step(tmp_path / "step", "a 3 on the left and a 7 on the right")
    run = subprocess.run([str(build / "ort_step"), str(sd3_package), str(step)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "MATCH" in run.stdout

    # The comparison can fail: a reference that differs by more than the tolerance is reported.
    ref = np.fromfile(step / "output_0.bin", dtype="<f4")
    ref[0] += 0.5
    ref.tofile(step / "output_0.bin")
    run = subprocess.run([str(build / "ort_step"), str(sd3_package), str(step)], capture_output=True, text=True)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "MISMATCH" in run.stdout


@pytest.mark.parametrize("library,binary,root", [("tensorrt", "trt_step", "TENSORRT_ROOT"),
                                                 ("tensorrt_rtx", "trt_rtx_step", "TENSORRT_RTX_ROOT")])
def test_trt_sample_matches_python(request: pytest.FixtureRequest, tmp_path: Path, library: str, binary: str, root: str) -> None:
    from hpedge.backends import engines, trt_api

    target = "rtx4090" if library == "tensorrt_rtx" else None
    av = engines.library(library).run_availability(("8.9",) if target else ((trt_api.gpu_compute_capability() or "8.7"),))
    if not av.ok:
        pytest.skip(f"{library} C++ sample not run: {av.reason}")
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    build = tmp_path / "build"
    _cmake_build(build, *([f"-D{root}={os.environ[root]}"] if root in os.environ else []))
    if not (build / binary).exists():
        pytest.skip(f"{binary} not built: {library} C++ headers/library or the CUDA toolkit not found by CMake (set {root})")
    if target is None:  # pragma: no cover - a standard-TensorRT GPU machine: a profile of this GPU
        pytest.skip("standard TensorRT sample: export for this GPU's own profile (a Jetson board) and run it there")

    from hpedge.export.export import ExportOptions, export
    from hpedge.runtime import Package, read_manifest

    pkg = tmp_path / "pkg"
    export(str(request.getfixturevalue("random_sd3")), pkg, ExportOptions(target=target, method="rtn", calibration_prompts=2,
                                                                            e2e_samples=2, engine="require"))
    engine = pkg / read_manifest(pkg)["engines"]["components"]["transformer"]["file"]
    step = Package(pkg, variant="int4", device="cpu").save_step(tmp_path / "step", "a 3 on the left and a 7 on the right")
    run = subprocess.run([str(build / binary), str(engine), str(step)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
