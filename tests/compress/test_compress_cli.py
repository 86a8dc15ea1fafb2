import json

import numpy as np

from typer.testing import CliRunner

from hpedge.cli import app
from hpedge.compress.pipeline import work_dir

runner = CliRunner()


def test_compress_writes_a_stock_pipeline_and_resumes(random_sd3, tmp_path) -> None:
    from diffusers import StableDiffusion3Pipeline

    out = tmp_path / "small"
    args = ["compress", str(random_sd3), "-o", str(out), "--remove-blocks", "8,9,10", "--sgd", "off",
            "--steps", "4", "--batch-size", "2", "--checkpoint-every", "2", "--eval-per-category", "0", "--pool-size", "8"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    # stderr is not a terminal here: a readable plain log, one line per stage
    assert "] compress: started" in r.output and "] distilling: loss" in r.output and "] compress: done" in r.output
    report = json.loads((out / "hpedge_compress.json").read_text())
    assert report["removed_blocks"] == [8, 9, 10]
    assert report["kept_blocks"] == [0, 1, 2, 3, 4, 5, 6, 7, 11]
    # PWP on by default; block 11 alone learns for 3 removed blocks, and the message says what the curve measured
    assert "PWP on (hpedge's default): freezes kept blocks 0-7" in r.output and "fewer than one per two" in r.output
    assert report["pwp"]["requested"] == "hpedge's default" and report["pwp"]["used"] is True
    assert report["frozen_blocks_pwp"] == [0, 1, 2, 3, 4, 5, 6, 7] and report["distill"]["pwp"] is True
    assert (out / "teacher_vs_student.png").read_bytes()[:4] == b"\x89PNG"
    pipe = StableDiffusion3Pipeline.from_pretrained(out)  # stock diffusers
    assert pipe.transformer.config.num_layers == 9
    from ..models.test_loading import stock_call

    assert np.isfinite(stock_call(out)).all()  # and a stock call runs (no dtype argument anywhere)
    assert not work_dir(out).exists()
    # an existing OUT is not replaced silently
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "already exists" in r.output


def test_interrupted_run_leaves_no_out_and_resumes(random_sd3, tmp_path, monkeypatch) -> None:
    import hpedge.compress.pipeline as cp

    out = tmp_path / "small"
    args = ["compress", str(random_sd3), "-o", str(out), "--remove-blocks", "9,10", "--sgd", "off",
            "--steps", "4", "--batch-size", "2", "--checkpoint-every", "2", "--eval-per-category", "0", "--pool-size", "8"]

    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cp, "_teacher_student_grid", crash)  # dies after training, while writing OUT
    r = runner.invoke(app, args)
    assert r.exit_code != 0
    assert not out.exists() and work_dir(out).exists()
    assert list((work_dir(out) / "checkpoints").glob("step-*"))
    monkeypatch.undo()
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "--resume" in r.output
    r = runner.invoke(app, args + ["--resume"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "hpedge_compress.json").read_text())["kept_blocks"] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 11]
    r = runner.invoke(app, ["compress", str(random_sd3), "-o", str(tmp_path / "x"), "--remove-blocks", "11,"])
    assert r.exit_code == 2 and "context_pre_only" in r.output


def test_a_suffix_cut_with_pwp_is_refused_before_distilling_and_the_default_resumes_it(random_flux, tmp_path) -> None:
    out = tmp_path / "small"
    args = ["compress", str(random_flux), "-o", str(out), "--remove-blocks", "10,11", "--sgd", "off",
            "--steps", "2", "--batch-size", "2", "--eval-per-category", "0", "--pool-size", "8"]
    r = runner.invoke(app, args + ["--pwp"])  # asked for explicitly: refused, not turned off
    assert r.exit_code == 2 and "PWP would freeze every kept block" in r.output and "Traceback" not in r.output
    assert not out.exists() and not (work_dir(out) / "checkpoints").exists()  # refused before any distillation
    r = runner.invoke(app, args + ["--resume"])  # what the message advises: hpedge's default is PWP off here
    assert r.exit_code == 0, r.output
    assert "PWP off (hpedge's default for this cut): it would freeze every kept block (0-9)" in r.output
    report = json.loads((out / "hpedge_compress.json").read_text())
    assert report["frozen_blocks_pwp"] == [] and report["update_weights"]["9"] == 1.0
