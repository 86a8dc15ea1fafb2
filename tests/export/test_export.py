"""Export of small random-weight pipelines: package contents, parity gate, check, runtime, errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from hpedge.cli import app
from hpedge.errors import HpedgeError
from hpedge.export.export import ExportOptions, export
from hpedge.export.verify import check

runner = CliRunner()


def test_package_contents(sd3_package) -> None:
    m = json.loads((sd3_package / "manifest.json").read_text())
    assert m["schema"] == "hpedge-package/2"
    assert m["parity"]["passed"] and not m["parity"]["overridden"]
    e = m["engines"]  # rtx4090: TensorRT-RTX engines built here, on a host without a GPU
    assert e["status"] == "built" and e["library"] == "tensorrt_rtx" and e["compute_capabilities"] == ["8.9"]
    assert set(e["components"]) == {"text_clip", "text_t5", "transformer", "vae_decoder"}
    for name, c in e["components"].items():
        assert c["file"] in m["files"] and (sd3_package / c["file"]).stat().st_size == c["engine_bytes"] > 0
        assert c["library"] == "tensorrt_rtx" and c["version"] and c["cache_key"] in c["file"] and c["onnx_weight_bytes"] > 0
        assert c["onnx"] in m["files"] and c["build_seconds"] >= 0 and c["cache"] in ("hit", "miss")
    tr = e["components"]["transformer"]["shapes"]
    assert tr["hidden_states"]["max"][0] == 8 and tr["hidden_states"]["min"][0] == 1  # SD3: CFG doubles rtx4090's batch 4
    assert e["components"]["text_t5"]["shapes"] == {"t5_ids": {"min": [1, 16], "opt": [2, 16], "max": [8, 16]}}
    assert set(e["components"]["text_clip"]["shapes"]) == {"clip_ids", "clip2_ids"}
    assert e["components"]["vae_decoder"]["shapes"]["latents"]["max"][0] == 4
    assert e["parity"] == {"run": False, "reason": e["parity"]["reason"]} and "not run: no RTX GPU" in e["parity"]["reason"]
    assert "rtxcache" in e["runtime_cache"]
    b = m["components"]["transformer"]["bytes"]
    assert set(b) == {"int4", "int4_cpu"}  # the fp32 export is not shipped unless asked for
    t = m["components"]["transformer"]
    assert t["storage"] == "float32" and t["fp32_check"] == "fp32 graph"  # small: the exact float32 graph is checked
    assert b["int4"] <= 0.3 * m["components"]["transformer"]["fp32_bytes"]
    assert len(m["int4"]["quantized"]) > 50
    assert all("multiple of the block size" in r or "pattern" in r for r in m["int4"]["excluded"].values())
    q = json.loads((sd3_package / "quant_report.json").read_text())
    assert q["layer_error"] and max(q["layer_error"].values()) < 0.3
    assert set(m["files"]) >= {"transformer/int4/model.onnx", "transformer/int4_cpu/model.onnx", "text/clip/model.onnx",
                               "text/t5/model.onnx",
                               "vae_decoder/model.onnx", "parity.json", "quant_report.json", "parity/reference.safetensors"}
    assert not [f for f in m["files"] if f.startswith(("transformer/fp32", ".work"))]
    assert not (sd3_package / ".work").exists() and not (sd3_package / "transformer" / "fp32").exists()
    io = m["components"]["transformer"]["io"]["inputs"]
    assert io["hidden_states"]["min"][0] == 1 and io["hidden_states"]["max"][0] == 4  # rtx4090 batch range
    assert m["int4"]["compute"] == "fp16" and q["compute"] == "fp16" and m["int4"]["cpu_source"] == "int4"


def test_int4_cpu_is_made_from_the_4bit_weights_of_the_tensorrt_input(sd3_package) -> None:
    """One quantization: int4_cpu's int8 weights are the fp16 int4 graph's nibbles and scales, converted."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from hpedge.export.cpu_int4 import int8_weight

    gpu = onnx.load(str(sd3_package / "transformer" / "int4" / "model.onnx"))
    inits = {i.name: i for i in gpu.graph.initializer}
    want = []
    for n in gpu.graph.node:
        if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None and inits[n.input[0]].data_type == TensorProto.INT4:
            block = next(helper.get_attribute_value(a) for a in n.attribute if a.name == "block_size")
            scale = numpy_helper.to_array(inits[n.input[1]]).astype(np.float16).astype(np.float32)
            want.append(int8_weight(numpy_helper.to_array(inits[n.input[0]]), scale, block)[0].tobytes())
    cpu = onnx.load(str(sd3_package / "transformer" / "int4_cpu" / "model.onnx"))
    got = [numpy_helper.to_array(i).tobytes() for i in cpu.graph.initializer if i.data_type == TensorProto.INT8 and len(i.dims) == 2]
    assert want and sorted(want) == sorted(got)


