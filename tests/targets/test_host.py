"""The host memory an export is measured to need, refused up front where the host has less."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from hpedge.cli import app
from hpedge.errors import HpedgeError
from hpedge.targets import host

runner = CliRunner()


def test_need_is_the_measured_line_of_the_transformers_fp16_bytes() -> None:
    n = host.export_need(8_057_000_000, "awq_clip")  # SD3.5 Large's transformer
    assert n.transformer_fp16_bytes == 16_114_000_000 and n.factor == 13.54 and n.need == int(13.54 * 16_114_000_000)
    r = host.export_need(8_057_000_000, "rtn")
    assert r.need == int(3.04 * 16_114_000_000 + 2_560_000_000) and r.rule == "3.04x + 2.6 GB" and r.need < n.need
    # the line passes through (or above) what the size benchmark measured: 0.64 B and 2.24 B at SD3.5 Medium's width
    assert host.export_need(641_000_000, "rtn").need >= 6.44e9 and host.export_need(2_234_000_000, "rtn").need >= 16.1e9
    assert host.export_need(1000, "awq_clip").need == host.PROCESS_BYTES  # a tiny model: the process itself
    assert host.export_need(1000, "rtn").need == int(3.04 * 2000 + 2_560_000_000)  # or the measured constant
    with pytest.raises(HpedgeError, match="--method must be one of"):
        host.export_need(1000, "gptq")


def test_check_refuses_unless_told_to_go_ahead(monkeypatch) -> None:
    monkeypatch.setattr(host, "available_bytes", lambda: 10_000_000_000)
    with pytest.raises(HpedgeError, match=r"needs about 21.8 GB of host memory .*10.0 GB available; --method rtn needs "
                                          r"about 7.5 GB; pass --ignore-host-memory"):
        host.check_host(806_000_000, "awq_clip")
    assert host.check_host(806_000_000, "awq_clip", ignore=True)["ignored"]
    assert not host.check_host(806_000_000, "rtn")["ignored"]  # 7.5 GB of 10 GB: no refusal


def test_export_refuses_before_any_work_and_writes_nothing(random_sd3, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(host, "available_bytes", lambda: 1_000_000)
    out = tmp_path / "pkg"
    r = runner.invoke(app, ["export", str(random_sd3), "--target", "rtx4090", "-o", str(out), "--engine", "skip"])
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and "pass --ignore-host-memory" in lines[0], r.output
    assert not out.exists() and not list(tmp_path.glob(".pkg*"))


def test_plan_says_what_an_export_of_the_plan_needs() -> None:
    r = runner.invoke(app, ["plan", "sd3.5-large", "--remove-blocks", "25-29,31-35"])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "host memory to export it" in text and "rtn 38.6 GB (3.04x + 2.6 GB)" in text and "awq_clip 160.5 GB (13.54x)" in text
