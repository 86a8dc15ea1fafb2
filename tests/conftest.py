"""Shared fixtures: small random-weight pipelines of both families, saved as stock diffusers folders."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

# engines built by the tests go to a cache of their own, never the user's ~/.cache/hpedge
os.environ["HPEDGE_CACHE_DIR"] = tempfile.mkdtemp(prefix="hpedge-test-cache-")

from hpedge.models.loading import ZOO_DIR


def _build(family: str, folder: Path) -> Path:
    import torch

    from hpedge.zoo.build import new_pipeline, new_vae
    from hpedge.zoo.train import write_marker

    torch.manual_seed(0)
    pipe = new_pipeline(family, new_vae())
    pipe.save_pretrained(folder)
    write_marker(folder)
    return folder


@pytest.fixture(scope="session")
def random_sd3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build("sd3", tmp_path_factory.mktemp("random") / "sd3")


@pytest.fixture(scope="session")
def random_flux(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build("flux", tmp_path_factory.mktemp("random") / "flux")


@pytest.fixture(params=["sd3", "flux"])
def random_pipeline(request: pytest.FixtureRequest, random_sd3: Path, random_flux: Path) -> Path:
    return random_sd3 if request.param == "sd3" else random_flux


def zoo_available(name: str) -> bool:
    return (ZOO_DIR / name / "model_index.json").exists()


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="session")
def sd3_package(random_sd3, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pkg") / "sd3"
    from hpedge.export.export import ExportOptions, export

    export(str(random_sd3), out, ExportOptions(target="rtx4090", method="rtn", calibration_prompts=2, e2e_samples=2,
                                               precision="int4"))  # the INT4 engine (auto takes fp8: tests/export/test_precision_variant.py)
    return out


# -- real configurations: tiny random-weight SD3.5 / FLUX.1 pipelines (hpedge.testing) -------------
REAL = ("sd3.5-large", "sd3.5-large-turbo", "sd3.5-medium", "flux.1-schnell", "flux.1-dev")
REAL_SIZE = 64  # pixels: the reduced resolution the real-configuration tests run at
REMOVE = {"sd3": "2-2", "flux": "3-3"}  # one block each: a kept block after it, so PWP leaves blocks to train


@pytest.fixture(scope="session")
def real_pipelines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from hpedge.testing import save_tiny_pipeline

    root = tmp_path_factory.mktemp("real")
    return {name: save_tiny_pipeline(name, root / name) for name in REAL}


def tiny_profile(name: str, folder: Path) -> Path:
    """Built-in profile ``name`` with small resolution and batch ranges (engines, precisions, parity limits: its own),
    written as ``folder/test-NAME.json``."""
    from hpedge.targets.profiles import PROFILE_DIR

    p = json.loads((PROFILE_DIR / f"{name}.json").read_text())
    p.update(name=f"test-{name}", resolution={"min": REAL_SIZE, "opt": REAL_SIZE, "max": 2 * REAL_SIZE},
             batch={"min": 1, "opt": 1, "max": 2})
    path = folder / f"test-{name}.json"
    path.write_text(json.dumps(p))
    return path


@pytest.fixture(scope="session")
def tiny_rtx4090(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The rtx4090 profile with small resolution and batch ranges (engines, parity limits: rtx4090's own)."""
    return tiny_profile("rtx4090", tmp_path_factory.mktemp("profile"))


@pytest.fixture(scope="session")
def real_chain(real_pipelines: dict[str, Path], tiny_rtx4090: Path, tmp_path_factory: pytest.TempPathFactory):
    """``chain(name)``: analyze -> compress -> export -> check -> generate through the CLI on one fixture,
    run once per session; returns every command's result and the paths it wrote."""
    from typer.testing import CliRunner

    from hpedge.cli import app

    runner = CliRunner()
    done: dict[str, dict] = {}

    def chain(name: str) -> dict:
        if name in done:
            return done[name]
        src = real_pipelines[name]
        root = tmp_path_factory.mktemp(f"chain-{name}")
        family = "flux" if name.startswith("flux") else "sd3"
        paths = {"src": src, "importance": root / "importance.json", "out": root / "student",
                 "package": root / "package", "image": root / "image.png", "pipeline_image": root / "pipe.png"}
        size = str(REAL_SIZE)
        cmds = {
            "info": ["info", str(src)],
            "plan": ["plan", str(src), "--remove-blocks", REMOVE[family]],
            "analyze": ["analyze", str(src), "-o", str(paths["importance"]), "--num-prompts", "2", "--steps", "4",
                        "--resolution", size],
            "compress": ["compress", str(src), "-o", str(paths["out"]), "--importance", str(paths["importance"]),
                         "--remove-blocks", REMOVE[family], "--steps", "2", "--batch-size", "2", "--pool-size", "4",
                         "--resolution", size, "--eval-per-category", "0", "--checkpoint-every", "2"],
            # the engine precision rtx4090's --precision auto takes (fp8) on FLUX.1-dev; INT4 on the others, whose
            # FP8 / NVFP4 / INT8 exports tests/export/test_precision_variant.py runs (the suite's time)
            "export": ["export", str(paths["out"]), "--target", str(tiny_rtx4090), "-o", str(paths["package"]),
                       "--method", "rtn", "--calibration-prompts", "1", "--fp32-reference",
                       *([] if name == "flux.1-dev" else ["--precision", "int4"])],
            "check": ["check", str(paths["package"])],
            "generate": ["generate", str(paths["package"]), "a red cube on the left of a blue sphere",
                         "-o", str(paths["image"])],
            "generate_pipeline": ["generate", str(paths["out"]), "a red cube", "-o", str(paths["pipeline_image"]),
                                  "--height", size, "--width", str(REAL_SIZE - 16), "--steps", "4"],
        }
        results = {}
        for key, args in cmds.items():
            results[key] = runner.invoke(app, args)
            if results[key].exit_code != 0:
                break
        done[name] = {"results": results, **paths}
        return done[name]

    return chain
