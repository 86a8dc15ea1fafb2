"""On a CUDA machine: compress a real-configuration fixture for a few steps in bf16 (analysis, sample pool and
training on the GPU), export it, generate with the package and with the pipeline. Skipped with the reason
elsewhere."""

import json

import pytest
import torch
from typer.testing import CliRunner

from hpedge.cli import app

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA GPU on this machine (the GPU smoke test runs where one is present)")


@pytest.mark.parametrize("name", ["sd3.5-medium", "flux.1-dev"])
def test_compress_export_generate_on_the_gpu(real_pipelines, tiny_rtx4090, tmp_path, name) -> None:
    runner = CliRunner()
    out, pkg = tmp_path / "student", tmp_path / "package"
    remove = "2-2" if name.startswith("sd3") else "3-3"
    r = runner.invoke(app, ["compress", str(real_pipelines[name]), "-o", str(out), "--remove-blocks", remove,
                            "--steps", "4", "--batch-size", "2", "--pool-size", "4", "--resolution", "64",
                            "--eval-per-category", "0", "--mixed-precision", "bf16", "--sgd", "off"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "hpedge_compress.json").read_text())["distill"]["mixed_precision"] == "bf16"
    r = runner.invoke(app, ["export", str(out), "--target", str(tiny_rtx4090), "-o", str(pkg), "--method", "rtn",
                            "--calibration-prompts", "1", "--engine", "skip"])
    assert r.exit_code == 0, r.output
    for model in (pkg, out):
        r = runner.invoke(app, ["generate", str(model), "a red cube", "-o", str(tmp_path / "x.png"), "--steps", "4",
                                "--height", "64", "--width", "64"])
        assert r.exit_code == 0, r.output
