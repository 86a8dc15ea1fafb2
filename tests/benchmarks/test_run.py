"""benchmarks/run.py helpers whose output is recorded in results files: checked on the CPU."""

import importlib.util
import json
from pathlib import Path

import pytest

from hpedge.compress.pwp import resolve_pwp

ROOT = Path(__file__).resolve().parents[2]


def patch_everywhere(monkeypatch, bench, name, value) -> None:
    """Set ``name`` in run.py and in every benchmark module it imported (one module per benchmark)."""
    import sys

    monkeypatch.setattr(bench, name, value)
    for m in list(sys.modules.values()):
        if (getattr(m, "__file__", None) or "").startswith(str(ROOT / "benchmarks")) and hasattr(m, name):
            monkeypatch.setattr(m, name, value)


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("hpedge_benchmarks_run", ROOT / "benchmarks" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_int4_weight_only_stores_the_planners_bytes_and_dequantizes_exactly(bench) -> None:
    import torch
    from diffusers import SD3Transformer2DModel

    from hpedge.models.adapters import int4_bytes

    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=32,
                                  num_attention_heads=4, joint_attention_dim=128, caption_projection_dim=128,
                                  pooled_projection_dim=64, pos_embed_max_size=16).to(torch.bfloat16)
    planned = int4_bytes(model)  # the planner's INT4 formula (bf16 scales and everything else 16-bit)
    lin = model.transformer_blocks[0].attn.to_q
    w = lin.weight.detach().float().view(lin.out_features, -1, 128)
    scale = (w.abs().amax(-1, keepdim=True) / 7).to(torch.bfloat16).float()
    expected = (torch.clamp(torch.round(w / (w.abs().amax(-1, keepdim=True) / 7)), -8, 7) * scale).view(lin.out_features, -1)
    n, err = bench._int4_weight_only(model)
    stored = sum(t.numel() * t.element_size() for name, t in (*model.named_parameters(), *model.named_buffers()) if name != "pos_embed.pos_embed")
    assert n > 0 and stored == planned
    assert 0.02 < err < 0.2  # 4-bit round-to-nearest of random weights: a few percent, not zero
    x = torch.randn(3, w.shape[1] * 128, dtype=torch.bfloat16)
    q = model.transformer_blocks[0].attn.to_q
    assert type(q).__name__ == "Int4Linear"
    ref = x.float() @ expected.T + q.bias.float()
    assert torch.allclose(q(x).float(), ref, atol=0.05, rtol=0.02)


def test_retrain_replays_the_recorded_commands_into_the_work_folder_and_resumes(bench, tmp_path, monkeypatch) -> None:
    import argparse

    calls = []
    monkeypatch.setattr(bench.subprocess, "run", lambda cmd, **kw: calls.append(cmd[3:]))
    args = argparse.Namespace(family="sd3", work=tmp_path / "w", device="cuda", threads=2, max_seconds=None, retrain_text=False)
    bench.retrain(args)
    zoo = ROOT / "hpedge" / "zoo" / "models"
    record = json.loads((zoo / "train_record.json").read_text())
    assert "sd3-text" in record  # the committed digits-sd3: sd3-text's T5, frozen; not replayed unless --retrain-text
    assert len(calls) == 1 + len(record["sd3-continued"]) and calls[0][:5] == ["sd3", "--steps", "1800", "--seed", "0"]
    for argv in calls:
        assert argv[-6:] == ["--out", str(tmp_path / "w"), "--device", "cuda", "--threads", "2"]
        assert argv.count("--device") == 1  # a recorded --device is replaced, not repeated
        assert "--freeze-t5" in argv  # the T5 stays frozen in every stage
    assert calls[0][calls[0].index("--t5-from") + 1] == str(tmp_path / "w" / "text-sd3" / "text_encoder_3")
    assert all(argv[argv.index("--init-from") + 1] == str(tmp_path / "w" / "digits-sd3") for argv in calls[1:])
    assert (tmp_path / "w" / "vae" / "config.json").exists()
    t5 = Path("text-sd3", "text_encoder_3", "model.safetensors")
    assert (tmp_path / "w" / t5).read_bytes() == (zoo / t5).read_bytes()  # the committed T5, copied
    calls.clear()
    bench.retrain(args)  # every stage is in the progress file: nothing is replayed again
    assert calls == []
    with pytest.raises(SystemExit, match="committed text encoders is under way.*without --retrain-text"):
        bench.retrain(argparse.Namespace(**{**vars(args), "retrain_text": True}))