def test_tensorrt_input_computes_in_fp16_with_float32_io(sd3_package) -> None:
    """The engine is strongly typed, so the int4 graph's types are what TensorRT runs: fp16 GEMMs and fp16
    scales, behind the same float32 inputs and output as every other variant."""
    import onnx
    from onnx import TensorProto

    def types(variant: str):
        model = onnx.shape_inference.infer_shapes(onnx.load(str(sd3_package / "transformer" / variant / "model.onnx")))
        g = model.graph
        elem = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}
        inits = {i.name: i.data_type for i in g.initializer}
        mm = [elem.get(n.output[0]) for n in g.node if n.op_type == "MatMul"]
        scales = [inits[n.input[1]] for n in g.node if n.op_type == "DequantizeLinear" and n.input[1] in inits]
        io = [elem[v.name] for v in [*g.input, *g.output]]
        return mm, scales, io

    mm, scales, io = types("int4")
    assert len(mm) > 50 and set(mm) == {TensorProto.FLOAT16}
    assert len(scales) > 50 and set(scales) == {TensorProto.FLOAT16}
    assert set(io) == {TensorProto.FLOAT}


def test_fp32_reference_is_shipped_on_request(random_sd3, tmp_path) -> None:
    out = tmp_path / "pkg"
    m = export(str(random_sd3), out, ExportOptions(target="rtx4090", method="rtn", calibration_prompts=1, e2e_samples=1,
                                                  compute="fp32", fp32_reference=True, engine="skip",
                                                  precision="int4"))
    assert set(m["components"]["transformer"]["variants"]) == {"fp32", "int4", "int4_cpu"}
    t = m["components"]["transformer"]
    assert t["bytes"]["fp32"] >= t["fp32_bytes"] > 0.95 * t["bytes"]["fp32"]  # 4 bytes a parameter, and the graph
    assert t["fp32_check"] == "fp32 graph"
    assert m["int4"]["compute"] == "fp32" and not (out / ".work").exists()
    r = check(out)
    names = [c["name"] for c in r["checks"]]
    assert [n.split()[0] for n in names if not n.startswith("implementation")][:3] == ["fp32", "int4", "int4_cpu"]
    assert r["passed"] and sum(n.startswith("implementation: transformer int4") for n in names) == 2


def test_a_bfloat16_checkpoint_is_held_in_bfloat16_and_checked_through_the_widened_fp16_graph(random_sd3, tmp_path,
                                                                                                monkeypatch) -> None:
    """Published SD3.5 / FLUX.1 checkpoints store the transformer in bfloat16: the export keeps it so (2 bytes a
    parameter) and computes in float32, which is what stock diffusers does with that checkpoint in float32. Above
    the size limit (patched to 0 here) no float32 graph is exported: the fp16 graph widened to float32 is checked."""
    import shutil

    import torch
    from diffusers import SD3Transformer2DModel

    from hpedge.export import export as export_module

    monkeypatch.setattr(export_module, "FP32_CHECK_GRAPH_LIMIT", 0)

    folder = tmp_path / "bf16"
    shutil.copytree(random_sd3, folder)
    t = SD3Transformer2DModel.from_pretrained(random_sd3, subfolder="transformer")
    t.to(torch.bfloat16).save_pretrained(folder / "transformer")
    from transformers import T5EncoderModel  # T5 stored in fp16, as SD3.5 publishes it: held so, computed in float32

    T5EncoderModel.from_pretrained(random_sd3 / "text_encoder_3").half().save_pretrained(folder / "text_encoder_3")
    seen = {}
    real_text = export_module._export_text

    def spy(run, *a):  # T5 as the export holds it while prompts are encoded
        seen["t5"] = next(run.pipe.text_encoder_3.parameters()).dtype
        return real_text(run, *a)

    monkeypatch.setattr(export_module, "_export_text", spy)
    m = export(str(folder), tmp_path / "pkg", ExportOptions(target="rtx4090", method="rtn", calibration_prompts=1,
                                                            e2e_samples=1, engine="skip", precision="int4"))
    assert seen["t5"] == torch.float16
    assert m["components"]["transformer"]["storage"] == "bfloat16" and m["parity"]["passed"]
    assert m["components"]["transformer"]["fp32_check"].startswith("fp16 graph widened to float32")
    assert any("widened" in name for name in m["parity"]["checks"])
    assert max(m["components"]["transformer"]["fresh_input_max_abs_error"].values()) < 1e-4


