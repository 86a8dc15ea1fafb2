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
    from hpedge.export.pipeline import ExportOptions, export

    export(str(random_sd3), out, ExportOptions(target="rtx4090", method="rtn", calibration_prompts=2, e2e_samples=2))
    return out
