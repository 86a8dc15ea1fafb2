"""The host memory an export is measured to need, refused up front where the host has less."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from hpedge.cli import app
from hpedge.errors import HpedgeError
from hpedge.targets import host

runner = CliRunner()

# whole-export peak RSS measured by the size benchmark (transformer parameters -> bytes), per method
MEASURED = {"rtn": {640_667_968: 4.14e9, 2_234_078_400: 7.25e9},
            "awq_clip": {640_667_968: 4.13e9, 2_234_078_400: 7.34e9},
            "awq_clip_modelopt": {640_667_968: 17.36e9}}
# the text phase's peak RSS (T5-XXL-width encoder stored in fp16: held bytes -> peak bytes), AWQ-clip INT4
TEXT_MEASURED = {2 * 579_237_888: 2.98e9, 2 * 1_158_076_416: 4.08e9}


def test_need_is_the_larger_of_the_measured_text_and_transformer_lines() -> None:
    for method, points in MEASURED.items():  # the line passes through (or above) every measured peak
        for params, peak in points.items():
            assert host.export_need(params, method).need >= peak, (method, params)
    for params, peak in TEXT_MEASURED.items():
        assert host.export_need(1000, "awq_clip", params).need >= peak, params
    f, c, _ = host.MEASURED_PEAK["rtn"]
    tf, tc, _ = host.TEXT_PEAK
    held = 12_797_861_888  # SD3.5 Large's text encoders as held: CLIPs in float32, T5 in 16 bits
    r = host.export_need(8_057_000_000, "rtn", held)
    assert r.transformer_fp16_bytes == 16_114_000_000 and r.text_bytes == held
    assert r.text_need == int(tf * held + tc)
    assert r.need == max(int(f * 16_114_000_000 + c), r.text_need)  # the phases do not overlap
    assert r.rule == (f"transformer {f}x + {c / 1e9:.1f} GB = {(f * 16_114_000_000 + c) / 1e9:.1f} GB; "
                      f"text encoders 12.8 GB held -> {r.text_need / 1e9:.1f} GB")
    assert r.need < host.export_need(8_057_000_000, "awq_clip_modelopt", held).need
    assert host.export_need(1000, "awq_clip_modelopt").need == host.PROCESS_BYTES  # a tiny model: the process itself
    with pytest.raises(HpedgeError, match="--method must be one of"):
        host.export_need(1000, "gptq")


def test_check_refuses_unless_told_to_go_ahead(monkeypatch) -> None:
    monkeypatch.setattr(host, "available_bytes", lambda: 10_000_000_000)
    with pytest.raises(HpedgeError, match=r"needs about 21.8 GB of host memory .*10.0 GB available; --method rtn needs "
                                          r"about [0-9.]+ GB; pass --ignore-host-memory"):
        host.check_host(806_000_000, "awq_clip_modelopt")
    assert host.check_host(806_000_000, "awq_clip_modelopt", ignore=True)["ignored"]
    assert not host.check_host(806_000_000, "rtn")["ignored"]  # about 4.5 GB of 10 GB: no refusal
    with pytest.raises(HpedgeError, match="text encoders"):  # a T5-XXL beside it does not fit
        host.check_host(806_000_000, "rtn", text_bytes=2 * 4_762_310_656)


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
    need = host.export_need(1, "rtn", 12_797_861_888)  # the text phase, with SD3.5 Large's text encoders
    assert "host memory to export it" in text and need.rule.split("; ")[1] in text
    assert "awq_clip_modelopt" in text