def test_check_passes_then_detects_tampering(sd3_package, tmp_path) -> None:
    import shutil

    r = check(sd3_package)
    assert r["passed"] and [c["name"] for c in r["checks"][:4]] == [
        "int4 vs PyTorch (stored reference)",
        "implementation: transformer int4 vs PyTorch with the same dequantized weights (its float32 view)",
        "int4_cpu vs PyTorch (stored reference)",
        "implementation: transformer int4_cpu vs PyTorch with the same dequantized weights and activation quantization"]
    engines = [c for c in r["checks"] if "engine" in c["name"]]
    assert len(engines) == 4 and all(c["skipped"] and "built here; not run: no RTX GPU" in c["name"] for c in engines)
    pkg = tmp_path / "p"
    shutil.copytree(sd3_package, pkg)
    out = runner.invoke(app, ["check", str(pkg)])
    assert out.exit_code == 0 and out.output.count("skip") == 4 and "not run: no RTX GPU" in out.output
    f = pkg / "transformer" / "int4" / "model.onnx"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    r = runner.invoke(app, ["check", str(pkg)])
    assert r.exit_code == HpedgeError.CHECK_FAILED and "transformer/int4/model.onnx" in r.output
    shutil.rmtree(pkg)
    shutil.copytree(sd3_package, pkg)
    m = json.loads((pkg / "manifest.json").read_text())
    m["target"]["memory_gb"] = 48
    (pkg / "manifest.json").write_text(json.dumps(m))
    r = runner.invoke(app, ["check", str(pkg)])
    assert r.exit_code == HpedgeError.CHECK_FAILED and "manifest.json" in r.output
    assert runner.invoke(app, ["check", str(tmp_path / "nothing")]).exit_code == HpedgeError.USAGE


def test_onnx_files_load_without_hpedge(sd3_package) -> None:
    code = (
        "import sys, numpy as np, onnxruntime as ort\n"
        "for p in sys.argv[1:]:\n"
        "    s = ort.InferenceSession(p, providers=['CPUExecutionProvider'])\n"
        "    print(p, [i.name for i in s.get_inputs()])\n"
    )
    files = [str(sd3_package / f) for f in ("transformer/int4_cpu/model.onnx", "transformer/int4/model.onnx",
                                             "text/clip/model.onnx", "text/t5/model.onnx", "vae_decoder/model.onnx")]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-I", "-c", code, *files], capture_output=True, text=True, env=env, cwd="/")
    assert r.returncode == 0, r.stderr
    import shutil

    poly = shutil.which("polygraphy") or str(Path(sys.executable).with_name("polygraphy"))
    io = json.loads((sd3_package / "manifest.json").read_text())["components"]["transformer"]["io"]["inputs"]
    shapes = [f"{k}:{v['opt']}".replace(" ", "") for k, v in io.items()]
    r = subprocess.run([poly, "run", files[1], "--onnxrt", "--input-shapes", *shapes], capture_output=True, text=True)
    assert r.returncode == 0 and "PASSED" in r.stdout + r.stderr, r.stdout[-2000:] + r.stderr[-2000:]