def test_retrain_of_flux_starts_from_the_committed_t5_unless_asked_and_refuses_mixing(bench, tmp_path, monkeypatch) -> None:
    import argparse

    calls = []
    monkeypatch.setattr(bench.subprocess, "run", lambda cmd, **kw: calls.append(cmd[3:]))
    ns = argparse.Namespace(family="flux", work=tmp_path / "c", device="cpu", threads=None, max_seconds=None, retrain_text=False)
    bench.retrain(ns)
    zoo = ROOT / "hpedge" / "zoo" / "models"
    record = json.loads((zoo / "train_record.json").read_text())
    assert len(calls) == 1 + len(record["flux-continued"]) and calls[0][0] == "flux"  # no T5 stage
    assert calls[0][calls[0].index("--t5-from") + 1] == str(tmp_path / "c" / "t5-flux")
    assert (tmp_path / "c" / "t5-flux" / "model.safetensors").read_bytes() == (zoo / "t5-flux" / "model.safetensors").read_bytes()
    with pytest.raises(SystemExit, match="committed text encoders is under way.*without --retrain-text"):
        bench.retrain(argparse.Namespace(**{**vars(ns), "retrain_text": True}))
    calls.clear()
    bench.retrain(argparse.Namespace(family="flux", work=tmp_path / "w", device="cpu", threads=None, max_seconds=None, retrain_text=True))
    record = json.loads((ROOT / "hpedge" / "zoo" / "models" / "train_record.json").read_text())
    assert len(calls) == 2 + len(record["flux-continued"])
    assert calls[0][0] == "flux-t5" and calls[1][0] == "flux"
    assert calls[1][calls[1].index("--t5-from") + 1] == str(tmp_path / "w" / "t5-flux") and "--freeze-t5" in calls[1]
    assert all("--freeze-t5" in argv for argv in calls[2:])  # the T5 stays frozen in every continued stage
    # the stages recorded on the GPU (--device cuda) replay on this run's device, named once
    assert all(argv[argv.index("--device") + 1] == "cpu" and argv.count("--device") == 1 for argv in calls)


def test_retrain_of_sd3_with_a_text_stage_starts_from_the_committed_encoders_and_keeps_them_frozen(bench, tmp_path, monkeypatch) -> None:
    """A record with an sd3-text stage (the recipe with sd3-text's T5, frozen), in a stand-in zoo: the replay copies
    the committed text-sd3 and points --t5-from at the copy's T5; --retrain-text replays sd3-text first. A stage that
    takes all three encoders (--text-from) is pointed at the copy likewise."""
    import argparse

    zoo = tmp_path / "zoo"
    for part in ("vae", "text-sd3/text_encoder", "text-sd3/text_encoder_2", "text-sd3/text_encoder_3"):
        (zoo / part).mkdir(parents=True)
        (zoo / part / "config.json").write_text("{}")
    cont = "python -m hpedge.zoo.train sd3 --steps 3 --seed 1 --freeze-t5 --init-from hpedge/zoo/models/digits-sd3"
    (zoo / "train_record.json").write_text(json.dumps({
        "sd3-text": {"command": "python -m hpedge.zoo.train sd3-text --steps 1000 --seed 0"},
        "sd3": {"command": "python -m hpedge.zoo.train sd3 --steps 5 --seed 0 --device cuda --t5-from "
                           "hpedge/zoo/models/text-sd3/text_encoder_3 --freeze-t5"},
        "sd3-continued": [{"command": cont}],
    }))
    patch_everywhere(monkeypatch, bench, "ZOO", zoo)
    calls = []
    monkeypatch.setattr(bench.subprocess, "run", lambda cmd, **kw: calls.append(cmd[3:]))
    ns = argparse.Namespace(family="sd3", work=tmp_path / "c", device="cpu", threads=None, max_seconds=None, retrain_text=False)
    bench.retrain(ns)
    assert [c[0] for c in calls] == ["sd3", "sd3"]  # no sd3-text stage
    assert calls[0][calls[0].index("--t5-from") + 1] == str(tmp_path / "c" / "text-sd3" / "text_encoder_3")
    assert all("--freeze-t5" in c and c[c.index("--device") + 1] == "cpu" for c in calls)
    assert calls[1][calls[1].index("--init-from") + 1] == str(tmp_path / "c" / "digits-sd3")
    assert (tmp_path / "c" / "text-sd3" / "text_encoder_3" / "config.json").exists()
    with pytest.raises(SystemExit, match="committed text encoders is under way.*without --retrain-text"):
        bench.retrain(argparse.Namespace(**{**vars(ns), "retrain_text": True}))
    calls.clear()
    bench.retrain(argparse.Namespace(**{**vars(ns), "work": tmp_path / "w", "retrain_text": True}))
    assert [c[0] for c in calls] == ["sd3-text", "sd3", "sd3"] and not (tmp_path / "w" / "text-sd3").exists()
    assert calls[1][calls[1].index("--t5-from") + 1] == str(tmp_path / "w" / "text-sd3" / "text_encoder_3")  # replayed
    record = json.loads((zoo / "train_record.json").read_text())
    record["sd3"]["command"] = "python -m hpedge.zoo.train sd3 --steps 5 --seed 0 --text-from hpedge/zoo/models/text-sd3 --freeze-text"
    (zoo / "train_record.json").write_text(json.dumps(record))
    calls.clear()
    bench.retrain(argparse.Namespace(**{**vars(ns), "work": tmp_path / "x"}))
    assert calls[0][calls[0].index("--text-from") + 1] == str(tmp_path / "x" / "text-sd3")
    with pytest.raises(SystemExit, match="not the recorded ones"):  # c's stages are of the record before the change
        bench.retrain(ns)
    record["sd3"]["command"] = "python -m hpedge.zoo.train sd3 --steps 5 --seed 0 --t5-from somewhere/else --freeze-t5"
    (zoo / "train_record.json").write_text(json.dumps(record))
    with pytest.raises(SystemExit, match="--t5-from names no text-sd3 folder"):
        bench.retrain(argparse.Namespace(**{**vars(ns), "work": tmp_path / "y"}))
    del record["sd3-text"]
    (zoo / "train_record.json").write_text(json.dumps(record))
    with pytest.raises(SystemExit, match="no sd3-text stage"):
        bench.retrain(argparse.Namespace(**{**vars(ns), "work": tmp_path / "z"}))


