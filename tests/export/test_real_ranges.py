"""The rtx4090 profile's own ranges (256-1344 px, batch 1-4; CFG doubles the SD3 engine batch) on one fixture
of each family: export with engines, check, generate at the model's default 1024 px. Slow (minutes on CPU):
``pytest -m slow tests/export/test_real_ranges.py``."""

import json

import pytest
from typer.testing import CliRunner

from hpedge.cli import app


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd3.5-large", "flux.1-dev"])
def test_export_at_the_rtx4090_profiles_own_ranges(real_pipelines, tmp_path, name) -> None:
    runner = CliRunner()
    pkg = tmp_path / "package"
    r = runner.invoke(app, ["export", str(real_pipelines[name]), "--target", "rtx4090", "-o", str(pkg),
                            "--method", "rtn", "--calibration-prompts", "1", "--steps", "4"])
    assert r.exit_code == 0, r.output
    m = json.loads((pkg / "manifest.json").read_text())
    assert m["generation"]["resolution_range"] == [256, 1024, 1344]
    assert (m["generation"]["height"], m["generation"]["width"]) == (1024, 1024)
    assert m["engines"]["status"] == "built"
    r = runner.invoke(app, ["check", str(pkg)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["generate", str(pkg), "a red cube on the left", "-o", str(tmp_path / "x.png"), "--steps", "2"])
    assert r.exit_code == 0, r.output