def test_runtime_generates_without_torch(sd3_package, tmp_path) -> None:
    code = (
        "import sys\n"
        "from hpedge.runtime import Package\n"
        "img = Package(sys.argv[1]).generate(['a 3 on the left'], seed=1, steps=3)\n"
        "assert img.shape == (1, 32, 32) and 0 <= img.min() and img.max() <= 1\n"
        "print('torch' in sys.modules, 'diffusers' in sys.modules, 'modelopt' in sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(sd3_package)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "False", "False"]
    out = tmp_path / "img.png"
    r = runner.invoke(app, ["generate", str(sd3_package), "two 5s", "-o", str(out), "--steps", "3"])
    assert r.exit_code == 0 and out.read_bytes()[:4] == b"\x89PNG"


def test_runtime_refuses_incomplete_package_before_compute(sd3_package, tmp_path) -> None:
    import shutil

    from hpedge.runtime import Package

    pkg = tmp_path / "p"
    shutil.copytree(sd3_package, pkg)
    (pkg / "vae_decoder" / "model.onnx").unlink()
    with pytest.raises(HpedgeError, match="vae_decoder/model.onnx is missing"):
        Package(pkg)
    (pkg / "vae_decoder" / "model.onnx").write_bytes(b"garbage")
    with pytest.raises(HpedgeError, match="ONNX Runtime cannot load"):
        Package(pkg, verify=False).decode(np.zeros((1, 4, 16, 16), np.float32))


def test_export_errors(random_sd3, tmp_path) -> None:
    def err(*args):
        r = runner.invoke(app, ["export", *args])
        assert r.exit_code != 0 and "Traceback" not in r.output
        return r.output

    turing = json.loads((Path(__file__).resolve().parents[2] / "hpedge" / "profiles" / "rtx3060.json").read_text())
    turing.update(name="rtx2080", compute_capability="7.5", engine={"library": "tensorrt_rtx", "compute_capabilities": ["7.5"]})
    (tmp_path / "turing.json").write_text(json.dumps(turing))
    out = err(str(random_sd3), "--target", str(tmp_path / "turing.json"), "-o", str(tmp_path / "a"))
    assert "cannot compile int4 for Turing (sm_75)" in out and "--engine skip" in out and len(out.strip().splitlines()) <= 3
    assert "built on the device" in err(str(random_sd3), "--target", "jetson-orin-nano-8gb", "-o", str(tmp_path / "b"),
                                        "--engine", "require")
    prof = json.loads((Path(__file__).resolve().parents[2] / "hpedge" / "profiles" / "rtx3060.json").read_text())
    prof["precisions"] = ["fp32", "fp16"]
    (tmp_path / "noint4.json").write_text(json.dumps(prof))
    assert "cannot run INT4" in err(str(random_sd3), "--target", str(tmp_path / "noint4.json"), "-o", str(tmp_path / "c"))
    assert "not a diffusers pipeline" in err(str(tmp_path), "--target", "rtx4090", "-o", str(tmp_path / "d"))
    assert "--cpu-kernel must be one of int8, nbits" in err(str(random_sd3), "--target", "rtx4090", "-o",
                                                           str(tmp_path / "d"), "--cpu-kernel", "fp8")
    assert "--compute must be one of fp32, fp16" in err(str(random_sd3), "--target", "rtx4090", "-o", str(tmp_path / "d"),
                                                       "--compute", "bf16")
    prof["precisions"], prof["transformer_precisions"] = ["fp32", "int4"], ["int4"]
    (tmp_path / "nofp16.json").write_text(json.dumps(prof))
    assert "cannot compute in fp16" in err(str(random_sd3), "--target", str(tmp_path / "nofp16.json"), "-o", str(tmp_path / "d"))
    (tmp_path / "afile").write_text("x")
    assert "cannot write" in err(str(random_sd3), "--target", "rtx4090", "-o", str(tmp_path / "afile" / "pkg"))
    for name in "abcd":
        assert not (tmp_path / name).exists()


def test_parity_failure_writes_no_package(random_sd3, tmp_path) -> None:
    prof = json.loads((Path(__file__).resolve().parents[2] / "hpedge" / "profiles" / "rtx4090.json").read_text())
    prof["parity"]["int4_min_psnr_db"] = 200.0  # impossible for 4-bit weights
    (tmp_path / "strict.json").write_text(json.dumps(prof))
    out = tmp_path / "pkg"
    with pytest.raises(HpedgeError, match="parity failed") as e:
        export(str(random_sd3), out, ExportOptions(target=str(tmp_path / "strict.json"), method="rtn",
                                                  calibration_prompts=1, e2e_samples=1, engine="skip", precision="int4"))
    assert e.value.exit_code == HpedgeError.CHECK_FAILED
    assert not out.exists() and (tmp_path / "pkg.parity.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pkg")]