def test_ablation_records_refused_rows_and_runs_the_other_variants_on_hps_analysis(bench, tmp_path, monkeypatch) -> None:
    """FLUX's committed teacher: HPP cuts the last blocks and PWP refuses; the table says so and goes on."""
    from dataclasses import dataclass, field

    import hpedge.compress.pipeline as cp
    import hpedge.zoo.evaluate as ev
    from hpedge.models import loading

    @dataclass
    class Result:
        overall: float = 0.9
        frechet_distance: float = 300.0
        categories: dict = field(default_factory=lambda: {"two_digits": 0.7})

    calls = []

    def fake_compress(model, out, opts):  # the real order: analysis and plan written, then the PWP check
        calls.append((opts.budget.remove_blocks, opts.importance, opts.distill.pwp))
        removed = [9, 10, 11] if opts.budget.remove_fraction else [int(b) for b in opts.budget.remove_blocks.strip(",").split(",")]
        cp.work_dir(out).mkdir(parents=True)
        if opts.importance is None:
            (cp.work_dir(out) / "importance.json").write_text('{"entries": "the analysis"}')
        (cp.work_dir(out) / "plan.json").write_text(json.dumps({"remove": removed}))
        resolve_pwp(removed, 12, opts.distill)
        return {"removed_blocks": removed, "params": {"kept_ratio": 0.8}, "distill_seconds": 1.0}

    real_load = loading.load_pipeline
    monkeypatch.setattr(cp, "compress", fake_compress)
    monkeypatch.setattr(ev, "evaluate", lambda pipe, name, es: (Result(),))
    monkeypatch.setattr(ev, "paired_ratio", lambda t, s: {"ratio": 1.0, "ci95": [0.98, 1.02]})
    monkeypatch.setattr(loading, "load_pipeline", lambda m: real_load(m) if m.startswith("zoo:") else None)
    patch_everywhere(monkeypatch, bench, "RESULTS", tmp_path)
    bench.ablation(bench.argparse.Namespace(family="flux", steps=2, lr=1e-3, per_category=1))
    text = (tmp_path / "ablation-flux.md").read_text()
    for label in ("HierarchicalPrune (HPP + PWP + SGDistill)", "HP without SGDistill", "HP with the reference's binary SGDistill"):
        assert f"| {label} | [9, 10, 11] | - | refused |" in text and f"- {label}: refused by `hpedge compress`: PWP would" in text
    assert "| HP without PWP | [9, 10, 11] | 80.0% | 0.900 | 100.0% |" in text
    # every HP variant ran on the refused run's cut and its analysis; the baselines on their own cuts
    assert [c[0] for c in calls[1:4]] == ["9,10,11,"] * 3 and all(c[1] is not None for c in calls[1:4])
    assert len(calls) == 7 and text.count("refused |") == 3


def test_ratio_tolerance_names_the_scores_outside_it_from_the_recorded_flux_retrain(bench, tmp_path, monkeypatch) -> None:
    import argparse

    import hpedge.zoo.evaluate as ev
    from hpedge.models import loading

    # the recorded FLUX replay (--retrain-t5), judged by hand: overall -0.024 and size -0.12 outside, the rest within
    recorded = json.loads((ROOT / "benchmarks" / "results" / "ratio-retrain-t5-digits-flux.json").read_text())
    results = {m: ev.EvalResult(**recorded[role]) for role, m in (("teacher", "T"), ("student", "S"))}
    monkeypatch.setattr(loading, "load_pipeline", lambda m: m)
    monkeypatch.setattr(ev, "evaluate", lambda pipe, m, es: (results[m], None, None))
    patch_everywhere(monkeypatch, bench, "RESULTS", tmp_path)
    bench.ratio(argparse.Namespace(teacher="T", student="S", per_category=100, name="r", tolerance=True))
    out = json.loads((tmp_path / "ratio-r.json").read_text())["tolerance"]
    assert out["within"] is False
    assert [r["score"] for r in out["rows"] if not r["within"]] == ["overall", "size"]
    assert {r["score"]: r["difference"] for r in out["rows"]}["size"] == -0.12
    assert "**OUTSIDE**" in (tmp_path / "ratio-r.md").read_text()
    with pytest.raises(SystemExit, match="500-prompt"):  # the tolerance is not for a smaller, noisier prompt set
        bench.ratio(argparse.Namespace(teacher="T", student="S", per_category=40, name="r", tolerance=True))
    # a difference of exactly the tolerance is within it, though 0.71 - 0.81 is not -0.1 in floats
    c = {"overall": 0.90, "categories": {"size": 0.81}, "frechet_distance": 300.0}
    r = {"overall": 0.88, "categories": {"size": 0.71}, "frechet_distance": 310.0}
    assert all(row["within"] for row in bench.tolerance_rows(c, r))
    r["frechet_distance"] = 310.5
    assert [row["score"] for row in bench.tolerance_rows(c, r) if not row["within"]] == ["frechet_distance"]


