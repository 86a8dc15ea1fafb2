"""``python benchmarks/run.py size``: a real-width transformer above 2 GB through the whole export, on this host.

A random-weight transformer of architecture ``--arch`` at its real width (``--layers`` blocks; default: the
real depth) beside tiny text encoders and VAE (hpedge.testing.real_width_transformer_config) goes
through ``hpedge export`` (fp32 ONNX, fp16 ONNX, INT4 AWQ, int4_cpu, engines where the profile builds them,
parity), then ``hpedge check``, then a plain ONNX Runtime load of every ONNX file in the package. Each runs in
a child process whose memory (the whole process tree's RSS, sampled every 0.2 s) is recorded per stage, from
the export's own progress messages. Targets (``TARGETS``): peak RSS of the whole export <= 1.0 x the
transformer's fp16 bytes + 4 GB, of ``hpedge check`` <= 0.5 x + 2 GB, of one ONNX Runtime session <= 0.6 x + 1 GB.

``--t5-layers N`` instead exports a T5-XXL-width encoder (d_model 4096, d_ff 10240, 64 heads) with N blocks
as an SD3.5 pipeline's text_encoder_3 through the package's INT4 text path (the transformer stays tiny).

``--fixtures`` instead exports each of the five real-configuration test pipelines (hpedge.testing.NAMES: tiny
widths, the real architectures' settings) with default settings for ``--target rtx4090`` at that profile's own
ranges (256-1344 px, batch 1-4; calibration and the end-to-end check at 1024 px): peak RSS each, target < 4 GB.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from common import header, write, write_json

# peak RSS targets, x the transformer's (or the T5 encoder's) fp16 bytes + GB: the whole export, ``hpedge check``,
# and a plain ONNX Runtime session of one package file (int4_cpu the largest)
TARGETS = {"export": (1.0, 4e9), "check": (0.5, 2e9), "onnxruntime": (0.6, 1e9)}
FIXTURE_TARGET = 4e9  # peak RSS of a default export of a real-configuration test pipeline
T5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_heads=64)

CHILD_EXPORT = r"""
import json, sys, time
from pathlib import Path
from hpedge.export.export import ExportOptions, export
opts = ExportOptions(**json.loads(sys.argv[3]))
def say(msg):
    print("STAGE", time.time(), msg, flush=True)
say("loading")
m = export(sys.argv[1], Path(sys.argv[2]), opts, say)
say("done")
print("RESULT", json.dumps({"seconds": m["seconds"], "parity": m["parity"], "bytes": m["components"]["transformer"]["bytes"],
                            "engines": m["engines"]["status"], "exporter": m["components"]["transformer"]["exporter"]}))
"""

CHILD_CHECK = r"""
import json, sys, time
from pathlib import Path
print("STAGE", time.time(), "check", flush=True)
from hpedge.export.verify import check
r = check(Path(sys.argv[1]))
print("RESULT", json.dumps({"passed": r["passed"], "checks": len(r["checks"])}))
"""

CHILD_ORT = r"""
import json, sys, time
from pathlib import Path
import onnxruntime as ort
out = {}
for f in sorted(Path(sys.argv[1]).rglob("*.onnx")):
    print("STAGE", time.time(), "onnxruntime load " + str(f.relative_to(sys.argv[1])), flush=True)
    s = ort.InferenceSession(str(f), providers=["CPUExecutionProvider"])
    out[str(f.relative_to(sys.argv[1]))] = [i.name for i in s.get_inputs()]
    del s