def test_int4_size_formula_matches_the_exported_weights(sd3_package, random_sd3) -> None:
    """The planner's INT4 formula, with the export's precisions, equals the INT4 ONNX weights (+ buffers)."""
    import onnx

    from hpedge.models.adapters import int4_bytes
    from hpedge.models.loading import load_transformer

    model = onnx.load(str(sd3_package / "transformer" / "int4" / "model.onnx"))
    size = {1: 4.0, 10: 2.0, 22: 0.5, 7: 8.0, 6: 4.0}
    weights = sum(size.get(i.data_type, 4.0) * int(np.prod(i.dims or [1])) for i in model.graph.initializer)
    # the TensorRT input computes in fp16: unquantized weights and DequantizeLinear scales are fp16
    formula = int4_bytes(load_transformer(str(random_sd3)), other_bytes=2, scale_bytes=2)
    assert abs(weights - formula) / formula < 0.05, (weights, formula)


def test_position_table_is_exported_as_two_exact_factors(sd3_package, random_sd3) -> None:
    """SD3's (max, max, D) sin-cos table leaves the file; its two (max, D) factors rebuild it bit for bit."""
    import onnx
    import torch

    from hpedge.export.onnx_export import separable_factors
    from hpedge.models.loading import load_transformer

    t = load_transformer(str(random_sd3))
    size = t.config.pos_embed_max_size
    table = t.pos_embed.pos_embed.reshape(size, size, -1)
    rows, cols = separable_factors(table)
    assert torch.equal(rows[:, None] + cols[None], table)
    assert separable_factors(torch.randn(size, size, table.shape[-1])) is None  # a user's own table stays whole
    from onnx import numpy_helper

    def holds(arrays, x) -> bool:  # the whole table, in fp32 or fp16
        return any(np.allclose(a.reshape(x.shape).astype(np.float32), x, atol=1e-3)
                   for a in arrays if a.size == x.size)

    def factor_pair(arrays, x) -> bool:  # two (max, D) tensors whose broadcast sum is the table
        f = [a.reshape(x.shape[1:]).astype(np.float32) for a in arrays if a.size == x.shape[0] * x.shape[2]]
        return any(np.allclose(a[:, None] + b[None], x, atol=1e-3) for a in f for b in f)

    for variant in ("int4_cpu", "int4"):
        model = onnx.load(str(sd3_package / "transformer" / variant / "model.onnx"))
        tensors = [*model.graph.initializer, *(a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value")]
        arrays = [numpy_helper.to_array(i) for i in tensors if i.data_type in (1, 10)]  # initializers and Constant nodes
        assert not holds(arrays, table.numpy()), variant
        assert factor_pair(arrays, table.numpy()), variant  # the factors are there instead
    # (both variants come from the fp16 export, where the lowest frequencies round to constants, so the fp16
    # split can differ from torch's; its sum cannot)
    # the exported transformer (parity-checked against torch) is unchanged and torch's model is restored
    assert t.pos_embed.cropped_pos_embed.__func__ is type(t.pos_embed).cropped_pos_embed


def _weight_bytes(path: Path) -> float:
    import onnx

    size = {1: 4.0, 10: 2.0, 22: 0.5, 3: 1.0, 7: 8.0, 6: 4.0}  # float, float16, int4, int8, int64, int32
    return sum(size.get(i.data_type, 4.0) * int(np.prod(i.dims or [1])) for i in onnx.load(str(path)).graph.initializer)


def test_text_encoders_and_vae_ship_at_the_profiles_precision(sd3_package) -> None:
    """CLIP graph computes in fp16, T5's weights are INT8 (auto: the package fits with them), VAE decoder fp16; their
    parity is in parity.json, and the footprint the planner counts is what the files hold."""
    import onnx
    from onnx import TensorProto

    m = json.loads((sd3_package / "manifest.json").read_text())
    text = m["components"]["text"]
    assert text["encoders"]["clip"]["precision"] == "fp16" and text["encoders"]["t5"]["precision"] == "int8"
    assert m["components"]["vae_decoder"]["precision"] == "fp16" and not text["t5_dropped"]
    assert m["memory"]["precisions"] == {"transformer": "int4", "clip": "fp16", "t5": "int8", "vae_decoder": "fp16"}
    assert m["memory"]["fits"] and m["memory"]["residency"] == "resident"
    for rel in ("text/clip/model.onnx", "vae_decoder/model.onnx"):
        model = onnx.shape_inference.infer_shapes(onnx.load(str(sd3_package / rel)))
        elem = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
        kinds = {elem.get(n.output[0]) for n in model.graph.node if n.op_type in ("MatMul", "Conv")}
        assert kinds == {TensorProto.FLOAT16}, rel
    t5 = onnx.load(str(sd3_package / "text" / "t5" / "model.onnx"))
    inits = {i.name: i.data_type for i in t5.graph.initializer}
    dq = [n for n in t5.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == text["encoders"]["t5"]["quantization"]["quantized"] > 0
    assert {inits[n.input[0]] for n in dq} == {TensorProto.INT8}
    checks = {c["name"].split(" vs ")[0]: c for c in json.loads((sd3_package / "parity.json").read_text())["checks"]}
    assert checks["text encoders (CLIP fp16, T5 INT8)"]["passed"] and checks["VAE decoder (fp16)"]["passed"]
    assert checks["text encoders (CLIP fp16, T5 INT8)"]["metrics"]["min_cosine"] >= 0.99
    for name, rel in (("clip", "text/clip/model.onnx"), ("t5", "text/t5/model.onnx"), ("vae_decoder", "vae_decoder/model.onnx")):
        counted, shipped = m["memory"]["weights"][name], _weight_bytes(sd3_package / rel)
        assert abs(counted - shipped) / shipped < 0.1, (name, counted, shipped)


def test_runtime_releases_components_under_sequential_residency(sd3_package) -> None:
    from hpedge.runtime import Package

    pkg = Package(sd3_package, variant="int4_cpu", device="cpu")
    assert pkg.residency == "resident"
    pkg.generate(["3"], steps=2)
    assert len(pkg._sessions) == 4  # clip, t5, transformer, vae decoder stay open
    pkg.release()
    pkg.manifest["memory"]["residency"] = "sequential"  # as a package exported for a Jetson says
    img = pkg.generate(["3"], steps=2)
    assert not pkg._sessions and np.isfinite(img).all()


def test_int4_t5_is_gated_by_its_prompt_embedding_parity(random_sd3, tmp_path) -> None:
    import onnx
    from onnx import TensorProto

    out = tmp_path / "pkg"
    m = export(str(random_sd3), out, ExportOptions(target="rtx4090", method="rtn", calibration_prompts=1, e2e_samples=1,
                                                  engine="skip", t5="int4", allow_parity_failure=True,
                                                  precision="int4"))
    t5 = m["components"]["text"]["encoders"]["t5"]
    assert t5["precision"] == "int4" and t5["quantization"]["method"] == "rtn"
    model = onnx.load(str(out / "text" / "t5" / "model.onnx"))
    inits = {i.name: i.data_type for i in model.graph.initializer}
    assert TensorProto.INT4 in {inits[n.input[0]] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    c = next(c for c in json.loads((out / "parity.json").read_text())["checks"] if c["name"].startswith("text encoders"))
    assert "T5 INT4" in c["name"] and c["passed"] == (c["metrics"]["min_cosine"] >= 0.99) and c["metrics"]["min_cosine"] > 0.5
    assert m["parity"]["checks"][c["name"]] == c["passed"]


def test_drop_t5_package_matches_diffusers_without_t5(random_sd3, random_flux, tmp_path) -> None:
    from hpedge.runtime import Package

    out = tmp_path / "pkg"
    r = runner.invoke(app, ["export", str(random_sd3), "--target", "rtx4090", "-o", str(out), "--drop-t5", "--method", "rtn",
                            "--calibration-prompts", "1", "--engine", "skip", "--precision", "int4"])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "manifest.json").read_text())
    assert set(m["components"]["text"]["encoders"]) == {"clip"} and m["components"]["text"]["t5_dropped"]
    assert "t5_ids" not in m["generation"]["tokenizers"] and not (out / "text" / "t5").exists()
    e2e = next(c for c in json.loads((out / "parity.json").read_text())["checks"] if c["name"].startswith("end-to-end"))
    assert e2e["passed"]  # against stock diffusers run with text_encoder_3=None
    pe, _ = Package(out, device="cpu").encode(["7"])
    clip_tokens = m["generation"]["tokenizers"]["clip_ids"]["length"]
    assert pe.shape[1] == clip_tokens + m["generation"]["max_sequence_length"] and not pe[:, clip_tokens:].any()
    assert runner.invoke(app, ["check", str(out)]).exit_code == 0
    r = runner.invoke(app, ["export", str(random_flux), "--target", "rtx4090", "-o", str(tmp_path / "f"), "--drop-t5"])
    assert r.exit_code != 0 and "SD3 pipelines only" in r.output