def test_phrasing_split_of_the_earlier_sd3_retrain_puts_its_gap_in_held_out_counting(bench) -> None:
    recorded = json.loads((ROOT / "benchmarks" / "results" / "ratio-retrain-earlier-digits-sd3.json").read_text())
    t, s = bench.phrasing_split(recorded["teacher"]), bench.phrasing_split(recorded["student"])
    assert sum(v["seen"][1] + v["heldout"][1] for v in t.values()) == 500
    assert t["counting"]["heldout"] == [24, 25] and s["counting"]["heldout"] == [10, 25]
    assert sum(v["seen"][0] for v in t.values()) == round(recorded["teacher"]["seen_phrasings"] * 375)


def test_weight_distance_is_the_relative_l2_per_component_and_refuses_other_architectures(bench, tmp_path) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    ref = {"transformer": {"w": rng.standard_normal((4, 8)).astype(np.float16), "b": np.ones(8, np.float16)},
           "text_encoder": {"e": rng.standard_normal((5, 3)).astype(np.float16)}}
    moved = {c: dict(t) for c, t in ref.items()}
    moved["transformer"]["w"] = (ref["transformer"]["w"] * np.float16(1.5)).astype(np.float16)  # one tensor moved
    for folder, comps in (("a", ref), ("b", moved)):
        for comp, tensors in comps.items():
            (tmp_path / folder / comp).mkdir(parents=True)
            save_file(tensors, str(tmp_path / folder / comp / "model.safetensors"))
    rows = {r["component"]: r for r in bench.weight_distance(tmp_path / "a", tmp_path / "b")}
    assert set(rows) == {"transformer", "text_encoder"}
    w = ref["transformer"]["w"].astype(np.float64)
    d = moved["transformer"]["w"].astype(np.float64) - w
    expected = np.sqrt((d**2).sum() / ((w**2).sum() + 8))
    assert rows["transformer"]["identical"] == 1 and rows["transformer"]["tensors"] == 2
    assert abs(rows["transformer"]["relative_l2"] - expected) < 1e-12 and 0.3 < expected < 0.5
    assert rows["text_encoder"] == {"component": "text_encoder", "tensors": 1, "identical": 1, "relative_l2": 0.0}
    save_file({"e": np.zeros((5, 4), np.float16)}, str(tmp_path / "b" / "text_encoder" / "model.safetensors"))
    with pytest.raises(SystemExit, match="not the same architecture"):
        bench.weight_distance(tmp_path / "a", tmp_path / "b")


def test_size_records_each_stage_of_a_child_with_its_peak_memory(bench, tmp_path) -> None:
    import sys

    size = sys.modules["size"]
    code = ("import time, numpy as np\nprint('STAGE', time.time(), 'small', flush=True)\ntime.sleep(0.6)\n"
            "print('STAGE', time.time(), 'big', flush=True)\nx = np.ones(300_000_000 // 8)\ntime.sleep(0.8)\n"
            "print('RESULT {\"ok\": 1}')\n")
    stages, result, rc, _ = size.run_child(code, [], tmp_path / "log")
    assert rc == 0 and result == {"ok": 1} and [s["stage"] for s in stages] == ["small", "big"]
    assert stages[1]["peak_rss"] - stages[0]["peak_rss"] > 250e6  # the 300 MB array is seen in its own stage
    assert stages[1]["peak_anon"] - stages[0]["peak_anon"] > 250e6 and stages[1]["peak_anon"] <= stages[1]["peak_rss"]


def test_shipped_twice_names_files_with_the_same_content(bench, tmp_path) -> None:
    import sys

    size = sys.modules["size"]
    (tmp_path / "manifest.json").write_text(json.dumps({"files": {"a/model.onnx.data": "h1", "b/model.onnx.data": "h1",
                                                                  "c": "h2"}}))
    assert size.shipped_twice(tmp_path) == ["a/model.onnx.data, b/model.onnx.data"]


