"""The engine stage on the zoo packages (README command 1's kind of package) and `hpedge build`."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from hpedge.backends import engines as eng
from hpedge.errors import HpedgeError
from hpedge.export import build as engine_build
from hpedge.targets.profiles import load_profile

from ..conftest import zoo_available

RTX = eng.library("tensorrt_rtx").build_availability(("8.9",))


# digits-flux's export takes twice digits-sd3's: it runs with -m slow; FLUX engines are built in the default run
# by the real-configuration chains (tests/test_real_pipelines.py, flux.1-schnell and flux.1-dev)
@pytest.fixture(scope="module", params=["digits-sd3", pytest.param("digits-flux", marks=pytest.mark.slow)])
def zoo_package(request, tmp_path_factory) -> Path:
    if not zoo_available(request.param):
        pytest.skip(f"zoo:{request.param} is not in this checkout")
    if not RTX.ok:
        pytest.skip(f"TensorRT-RTX not importable: {RTX.reason}")
    from hpedge.export.export import ExportOptions, export

    out = tmp_path_factory.mktemp("zoo-pkg") / request.param
    export(f"zoo:{request.param}", out, ExportOptions(target="rtx4090", method="rtn", calibration_prompts=2,
                                                      e2e_samples=1, engine="require"))
    return out


def test_zoo_packages_carry_built_rtx_engines_for_every_rtx_generation(zoo_package, tmp_path) -> None:
    m = json.loads((zoo_package / "manifest.json").read_text())
    e = m["engines"]
    assert e["status"] == "built" and e["library"] == "tensorrt_rtx" and e["compute_capabilities"] == ["8.9"]
    assert set(e["components"]) == {"text_clip", "text_t5", "transformer", "vae_decoder"}
    for name in ("text_clip", "text_t5", "transformer", "vae_decoder"):
        c = e["components"][name]
        assert c["file"] in m["files"] and c["engine_bytes"] == (zoo_package / c["file"]).stat().st_size > 0
        assert c["compute_capabilities"] == ["8.9"] and c["version"] == RTX.version
    # rtx3060 (Ampere, sm_86) and rtx5090 (Blackwell, sm_120) from the same package's ONNX files: the rtx4090
    # package's transformer engine is FP8 (--precision auto), which Ampere has no kernels for: its INT4 graph there
    assert m["precision"]["transformer"] == "fp8" and e["components"]["transformer"]["onnx"] == "transformer/fp8/model.onnx"
    comps = engine_build.planned(e["components"])
    root = tmp_path / "pkg"
    shutil.copytree(zoo_package, root)
    with pytest.raises(HpedgeError, match="sm86.*fp8_e4m3"):
        engine_build.build_all(root, {"transformer": comps["transformer"]}, load_profile("rtx3060"))
    for target, cc in (("rtx3060", "8.6"), ("rtx5090", "12.0")):
        ampere = {"transformer": {**comps["transformer"], "onnx": "transformer/int4/model.onnx"}} if cc == "8.6" else {}
        built = engine_build.build_all(root, {**comps, **ampere}, load_profile(target))
        for name, c in built.items():
            assert c["compute_capabilities"] == [cc] and (root / c["file"]).stat().st_size > 0  # the VAE is shared: a hit
            assert c["cache_key"] != e["components"][name]["cache_key"]


def test_hpedge_build_builds_pending_engines_and_keeps_them_only_if_they_match(sd3_package, tmp_path, monkeypatch) -> None:
    """`hpedge build` on a package exported with --engine skip: real TensorRT-RTX builds; the parity gate is
    exercised with a stand-in runner (no RTX GPU here) whose outputs are the stored reference, exact or with
    an error as large as the signal. A failing engine set is deleted and the package stays as it was."""
    from hpedge.export import build as pipeline
    from hpedge.runtime.format import load_reference, read_manifest

    if not RTX.ok:
        pytest.skip(f"TensorRT-RTX not importable: {RTX.reason}")
    pkg = tmp_path / "pkg"
    shutil.copytree(sd3_package, pkg)
    m0 = read_manifest(pkg)
    for c in m0["engines"]["components"].values():  # make it a package whose engines are still to build
        (pkg / c["file"]).unlink()
    from hpedge.runtime.format import finalize_manifest

    m0 = {k: v for k, v in m0.items() if k not in ("files", "manifest_sha256")}
    m0["engines"] = {**m0["engines"], "status": "skipped", "reason": "engine build skipped (--engine skip)",
                     "components": engine_build.planned(m0["engines"]["components"])}
    finalize_manifest(pkg, m0)
    m = pipeline.build(pkg)  # no GPU: built, parity not run and said so
    assert m["engines"]["status"] == "built" and not m["engines"]["parity"]["run"]
    assert "not run: no RTX GPU" in m["engines"]["parity"]["reason"]
    assert all(c["file"] in m["files"] for c in m["engines"]["components"].values())

    _, ref, _ = load_reference(pkg, m)
    rng = np.random.default_rng(0)

    class Stand:
        inputs = list(m["engines"]["components"]["transformer"]["shapes"])

        def __init__(self, err):
            self.err, self.i = err, 0

        def save_cache(self):
            pass

        def run(self, feeds):
            r = ref[self.i][: feeds["hidden_states"].shape[0]]
            self.i += 1
            return [r + self.err * np.abs(r).mean() * rng.standard_normal(r.shape).astype(np.float32)]

    monkeypatch.setattr(eng, "can_run", lambda section: eng.Availability(True, "stand-in", "x", "8.9"))
    for err in (0.0, 1.0):
        monkeypatch.setattr(eng, "open_runner", lambda root, section, comp, err=err: Stand(err))
        before = _snapshot(pkg)
        if err:
            with pytest.raises(HpedgeError, match="failed parity") as e:
                pipeline.build(pkg)
            assert e.value.exit_code == HpedgeError.CHECK_FAILED and _snapshot(pkg) == before  # byte for byte
            assert not list(tmp_path.glob(".pkg.build-*"))
        else:
            m = pipeline.build(pkg)
            p = m["engines"]["parity"]
            assert p["run"] and p["passed"] and p["min_cosine"] > 0.999, p


def _snapshot(root) -> dict[str, str]:
    import hashlib

    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_failed_build_leaves_the_package_as_it_was(sd3_package, tmp_path, monkeypatch) -> None:
    """A builder that dies after writing part of an engine: nothing of it reaches the package."""
    from hpedge.export import build as pipeline

    if not RTX.ok:
        pytest.skip(f"TensorRT-RTX not importable: {RTX.reason}")
    pkg = tmp_path / "pkg"
    shutil.copytree(sd3_package, pkg)
    calls = []

    def dies(adapter, onnx, sha, dest, settings):
        calls.append(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(b"half an engine")
        raise HpedgeError("stand-in builder: out of memory")

    monkeypatch.setattr(eng, "build_cached", dies)
    before = _snapshot(pkg)
    with pytest.raises(HpedgeError, match="stand-in builder"):
        pipeline.build(pkg)
    assert calls and all(pkg not in d.parents for d in calls)  # written beside the package, not into it
    assert _snapshot(pkg) == before and not list(tmp_path.glob(".pkg.build-*"))


def test_a_jetson_package_explains_the_on_device_build(random_flux, tmp_path) -> None:
    from typer.testing import CliRunner

    from hpedge.cli import app

    r = CliRunner().invoke(app, ["export", str(random_flux), "--target", "jetson-orin-nano-8gb", "-o", str(tmp_path / "p"),
                                 "--engine", "require"])
    assert r.exit_code == HpedgeError.USAGE and "built on the device itself" in r.output and "hpedge build" in r.output
    assert len(r.output.strip().splitlines()) <= 3 and not (tmp_path / "p").exists()