print("RESULT", json.dumps(out))
"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser("size", help="a real-width transformer (> 2 GB) through export, check and ORT: time and peak RSS per stage")
    p.add_argument("--arch", default="sd3.5-medium")
    p.add_argument("--layers", type=int, default=None, help="transformer blocks (default: the architecture's)")
    p.add_argument("--single-layers", type=int, default=None, help="FLUX single-stream blocks (default: the architecture's)")
    p.add_argument("--t5-layers", type=int, default=None,
                   help="instead: a T5-XXL-width encoder with this many blocks through the INT4 text export")
    p.add_argument("--fixtures", action="store_true",
                   help="instead: the five real-configuration test pipelines, default export settings for rtx4090")
    p.add_argument("--names", nargs="+", default=None, help="with --fixtures: these test pipelines only")
    p.add_argument("--work", type=Path, required=True, help="folder for the pipeline and the package (several GB)")
    p.add_argument("--method", default="awq_clip")
    p.add_argument("--steps", type=int, default=2, help="denoising steps of the calibration runs and the end-to-end check")
    p.add_argument("--resolution", type=int, default=256, help="the profile's min = opt = max resolution")
    p.add_argument("--results-name", default=None)
    p.add_argument("--transformer-dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="how the pipeline folder stores the transformer (published SD3.5 / FLUX.1 checkpoints: bfloat16)")
    p.add_argument("--t5-dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="how the pipeline folder stores T5 (published SD3.5: float16)")


def build(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """The pipeline folder (random weights) and what it holds."""
    import torch

    from hpedge.testing import real_width_transformer_config, tiny_pipeline
    from hpedge.models.loading import make_stock_loadable

    torch.manual_seed(0)
    if args.t5_layers:
        pipe = tiny_pipeline(args.arch, gain=1.0, t5={**T5_XXL, "num_layers": args.t5_layers})
        part = pipe.text_encoder_3 if hasattr(pipe, "text_encoder_3") else pipe.text_encoder_2
        what = f"T5-XXL-width encoder ({args.t5_layers} blocks; d_model 4096, d_ff 10240)"
    else:
        cfg = real_width_transformer_config(args.arch, args.layers, args.single_layers)
        pipe = tiny_pipeline(args.arch, gain=1.0, transformer=cfg)
        part = pipe.transformer
        what = f"transformer at {args.arch}'s width, {cfg['num_layers']} blocks" + (
            f" + {cfg['num_single_layers']} single" if "num_single_layers" in cfg else "")
    n = sum(p.numel() for p in part.parameters())
    pipe.transformer.to(getattr(torch, args.transformer_dtype))
    t5 = pipe.text_encoder_3 if hasattr(pipe, "text_encoder_3") else pipe.text_encoder_2
    t5.to(getattr(torch, args.t5_dtype))
    pipe.save_pretrained(folder, safe_serialization=True)
    make_stock_loadable(folder)
    return {"what": what, "parameters": n, "fp16_bytes": 2 * n, "fp32_bytes": 4 * n,
            "transformer_dtype": args.transformer_dtype, "t5_dtype": args.t5_dtype}


def profile_file(args: argparse.Namespace, folder: Path) -> Path:
    from hpedge.targets.profiles import load_profile

    d = load_profile("rtx4090").to_dict()
    r = args.resolution
    d.update(name="rtx4090-size-benchmark", resolution={"min": r, "opt": r, "max": r}, batch={"min": 1, "opt": 1, "max": 1})
    path = folder / "rtx4090-size-benchmark.json"
    path.write_text(json.dumps(d, indent=2))
    return path


def run_child(code: str, argv: list[str], log: Path) -> tuple[list[dict[str, Any]], dict[str, Any], int, str]:
    """Run ``code`` in a child; returns its stages (name, seconds, peak tree RSS), its RESULT, rc and stderr tail."""
    import psutil

    proc = subprocess.Popen([sys.executable, "-c", code, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    samples: list[tuple[float, float, float]] = []  # time, RSS, RSS less file-backed and shared pages
    done = threading.Event()

    def sample() -> None:
        p = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                infos = [q.memory_info() for q in (p, *p.children(recursive=True))]
                rss, anon = sum(i.rss for i in infos), sum(i.rss - i.shared for i in infos)
            except psutil.Error:
                rss = anon = 0
            samples.append((time.time(), rss, anon))
            time.sleep(0.2)

    threading.Thread(target=sample, daemon=True).start()
    err: list[str] = []
    threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True).start()  # type: ignore[arg-type]
    marks: list[tuple[float, str]] = []
    result: dict[str, Any] = {}
    with open(log, "w") as f:
        for line in proc.stdout:  # type: ignore[union-attr]
            f.write(line)
            if line.startswith("STAGE "):
                _, t, msg = line.rstrip("\n").split(" ", 2)
                marks.append((float(t), msg))
            elif line.startswith("RESULT "):
                result = json.loads(line[7:])
    rc = proc.wait()
    done.set()
    end = time.time()
    stages = []
    for i, (t, msg) in enumerate(marks):
        t0 = t if i else min([t, *(x[0] for x in samples)])  # the first stage includes the interpreter's start
        t1 = marks[i + 1][0] if i + 1 < len(marks) else end
        inside = [x for x in samples if t0 <= x[0] <= t1]
        stages.append({"stage": msg, "seconds": round(t1 - t0, 1), "peak_rss": max((x[1] for x in inside), default=0),
                       "peak_anon": max((x[2] for x in inside), default=0)})
    return stages, result, rc, "".join(err[-30:])


def shipped_twice(package: Path) -> list[str]:
    """Files of the package with the same content as another (one weight file written twice), by name."""
    manifest = json.loads((package / "manifest.json").read_text())
    by: dict[str, list[str]] = {}
    for f, h in manifest["files"].items():
        by.setdefault(h, []).append(f)
    return [", ".join(v) for v in by.values() if len(v) > 1]


def fixtures(args: argparse.Namespace) -> None:
    """Default ``hpedge export --target rtx4090`` of each real-configuration test pipeline: time and peak RSS."""
    from hpedge.testing import NAMES, save_tiny_pipeline

    work = args.work.resolve()
    rows, results = [], {}
    for name in args.names or NAMES:
        folder, package = work / name / "pipeline", work / name / "package"
        if not (folder / "model_index.json").exists():
            save_tiny_pipeline(name, folder)
        opts = {"target": "rtx4090", "overwrite": True}  # everything else as a user gets it
        stages, res, rc, err = run_child(CHILD_EXPORT, [str(folder), str(package), json.dumps(opts)], work / name / "export.log")
        top = max(stages, key=lambda r: r["peak_rss"])
        results[name] = {"rc": rc, **res, **({"error": err.strip().splitlines()[-1]} if rc and err.strip() else {})}
        if rc == 0:
            checks = json.loads((package / "parity.json").read_text())["checks"]
            results[name]["metrics"] = {c["name"]: c.get("metrics") for c in checks}
        rows.append({"fixture": name, "seconds": sum(r["seconds"] for r in stages), "peak_rss": top["peak_rss"],
                     "peak_anon": max(r["peak_anon"] for r in stages), "peak_stage": top["stage"], "stages": stages})
        print(name, f"{top['peak_rss'] / 1e9:.2f} GB", f"rc {rc}", flush=True)
        _fixtures_report(args, rows, results)  # after each fixture: a stopped run keeps what it measured


def _fixtures_report(args: argparse.Namespace, rows: list[dict[str, Any]], results: dict[str, Any]) -> None:
    lines = [header("Default export of the real-configuration test pipelines for rtx4090 (its own ranges)"),
             "Each of the five test pipelines (tiny widths, the real architectures' configurations) through `hpedge export "
             "PIPELINE --target rtx4090` with every other setting at its default: 256-1344 px and batch 1-4 engines, "
             "8 calibration prompts and 4 end-to-end samples at 1024 px with the model's own steps, AWQ-clip. Target: "
             f"peak RSS (the process tree's, sampled every 0.2 s) below {FIXTURE_TARGET / 1e9:.0f} GB.\n",
             "| fixture | seconds | peak RSS GB | peak anonymous GB | stage at the peak | below target | parity | "
             "int4 min cosine / PSNR dB | end-to-end min / mean PSNR dB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        res = results[r["fixture"]]
        parity = "passed" if res.get("parity", {}).get("passed") else res.get("error", "failed")
        m = res.get("metrics", {})
        q = next((v for k, v in m.items() if k.startswith("transformer int4 ")), None) or {}
        e = next((v for k, v in m.items() if k.startswith("end-to-end")), None) or {}
        lines.append(f"| {r['fixture']} | {r['seconds']:.0f} | {r['peak_rss'] / 1e9:.2f} | {r['peak_anon'] / 1e9:.2f} | "
                     f"{r['peak_stage']} | {'yes' if r['peak_rss'] < FIXTURE_TARGET and res['rc'] == 0 else '**no**'} | {parity} | "
                     f"{q.get('min_cosine', float('nan')):.4f} / {q.get('min_psnr_db', float('nan')):.2f} | "
                     f"{e.get('min_psnr_db', float('nan')):.2f} / {e.get('mean_psnr_db', float('nan')):.2f} |")
    name = args.results_name or "size-fixtures-rtx4090"
    write(f"{name}.md", "\n".join(lines) + "\n")
    write_json(f"{name}.json", {"rows": rows, "results": results})


def size(args: argparse.Namespace) -> None:
    if args.fixtures:
        fixtures(args)
        return
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    folder, package = work / "pipeline", work / "package"
    t = time.time()
    info = build(args, folder) if not (folder / "model_index.json").exists() else json.loads((work / "info.json").read_text())
    (work / "info.json").write_text(json.dumps(info))
    built = time.time() - t
    prof = profile_file(args, work)
    # the benchmark measures the peak itself: hpedge's up-front refusal (measured by this benchmark) is not applied
    opts = {"target": str(prof), "method": args.method, "steps": args.steps, "calibration_prompts": 2, "e2e_samples": 1,
            "ignore_host_memory": True,
            "overwrite": True, **({"t5": "int4"} if args.t5_layers else {})}
    rows: list[dict[str, Any]] = []
    results: dict[str, Any] = {}
    for name, code, argv in (("export", CHILD_EXPORT, [str(folder), str(package), json.dumps(opts)]),
                             ("check", CHILD_CHECK, [str(package)]), ("onnxruntime", CHILD_ORT, [str(package)])):
        stages, res, rc, err = run_child(code, argv, work / f"{name}.log")
        results[name] = {"rc": rc, **res}
        rows += [{"step": name, **s} for s in stages]
        if rc:
            results[name]["error"] = err.strip().splitlines()[-1] if err.strip() else f"exit {rc}"
            break
    fp16 = info["fp16_bytes"]
    limits = {step: f * fp16 + extra for step, (f, extra) in TARGETS.items()}
    limit = limits["export"]
    title = f"Export of a {info['what']} ({info['parameters'] / 1e9:.3f} B parameters)"
    lines = [header(title),
             f"Random weights, built in {built:.0f} s; fp16 bytes {fp16 / 1e9:.2f} GB, fp32 {info['fp32_bytes'] / 1e9:.2f} GB; "
             f"the folder stores the transformer in {info.get('transformer_dtype', 'float32')}, T5 in "
             f"{info.get('t5_dtype', 'float32')}. "
             f"Profile: rtx4090 at {args.resolution} px, batch 1; INT4 {args.method}; {args.steps} denoising steps for "
             f"calibration and the end-to-end check. Targets, peak RSS: "
             + "; ".join(f"{step} <= {f:.1f} x fp16 + {extra / 1e9:.0f} GB = {limits[step] / 1e9:.2f} GB"
                         for step, (f, extra) in TARGETS.items()) + ".\n",
             "RSS counts file-backed pages too: the pipeline's safetensors weights are memory-mapped (clean pages the "
             "kernel can drop and read again); 'anonymous' is RSS less file-backed and shared pages, the memory the "
             "process really owns.\n",
             "| step | stage | seconds | peak RSS GB | x fp16 bytes | peak anonymous GB | x fp16 bytes | RSS within target |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['step']} | {r['stage']} | {r['seconds']:.0f} | {r['peak_rss'] / 1e9:.2f} | "
                     f"{r['peak_rss'] / fp16:.2f} | {r['peak_anon'] / 1e9:.2f} | {r['peak_anon'] / fp16:.2f} | "
                     f"{'yes' if r['peak_rss'] <= limits[r['step']] else '**no**'} |")
    for key, what in (("peak_rss", "RSS"), ("peak_anon", "anonymous RSS")):
        peak = max((r[key] for r in rows if r["step"] == "export"), default=0)
        lines.append(f"{'' if key == 'peak_anon' else chr(10)}- whole export: peak {what} {peak / 1e9:.2f} GB = "
                     f"{peak / fp16:.2f} x fp16 bytes ({'within' if peak <= limit else 'above'} the target {limit / 1e9:.2f} GB)")
    over = [r for r in rows if r["peak_rss"] > limits[r["step"]]]
    if over:
        lines.append("- RSS above the target: " + "; ".join(f"{r['step']} / {r['stage']} ({r['peak_rss'] / 1e9:.2f} GB, "
                                                            f"anonymous {r['peak_anon'] / 1e9:.2f})" for r in over))
    for name, res in results.items():
        lines.append(f"- {name}: " + json.dumps(res))
    if results.get("export", {}).get("rc") == 0:
        twice = shipped_twice(package)
        lines.append(f"- files with identical content in the package: {twice or 'none'}")
        lines.append("- package files: " + ", ".join(f"{p.relative_to(package)} {p.stat().st_size / 1e9:.2f} GB"
                                                    for p in sorted(package.rglob("*")) if p.is_file() and p.stat().st_size > 5e7))
    name = args.results_name or (f"size-{args.arch}-t5-{args.t5_layers}" if args.t5_layers else
                                 f"size-{args.arch}-{info['parameters'] / 1e9:.2f}B")
    write(f"{name}.md", "\n".join(lines) + "\n")
    write_json(f"{name}.json", {"info": info, "rows": rows, "results": results})