def test_quant_method_reads_each_int4_check_of_a_parity_report(bench, tmp_path) -> None:
    import sys

    qm = sys.modules["quant_method"]
    checks = [{"name": "transformer fp32: ONNX Runtime vs PyTorch", "metrics": {"max_abs": 0.0}},
              {"name": "transformer int4 (DequantizeLinear, fp16 compute) vs PyTorch", "metrics": {"min_cosine": 0.99}},
              {"name": "transformer int4_cpu (int8) vs PyTorch", "metrics": {"min_cosine": 0.98}},
              {"name": "end-to-end images: package (int4_cpu) vs stock diffusers", "metrics": {"min_psnr_db": 30.0}}]
    (tmp_path / "parity.json").write_text(json.dumps({"passed": True, "checks": checks}))
    assert qm._checks(tmp_path) == {"int4": {"min_cosine": 0.99}, "int4_cpu": {"min_cosine": 0.98}, "e2e": {"min_psnr_db": 30.0}}


def test_real_width_fixture_keeps_the_architectures_width() -> None:
    from hpedge.models.architectures import architecture
    from hpedge.testing import real_width_transformer_config

    real = architecture("sd3.5-medium")["transformer"]
    cfg = real_width_transformer_config("sd3.5-medium", 7)
    assert cfg["num_attention_heads"] * cfg["attention_head_dim"] == real["num_attention_heads"] * real["attention_head_dim"] == 1536
    assert cfg["num_layers"] == 7 and cfg["dual_attention_layers"] == list(range(4))  # 13 of 24 -> 4 of 7
    assert real_width_transformer_config("flux.1-dev", 2, 3)["num_single_layers"] == 3


def test_peer_summary_compares_int4_cpu_with_the_fastest_peer_on_the_pruned_graph(bench) -> None:
    import sys

    lat = sys.modules["latency"]
    row = lambda ms, b, cos: {"median_ms": ms, "bytes": b, "cosine": cos}  # noqa: E731
    m = {"original fp32": row(100.0, 400, 1.0), "int4_cpu": row(30.0, 50, 0.999),
         "original peer quantize_dynamic": row(40.0, 100, 0.999),  # faster than the pruned peers, but not on the pruned graph
         "pruned peer quantize_dynamic": row(45.0, 100, 0.998), "pruned peer MatMulNBits": row(60.0, 60, 0.997)}
    s = lat._peer_summary("m", m)
    assert "0.30x** (target <= 0.35x: met)" in s and "(pruned peer quantize_dynamic)" in s
    assert "latency 0.67x" in s and "file bytes 0.50x" in s and "0.99900 vs 0.99800" in s


def _curve_row(method, fraction, lr, overall, correct, cut, kept, status="ok"):
    from hpedge.zoo.evaluate import EvalSettings

    row = {"family": "sd3", "method": method, "fraction": fraction, "lr": lr, "steps": 600, "cut": cut, "status": status,
           "protect_early": 0.25, "jobs": 2, "date": "2026-12-02 22:00 UTC", "name": f"{method}-{fraction}-{lr}"}
    if status != "ok":
        return {**row, "why": "PWP would freeze every kept block"}
    settings = {**EvalSettings(per_category=2).__dict__}
    return {**row, "kept_ratio": kept, "distill_seconds": 100.0, "frozen_blocks_pwp": [0, 1, 2] if method == "hp" else [],
            "eval": {"overall": overall, "frechet_distance": 300.0, "correct": correct, "settings": settings, "samples": len(correct)}}


def test_curve_takes_each_methods_best_rate_and_says_whether_the_lead_is_outside_the_interval(bench, tmp_path, monkeypatch) -> None:
    """From rows on disk: the sweep picks each method's rate, the table and the PNG use those rows, the leader is named."""
    import sys

    from PIL import Image

    cur = sys.modules["curve"]
    patch_everywhere(monkeypatch, bench, "RESULTS", tmp_path)
    rows = tmp_path / "curve-sd3" / "rows"
    rows.mkdir(parents=True)
    teacher = [1] * 90 + [0] * 10
    (tmp_path / "curve-sd3" / "teacher.json").write_text(json.dumps({"eval": {
        "overall": 0.9, "frechet_distance": 280.0, "correct": teacher, "samples": 100,
        "settings": _curve_row("x", 0.4, 1e-3, 0.9, teacher, [], 1.0)["eval"]["settings"]}}))
    lose = lambda k: [1] * (90 - k) + [0] * (10 + k)  # noqa: E731  (loses k of the teacher's prompts)
    for r in (_curve_row("hp", 0.4, 3e-4, 0.80, lose(10), [3, 6, 9, 10, 8], 0.6),
              _curve_row("hp", 0.4, 1e-3, 0.89, lose(1), [3, 6, 9, 10, 8], 0.6),
              _curve_row("last-n-kd", 0.4, 3e-4, 0.70, lose(20), [6, 7, 8, 9, 10], 0.6),
              _curve_row("last-n-kd", 0.4, 1e-3, 0.60, lose(30), [6, 7, 8, 9, 10], 0.6),
              _curve_row("hp-no-sgd", 0.4, 3e-4, 0, [], [3, 6, 9, 10, 8], 0.6, status="refused"),
              _curve_row("hp-no-sgd", 0.4, 1e-3, 0, [], [3, 6, 9, 10, 8], 0.6, status="refused"),
              _curve_row("hp", 0.25, 1e-3, 0.90, teacher, [6, 9, 10], 0.75),
              _curve_row("hp", 0.25, 3e-4, 0.10, lose(80), [6, 9, 10], 0.75),  # not the chosen rate: not in the table
              _curve_row("no-distill", 0.4, None, 0.30, lose(60), [3, 6, 9, 10, 8], 0.6)):
        (rows / f"{r['name']}.json").write_text(json.dumps(r))
    assert cur.best_lrs(cur.load_rows("sd3"), 0.4, 600) == {"hp": 1e-3, "last-n-kd": 3e-4, "hp-no-sgd": 3e-4}
    cur.curve(bench.argparse.Namespace(family="sd3", fractions=[0.25, 0.4], sweep_fraction=0.4, steps=600,
                                       lrs=[3e-4, 1e-3], report_only=True))
    text = (tmp_path / "curve-sd3.md").read_text()
    sec40 = text.split("## 40% of the blocks removed")[1].split("##")[0]
    assert "| HierarchicalPrune (HPP + PWP + SGDistill) | [3, 6, 9, 10, 8] | 60.0% | 0.001 | 0.890 | 98.9% |" in sec40
    assert "| last-N removal + plain KD | [6, 7, 8, 9, 10] | 60.0% | 0.0003 | 0.700 |" in sec40 and "0.600" not in sec40
    assert "| HP without SGDistill | [3, 6, 9, 10, 8] | - | 0.0003 | refused |" in sec40
    assert "**Leader: HierarchicalPrune (HPP + PWP + SGDistill)**, 21.1% of the teacher ahead of last-N" in sec40
    assert "outside the paired interval" in sec40 and "Not run yet at 40%: HP without PWP" in sec40
    # which row `hpedge compress` gives by default there (its PWP default on HP's cut; digits-sd3 has 12 blocks)
    assert ("`hpedge compress`'s default at this cut: PWP on (hpedge's default): freezes kept blocks 0-2; 4 kept block(s) "
            "after the first removed block 3 train for 5 removed") in sec40
    assert 'that is the row "HierarchicalPrune (HPP + PWP + SGDistill)"' in sec40
    sec25 = text.split("## 25% of the blocks removed")[1].split("##")[0]
    assert "PWP on (hpedge's default): freezes kept blocks 0-5; 3 kept block(s)" in sec25
    assert "0.100" not in sec25 and "Leader: too few rows" in sec25
    assert "| HierarchicalPrune (HPP + PWP + SGDistill) | 0.800 | **0.890** |" in text  # the sweep, chosen rate in bold
    assert Image.open(tmp_path / "curve-sd3.png").size == (900, 560)


def test_every_results_file_says_its_command_machine_date_and_commit(bench, tmp_path, monkeypatch) -> None:
    import subprocess
    import sys

    common = sys.modules["common"]
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    head = common.header("t")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    for field in ("- command: `python", "- machine: ", "- date: 20", f"- commit: {commit}"):
        assert field in head, head
    common.write_json("x.json", {"rows": [1]})
    data = json.loads((tmp_path / "x.json").read_text())
    assert data["rows"] == [1] and set(data["provenance"]) == {"command", "machine", "date", "commit"}
    assert data["provenance"]["commit"].startswith(commit)


def _sparsity_row(component, method, fraction, correct, teacher, distilled=False):
    from hpedge.zoo.evaluate import paired_ratio

    result = {"overall": sum(correct) / len(correct), "correct": correct, "settings": {"per_category": 20}}
    return {"component": component, "fraction": fraction, "method": method, "spec": "x", "distilled": distilled,
            "pattern": "2:4" if "2:4" in component else "unstructured", "steps": 600, "lr": 1e-3, "removed_blocks": [6],
            "result": result, "paired": paired_ratio(teacher, result), "psnr_min": 12.0, "psnr_mean": 20.0,
            "achieved": {}, "seconds": 1.0}


def test_sparsity_report_finds_a_sudden_collapse_names_the_leader_and_pairs_distilled_rows(bench, tmp_path, monkeypatch) -> None:
    """From synthetic rows: the transformer holds the teacher's score to 40 % and falls below half at 50 % (sudden);
    the text encoders fade slowly (not sudden); magnitude leads Wanda outside the interval where it is far ahead; a
    distilled row is compared with its undistilled pair."""
    import sys

    from PIL import Image

    sp = sys.modules["sparsity"]
    patch_everywhere(monkeypatch, bench, "RESULTS", tmp_path)
    teacher = {"overall": 0.9, "samples": 100, "correct": [1] * 90 + [0] * 10, "settings": {"per_category": 20}}
    keep = lambda k: [1] * k + [0] * (100 - k)  # noqa: E731  (k of the teacher's 90 prompts kept)
    transformer = {0.3: 90, 0.4: 88, 0.5: 30, 0.6: 5}
    text = {0.3: 88, 0.4: 80, 0.5: 70, 0.6: 40}
    rows = [_sparsity_row("transformer", m, f, keep(k if m == "magnitude" else max(k - 20, 0)), teacher)
            for f, k in transformer.items() for m in ("magnitude", "wanda")]
    rows += [_sparsity_row("text", m, f, keep(k), teacher) for f, k in text.items() for m in ("magnitude", "wanda")]
    rows += [_sparsity_row("2:4", "magnitude", 0.5, keep(20), teacher), _sparsity_row("2:4+kd", "magnitude", None, keep(80),
                                                                                      teacher, distilled=True)]
    args = bench.argparse.Namespace(family="sd3", per_category=20)
    sp._report(args, "zoo:digits-sd3", teacher, rows, __import__("hpedge.zoo.evaluate", fromlist=["x"]).paired_difference)
    md = (tmp_path / "sparsity-sd3.md").read_text()
    claims = json.loads((tmp_path / "sparsity-sd3.json").read_text())["claims"]
    assert claims["collapse"]["transformer/magnitude"] == {"last_95": 0.4, "first_below_50": 0.5, "sudden": True}
    assert claims["collapse"]["text/magnitude"] == {"last_95": 0.3, "first_below_50": 0.6, "sudden": False}
    lead = {(c["component"], c["fraction"]): c["leader"] for c in claims["magnitude_vs_wanda"]}
    assert lead[("transformer", 0.3)] == "magnitude" and lead[("text", 0.3)].startswith("tie")
    assert "| transformer | magnitude | 40% (97.8%," in md
    assert "| transformer 2:4 | magnitude | yes | 88.9% (" in md and "| +66.7% (" in md  # 80 vs 20 of 90 prompts
    assert Image.open(tmp_path / "sparsity-sd3.png").size == (900, 560)


def test_vq_benchmark_scalar_rows_are_the_exports_int4_and_a_true_int3(bench) -> None:
    """INT4 is the export's own round-to-nearest; INT3 keeps 8 levels per block of 128 and errs more than INT4."""
    import sys

    import numpy as np

    from hpedge.export.quantize import rtn_int4

    vq = sys.modules["vq"]
    w = np.random.default_rng(0).standard_normal((256, 16)).astype(np.float32)
    q, s = rtn_int4(w.astype(np.float16), 128)
    np.testing.assert_array_equal(vq._scalar(w, 4), q.astype(np.float32) * np.repeat(s.astype(np.float32), 128, axis=0))
    w3 = vq._scalar(w, 3)
    for blk in w3.reshape(2, 128, 16).transpose(0, 2, 1).reshape(-1, 128):
        assert len(np.unique(blk)) <= 8
    err = lambda a: np.linalg.norm(a - w) / np.linalg.norm(w)  # noqa: E731
    assert err(vq._scalar(w, 4)) < err(w3) < 0.3


def test_vq_engine_builds_dense_int4_and_codebook_engines_and_reports_their_ratios(bench, tmp_path, monkeypatch) -> None:
    import sys

    from hpedge.backends import trt_rtx

    if not trt_rtx.build_availability(("8.9",)).ok:
        pytest.skip("TensorRT-RTX cannot build here")
    common = sys.modules["common"]
    patch_everywhere(monkeypatch, bench, "RESULTS", tmp_path)
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    args = bench.argparse.Namespace(width=256, layers=1, tokens=128, formats=["2x8g8"], target="rtx4090", name="e")
    sys.modules["vq_engine"].vq_engine(args)
    rows = json.loads((tmp_path / "e.json").read_text())["rows"]
    assert [r["graph"] for r in rows] == ["dense fp16", "INT4 (RTN, block 128)", "VQ 2x8g8 (codebook lookups)"]
    assert rows[0]["engine_vs_dense_engine"] == 1.0 and all(r["engine_bytes"] > 0 for r in rows)
    assert rows[2]["onnx_bytes"] < rows[0]["onnx_bytes"]


@pytest.mark.parametrize("digits", [True, False])
def test_vq_report_tables_and_plots_digits_and_psnr_rows(bench, tmp_path, monkeypatch, digits) -> None:
    import sys

    from hpedge.zoo.evaluate import paired_ratio

    vq = sys.modules["vq"]
    patch_everywhere(monkeypatch, bench, "RESULTS", tmp_path)
    monkeypatch.setattr(sys.modules["common"], "RESULTS", tmp_path)
    base = {"overall": 0.9, "correct": [1] * 9 + [0], "settings": {"per_category": 2, "steps": 16}}
    worse = {"overall": 0.8, "correct": [1] * 8 + [0, 0], "settings": base["settings"]}
    rows = [{"row": "fp32 student", "bits_per_weight": 32.0, "result": base if digits else None,
             "paired": paired_ratio(base, base) if digits else None, "psnr_min": 200.0, "psnr_mean": 200.0}]
    for name, bits, steps in (("INT4 AWQ-clip, block 128", 4.125, 0), ("VQ 3bit (3x8g8)", 3.2, 0), ("VQ 3bit, tuned", 3.2, 600)):
        rows.append({"row": name, "bits_per_weight": bits, "layer_bytes": 1000, "weights": 2000, "steps": steps,
                     "result": worse if digits else None, "paired": paired_ratio(base, worse) if digits else None,
                     "psnr_min": 20.0, "psnr_mean": 25.0, "quant_seconds": 1.0})
    args = bench.argparse.Namespace(family="sd3" if digits else "midsize", steps=600, lr=[1e-3])
    vq._report(args, rows, {"int4": {"onnx_bytes": 10**6, "median_ms": 5.0, "peak_rss_mb": 100.0}})
    name = "vq-sd3" if digits else "vq-midsize"
    md = (tmp_path / f"{name}.md").read_text()
    assert ("88.9 %" in md) == digits and "| VQ 3bit, tuned | 3.20 |" in md and "| int4 | 1.00 | 5.0 | 100 |" in md
    assert ("| +0.0 % (+0.0 to +0.0) |" in md) == digits  # each row's lead over INT4 AWQ-clip (here: the same verdicts)
    assert (tmp_path / f"{name}.png").stat().st_size > 0


def test_fp8_probe_graph_runs_in_onnxruntime_close_to_its_numpy_fake_quantization(bench, tmp_path) -> None:
    """The FP8 Q/DQ graph ONNX Runtime's CPU provider runs computes the E4M3 fake quantization the reference does
    (fp16 arithmetic in the graph: close, not exact) and differs from the float32 computation."""
    import sys

    import numpy as np

    from hpedge.backends import ort

    probe = sys.modules["fp8_probe"]
    rng = np.random.default_rng(0)
    w = [rng.standard_normal((64, 64)).astype(np.float32) / 8 for _ in range(2)]
    x = rng.standard_normal((1, 32, 64)).astype(np.float32)
    amax = [float(np.abs(x).max()), float(np.abs(np.maximum(x @ w[0], 0)).max())]
    paths = probe._graphs(64, w, amax, tmp_path)
    y = ort.run(ort.session(paths["fp8"], "cpu"), {"x": x})[0]
    ref = probe._reference(x, w, amax)
    exact = np.maximum(np.maximum(x @ w[0], 0) @ w[1], 0)
    assert np.abs(y - ref).max() < 0.02 * np.abs(ref).max()
    assert np.abs(y - ref).max() < np.abs(ref - exact).max() / 4  # nearer its reference than to float32 (measured 9x)


def test_precision_report_puts_every_precision_side_by_side(bench, tmp_path, monkeypatch) -> None:
    import sys

    from hpedge.zoo.evaluate import paired_ratio

    precision = sys.modules["precision"]
    patch_everywhere(monkeypatch, bench, "RESULTS", tmp_path)
    monkeypatch.setattr(sys.modules["common"], "RESULTS", tmp_path)
    base = {"overall": 0.9, "correct": [1] * 9 + [0]}
    worse = {"overall": 0.8, "correct": [1] * 8 + [0, 0]}
    rows = {}
    for p, eng in (("int4", {"rtx3060": {"engine_bytes": 2e6}, "rtx4090": {"engine_bytes": 2e6},
                             "rtx5090": {"engine_bytes": 2e6}}),
                   ("nvfp4", {"rtx3060": {"runs": False}, "rtx4090": {"runs": False}, "rtx5090": {"engine_bytes": 3e6}})):
        rows[p] = {"precision": p, "graph_bytes": 10**6, "engines": eng, "parity_passed": p == "int4",
                   "checks": {"quality": {"min_cosine": 0.99, "min_psnr_db": 30.0}, "implementation": {"min_psnr_db": 45.0},
                              "e2e": {"min_psnr_db": 20.0, "mean_psnr_db": 30.0}},
                   "digits": worse, "vs_fp32": paired_ratio(base, worse),
                   "ort_cpu": {"median_ms": 5.0, "variant": "int4_cpu"} if p == "int4" else "not run: no FP4 kernels"}
    rows["int4"]["fp32_digits"] = base
    precision._report(bench.argparse.Namespace(family="sd3"), rows)
    md = (tmp_path / "precision-sd3.md").read_text()
    assert "| int4 | 1.00 | 2.0 / 2.0 / 2.0 |" in md and "| nvfp4 | 1.00 | - / - / 3.0 |" in md
    assert "88.9 %" in md and "5.0 (int4_cpu)" in md and "FAILED" in md and "digits score 0.900" in md
