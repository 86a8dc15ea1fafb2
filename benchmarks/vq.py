"""``python benchmarks/run.py vq --family sd3 --work DIR``: vector quantization (VQDM) against scalar INT4 and INT3
on a digits student, side by side in one run.

The student: ``hpedge compress zoo:digits-FAMILY --remove-fraction 0.25 --lr 1e-3`` (600 steps; FLUX ``--no-pwp``, as
the sparsity benchmark), written to ``--work`` once and reused. Every row quantizes the same layers, the block Linear
layers ``hpedge compress --vq`` quantizes (embedders and the final layer keep their precision):

- INT4 round-to-nearest and INT4 AWQ-clip (hpedge's export math: :func:`hpedge.export.quantize.rtn_int4` and
  :func:`~hpedge.export.quantize.clip_search` on 64 input rows per layer recorded while sampling the calibration
  prompts), block 128 along the input, fp16 scales: 4.125 bits per weight;
- scalar INT3, round-to-nearest, block 128 (the same bits as 3-bit VQ without vectors): 3.125 bits per weight;
- VQ at each ``--formats`` (``hpedge compress STUDENT --vq F``), before fine-tuning (``--steps 0``) and after it
  (``--steps STEPS``, the distillation against the student: output and feature loss).

Each row is judged in PyTorch on the digits evaluation (``--per-category`` x 5 prompts, the evaluation's seeds) against
the fp32 student: score ratio with a paired bootstrap 95 % interval, end-to-end PSNR of the images, bits per weight
of the quantized layers with their scales and codebooks, those layers' stored bytes (INT4 / INT3 packed, VQ as in
``vq/transformer.safetensors``), and the wall time of the quantization. ``--export``: the INT4 package of the student
and the package of the fine-tuned VQ student at ``--export-format`` (engines skipped) give the transformer ONNX files'
bytes and ONNX Runtime CPU step latency and peak memory of each variant. Rows are kept in ``results/vq-FAMILY/`` and
reused by a later run.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import RESULTS, header, image_psnr, write, write_json

BLOCK = 128
LR = 1e-3  # the fine-tuning rate of the first rows (hpedge compress's digits setting)
CALIB_PROMPTS = 8
MIDSIZE_PROMPTS = 16  # images the mid-size model's rows are judged on (PSNR against the fp32 model's)
ROWS_PER_CALL = 8  # input rows kept per layer and transformer call (AWQ-clip's sample: 64 of them)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("vq")
    p.add_argument("--family", choices=["sd3", "flux", "midsize"], required=True,
                   help="a digits student, or the mid-size random-weight SD3 (d=512, 12 blocks; PSNR only)")
    p.add_argument("--work", type=Path, required=True, help="folder for the student and the VQ pipelines")
    p.add_argument("--formats", nargs="+", default=["2bit", "3bit", "4bit"])
    p.add_argument("--steps", type=int, default=600, help="fine-tuning steps of the VQ rows after fine-tuning")
    p.add_argument("--lr", type=float, nargs="+", default=[LR],
                   help="fine-tuning learning rates: one fine-tuned row per rate (the first one's is exported)")
    p.add_argument("--per-category", type=int, default=40, help="digits prompts per category (5 categories)")
    p.add_argument("--export", action="store_true", help="also export INT4 and VQ packages: file bytes, ORT latency")
    p.add_argument("--export-format", nargs="+", default=["3bit"], help="VQ formats whose fine-tuned student is exported")


def _student(args: argparse.Namespace) -> Path:
    from latency import random_sd3_pipeline

    from hpedge.compress.pipeline import CompressOptions, compress
    from hpedge.compress.plan import Budget
    from hpedge.compress.settings import DistillSettings

    if args.family == "midsize":
        out = args.work / "midsize-sd3"
        return out if (out / "model_index.json").exists() else random_sd3_pipeline(args.work, "midsize-sd3", 12, 8)
    out = args.work / f"digits-{args.family}-hp25"
    if not (out / "model_index.json").exists():
        print(f"student: hpedge compress zoo:digits-{args.family} --remove-fraction 0.25 --lr 1e-3", flush=True)
        compress(f"zoo:digits-{args.family}", out, CompressOptions(
            Budget(remove_fraction=0.25), distill=DistillSettings(lr=1e-3, pwp=False if args.family == "flux" else None),
            eval_per_category=0, grid_samples=0, overwrite=True))
    return out


def _input_rows(pipe: Any, layers: dict[str, Any], gen: Any, ref_path: Path) -> dict[str, np.ndarray]:
    """64 input rows of each layer, drawn from the transformer calls of sampling the calibration prompts."""
    import torch

    from hpedge.models.sampling import sample
    from hpedge.prompts import calibration
    from hpedge.zoo.evaluator import evaluator_for

    rows: dict[str, list[np.ndarray]] = {n: [] for n in layers}
    g = torch.Generator().manual_seed(0)

    def hook(name: str) -> Any:
        def pre(_m: Any, args: tuple[Any, ...]) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            rows[name].append(x[torch.randperm(x.shape[0], generator=g)[:ROWS_PER_CALL]].numpy())
        return pre

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    try:
        prompts, _ = calibration(evaluator_for(ref_path), CALIB_PROMPTS, seed=5)
        sample(pipe, prompts, gen, seeds=list(range(len(prompts))), output="latent")
    finally:
        for h in handles:
            h.remove()
    rng = np.random.default_rng(0)
    out = {}
    for n, r in rows.items():
        x = np.concatenate(r)
        out[n] = x[rng.choice(len(x), size=min(64, len(x)), replace=False)]
    return out


def _scalar(w: np.ndarray, bits: int, clip: np.ndarray | None = None) -> np.ndarray:
    """The dequantized weight [K, N] of symmetric round-to-nearest at ``bits`` (block 128 along K, fp16 scales);
    INT4 is the export's own :func:`rtn_int4`."""
    from hpedge.export.quantize import rtn_int4

    if bits == 4:
        q, scale = rtn_int4(w.astype(np.float16), BLOCK, clip)
        return q.astype(np.float32) * np.repeat(scale.astype(np.float32), BLOCK, axis=0)
    k, n = w.shape
    qmax = 2 ** (bits - 1) - 1
    scale = (np.abs(w.reshape(k // BLOCK, BLOCK, n)).max(axis=1) / qmax).astype(np.float16).astype(np.float32)
    scale = np.maximum(scale, 1e-8)
    full = np.repeat(scale, BLOCK, axis=0)
    return np.rint(w / full).clip(-qmax - 1, qmax) * full


def _scalar_row(pipe: Any, name: str, bits: int, acts: dict[str, np.ndarray] | None) -> tuple[Any, dict[str, Any]]:
    import torch

    from hpedge.compress.sparsity import pruned_layers
    from hpedge.export.quantize import clip_search

    t0 = time.time()
    tr = copy.deepcopy(pipe.transformer)
    n = stored = 0
    with torch.no_grad():
        for lname, m in pruned_layers(tr).items():
            w = m.weight.detach().float().numpy().T.copy()  # [K, N] as the graph holds it
            clip = clip_search(acts[lname], w.astype(np.float16), BLOCK) if acts is not None else None
            m.weight.copy_(torch.from_numpy(_scalar(w, bits, clip).T.copy()))
            n += w.size
            stored += w.size * bits / 8 + 2 * w.size / BLOCK
    q = type(pipe)(**{**pipe.components, "transformer": tr})
    q.set_progress_bar_config(disable=True)
    return q, {"row": name, "bits_per_weight": 8 * stored / n, "layer_bytes": int(stored), "weights": n,
               "quant_seconds": round(time.time() - t0, 1)}


def _vq_key(fmt: str, steps: int, lr: float) -> str:
    return f"vq-{fmt}-{steps}" + (f"-lr{lr:g}" if steps and lr != LR else "")


def _vq_row(student: Path, out: Path, fmt: str, steps: int, lr: float) -> tuple[Any, dict[str, Any]]:
    from hpedge.compress.pipeline import CompressOptions, compress
    from hpedge.compress.plan import Budget
    from hpedge.compress.settings import DistillSettings
    from hpedge.compress.vq import VQSpec
    from hpedge.models.loading import load_pipeline, resolve

    t0 = time.time()
    rep = compress(str(student), out, CompressOptions(Budget(), distill=DistillSettings(steps=steps, lr=lr),
                                                      eval_per_category=0, grid_samples=0, overwrite=True,
                                                      vq=VQSpec.parse(fmt)))
    secs = time.time() - t0
    pipe = load_pipeline(resolve(str(out)))
    pipe.set_progress_bar_config(disable=True)
    v = rep["vq"]
    return pipe, {"row": f"VQ {fmt} ({v['name']})" + (f", fine-tuned {steps} steps" if steps else "")
                  + (f", lr {lr:g}" if steps and lr != LR else ""),
                  "format": v["name"], "steps": steps, "bits_per_weight": v["bits_per_weight"]["total"],
                  "code_bits_per_weight": v["bits_per_weight"]["codes"], "layer_bytes": v["file_bytes"],
                  "weights": v["bits_per_weight"]["weights"], "quant_seconds": round(secs - rep.get("distill_seconds", 0), 1),
                  "distill_seconds": rep.get("distill_seconds", 0), "pipeline": str(out)}


def vq(args: argparse.Namespace) -> None:
    from dataclasses import asdict

    from hpedge.compress.sparsity import pruned_layers
    from hpedge.models.loading import load_pipeline, resolve
    from hpedge.models.sampling import defaults, sample
    from hpedge.prompts import calibration
    from hpedge.zoo.evaluate import EvalSettings, evaluate, paired_ratio

    args.work.mkdir(parents=True, exist_ok=True)
    student = _student(args)
    ref = resolve(str(student))
    pipe = load_pipeline(ref)
    pipe.set_progress_bar_config(disable=True)
    settings = EvalSettings(per_category=args.per_category)
    rows_dir = RESULTS / f"vq-{args.family}"
    rows_dir.mkdir(parents=True, exist_ok=True)
    gen = defaults(pipe, ref.path)
    digits = args.family != "midsize"
    prompts = calibration(None, MIDSIZE_PROMPTS, seed=9)[0] if not digits else []

    def images(p: Any, name: str) -> tuple[dict[str, Any] | None, np.ndarray]:
        if digits:
            res, canv, _ = evaluate(p, name, settings)
            return asdict(res), canv
        return None, sample(p, prompts, gen, seeds=list(range(len(prompts))))

    base, base_canv = images(pipe, "fp32 student")
    rows: list[dict[str, Any]] = [{"row": "fp32 student" if digits else "fp32 model", "bits_per_weight": 32.0,
                                   "result": base, "paired": paired_ratio(base, base) if digits else None,
                                   "psnr_min": 200.0, "psnr_mean": 200.0}]

    def judged(key: str, make: Any) -> None:
        path = rows_dir / f"{key}.json"
        if path.exists():
            rows.append({**json.loads(path.read_text()), "key": key})
            return
        qpipe, row = make()
        row["key"] = key
        res, canv = images(qpipe, row["row"])
        psnr = image_psnr(base_canv, canv)
        row.update(result=res, paired=paired_ratio(base, res) if digits else None, psnr_min=min(psnr),
                   psnr_mean=float(np.mean(psnr)))
        path.write_text(json.dumps(row))
        rows.append(row)
        share = (f"{row['paired']['ratio']:.3f} ({row['paired']['ci95'][0]:.3f}-{row['paired']['ci95'][1]:.3f}), "
                 if digits else "")
        print(f"{row['row']}: {row['bits_per_weight']:.2f} bits, {share}PSNR min {row['psnr_min']:.1f} dB", flush=True)

    acts: dict[str, np.ndarray] = {}
    if not (rows_dir / "int4-awq.json").exists():
        acts = _input_rows(pipe, pruned_layers(pipe.transformer), gen, ref.path)
    judged("int4-rtn", lambda: _scalar_row(pipe, "INT4 RTN, block 128", 4, None))
    judged("int4-awq", lambda: _scalar_row(pipe, "INT4 AWQ-clip, block 128", 4, acts))
    judged("int3-rtn", lambda: _scalar_row(pipe, "INT3 RTN, block 128", 3, None))
    for fmt in args.formats:
        for steps, lr in [(0, LR)] + [(args.steps, lr) for lr in args.lr if args.steps]:
            key = _vq_key(fmt, steps, lr)
            out = args.work / f"{args.family}-{key}"
            judged(key, lambda out=out, fmt=fmt, steps=steps, lr=lr: _vq_row(student, out, fmt, steps, lr))
    done = {r["key"] for r in rows if "key" in r}
    for f in sorted(rows_dir.glob("vq-*.json")):  # VQ rows of earlier runs (other formats or rates) join the table
        if f.stem not in done:
            rows.append({**json.loads(f.read_text()), "key": f.stem})
    rows[4:] = sorted(rows[4:], key=lambda r: (r["bits_per_weight"], r.get("steps", 0), r["row"]))
    packages = _packages(args, student) if args.export else {}
    _report(args, rows, packages)


def _packages(args: argparse.Namespace, student: Path) -> dict[str, Any]:
    """The INT4 package of the student and the package of each fine-tuned VQ student of ``--export-format``
    (``vq FMT``): transformer ONNX bytes, ONNX Runtime CPU step time and peak RSS. Kept and extended across runs."""
    from latency import time_onnx

    from hpedge.export.export import ExportOptions, export
    from hpedge.export.quantize import rows_of
    from hpedge.runtime.format import load_reference

    path = RESULTS / f"vq-{args.family}" / "packages.json"
    out: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    jobs = [("student", student, "int4")] + [
        (f"vq {fmt}", args.work / f"{args.family}-{_vq_key(fmt, args.steps, args.lr[0])}", f"vq {fmt}")
        for fmt in args.export_format]
    for key, src, entry in jobs:
        if entry in out:
            continue
        pkg = args.work / f"{args.family}-pkg-{key.replace(' ', '-')}"
        t0 = time.time()
        m = export(str(src), pkg, ExportOptions(engine="skip", overwrite=True))
        feeds, ref, _ = load_reference(pkg, m)
        tr = m["components"]["transformer"]
        for v, rel in tr["variants"].items():
            if key != "student" and v != "vq":
                continue
            t = time_onnx(pkg / rel, rows_of(feeds[0])[0], reps=5)  # one batch row (FLUX's ids have no batch axis)
            out[v if key == "student" else key] = {"onnx_bytes": tr["bytes"][v], **t, "package": pkg.name}
        out[f"{key}_export_seconds"] = round(time.time() - t0, 1)
        path.write_text(json.dumps(out))
    return out


def _report(args: argparse.Namespace, rows: list[dict[str, Any]], packages: dict[str, Any]) -> None:
    from hpedge.zoo.evaluate import paired_difference

    name = f"vq-{args.family}"
    digits = rows[0]["paired"] is not None
    what = (f"the digits-{args.family} student (25 % of blocks removed)" if digits
            else "the mid-size random-weight SD3 (d=512, 12 blocks)")
    text = header(f"Vector quantization vs INT4 / INT3 on {what}")
    text += f"Quantized: the block Linear layers ({rows[1].get('weights', 0) / 1e6:.2f} M weights); the rest stays float32. "
    if digits:
        s = rows[0]["result"]["settings"]
        text += (f"Digits score on {s['per_category'] * 5} prompts ({s['steps']} steps), PyTorch, against the fp32 "
                 "student (paired bootstrap 95 % interval); PSNR: each row's images against the fp32 student's (same "
                 "prompts and seeds). ")
    else:
        text += (f"No judge for random weights: PSNR of each row's images against the fp32 model's on {MIDSIZE_PROMPTS} "
                 "calibration prompts (same seeds, the model's steps). ")
    text += (f"VQ fine-tuning: `hpedge compress --vq F --steps N` (N in the row), lr {LR:g} unless the row says another, "
             "distillation against the unquantized model.\n\n")
    text += ("| row | bits / weight (scales, codebooks incl.) | quantized layers' bytes | digits score | share of fp32 "
             "(95 % interval) | lead over INT4 AWQ-clip (paired, 95 %) | PSNR min / mean dB | quantization s |\n"
             "|---|---|---|---|---|---|---|---|\n")
    awq = next((r for r in rows if r["row"].startswith("INT4 AWQ")), None)
    for r in rows:
        p = r["paired"]
        share = (f"{r['result']['overall']:.3f} | {p['ratio'] * 100:.1f} % ({p['ci95'][0] * 100:.1f}-"
                 f"{p['ci95'][1] * 100:.1f})" if p else "- | -")
        lead = "-"
        if p and awq is not None and r is not awq and r["bits_per_weight"] < 16:
            d = paired_difference(rows[0]["result"], r["result"], awq["result"])
            r["vs_int4_awq"] = d
            lead = f"{d['difference'] * 100:+.1f} % ({d['ci95'][0] * 100:+.1f} to {d['ci95'][1] * 100:+.1f})"
        text += (f"| {r['row']} | {r['bits_per_weight']:.2f} | {r.get('layer_bytes', 0) / 1e3:.0f} kB | {share} | {lead} | "
                 f"{r['psnr_min']:.1f} / {r['psnr_mean']:.1f} | {r.get('quant_seconds', '')} |\n")
    if packages:
        text += ("\nPackages (`hpedge export`, rtx4090, engines skipped): transformer ONNX files and ONNX Runtime CPU "
                 "step latency (batch row 1, median of 5, fresh process) and peak RSS.\n\n| variant | ONNX MB | step ms | "
                 "peak RSS MB |\n|---|---|---|---|\n")
        for v, p in packages.items():
            if isinstance(p, dict):
                text += f"| {v} | {p['onnx_bytes'] / 1e6:.2f} | {p['median_ms']:.1f} | {p['peak_rss_mb']:.0f} |\n"
    write(f"{name}.md", text)
    write_json(f"{name}.json", {"family": args.family, "rows": rows, "packages": packages})
    _plot(rows, RESULTS / f"{name}.png", f"{what}: " + ("share of the fp32 score" if digits else "mean PSNR (dB)")
          + " vs bits per weight")


def _plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Digits rows: share of the fp32 score with its interval; otherwise mean PSNR (dB / 100 on the same axis)."""
    from PIL import Image, ImageDraw

    from hpedge.io import atomic_file

    W, H, L, R, T, B = 900, 520, 70, 280, 40, 60
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img, "RGBA")
    pts = [r for r in rows if r["bits_per_weight"] < 16]

    def y_of(r: dict[str, Any]) -> tuple[float, float, float]:
        if r["paired"]:
            return r["paired"]["ratio"], *r["paired"]["ci95"]
        return r["psnr_mean"] / 100, r["psnr_min"] / 100, r["psnr_mean"] / 100

    xmax = max(9.0, max(r["bits_per_weight"] for r in pts) + 0.5)
    lo_y = min(0.9, np.floor((min(y_of(r)[1] for r in pts) - 0.02) * 20) / 20)  # the lowest interval, in 5 % steps
    sx = lambda x: L + x / xmax * (W - L - R)  # noqa: E731
    sy = lambda y: H - B - (y - lo_y) / (1.1 - lo_y) * (H - T - B)  # noqa: E731
    d.rectangle([L, T, W - R, H - B], outline="black")
    for k in range(int(xmax) + 1):
        d.text((sx(k) - 4, H - B + 8), str(k), fill="black")
    for k in range(int(round(lo_y * 20)), 23):
        d.text((L - 44, sy(k / 20) - 5), f"{k / 20:.0%}" if pts[0]["paired"] else f"{k * 5} dB", fill="black")
    d.line([L, sy(1.0), W - R, sy(1.0)], fill="#999999")
    d.text((L, 12), title, fill="black")
    d.text(((L + W - R) // 2 - 80, H - 24), "bits per weight (scales and codebooks included)", fill="black")
    colors = {"INT4": "#1f77b4", "INT3": "#ff7f0e", "VQ": "#2ca02c"}
    for i, r in enumerate(pts):
        col = colors.get(r["row"].split()[0], "#000000")
        x, (y, lo, hi) = sx(r["bits_per_weight"]), y_of(r)
        d.line([x, sy(lo), x, sy(hi)], fill=col)
        tuned = r.get("steps", 0) > 0
        d.ellipse([x - 4, sy(y) - 4, x + 4, sy(y) + 4], outline=col, fill=None if tuned else col)
        d.ellipse([W - R + 14, T + 6 + 18 * i, W - R + 22, T + 14 + 18 * i], outline=col, fill=None if tuned else col)
        d.text((W - R + 30, T + 4 + 18 * i), r["row"][:40], fill="black")
    with atomic_file(path) as tmp:
        img.save(tmp, format="PNG")


def vq_package(args: argparse.Namespace) -> None:
    """``python benchmarks/run.py vq-package PKG --name NAME``: a package with a ``vq`` variant through ``hpedge
    check``, plain ONNX Runtime (the vq graph alone, no hpedge: its output on the stored held-out inputs against the
    stored PyTorch reference) and ``hpedge generate --variant vq`` (a PNG beside the results)."""
    import onnxruntime as ort
    from typer.testing import CliRunner

    from hpedge.cli import app
    from hpedge.export.quantize import rows_of
    from hpedge.export.verify import check, quality
    from hpedge.runtime.format import load_reference, read_manifest

    pkg = args.package
    m = read_manifest(pkg)
    res = check(pkg)
    feeds, ref, _ = load_reference(pkg, m)
    sess = ort.InferenceSession(str(pkg / m["components"]["transformer"]["variants"]["vq"]),
                                providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    plain = []
    for f, r in zip(feeds, ref):
        rows = [sess.run(None, {k: v for k, v in row.items() if k in names})[0] for row in rows_of(f)]
        plain.append(quality(r, np.concatenate(rows)))
    png = RESULTS / f"{args.name}.png"
    r = CliRunner().invoke(app, ["generate", str(pkg), args.prompt, "-o", str(png), "--variant", "vq", "--seed", "0"])
    if r.exit_code != 0:
        raise SystemExit(r.output)
    write_json(f"{args.name}.json", {"package": pkg.name, "source_vq": m["source"]["vq"],
                                     "transformer_bytes": m["components"]["transformer"]["bytes"],
                                     "check": {"passed": res["passed"], "checks": [
                                         {k: c.get(k) for k in ("name", "passed", "skipped", "metrics")}
                                         for c in res["checks"]]},
                                     "plain_onnxruntime": {"version": ort.__version__, "vs_pytorch": plain},
                                     "generate": {"prompt": args.prompt, "png": png.name, "output": r.output.strip()}})
    print(f"check passed: {res['passed']}; plain ORT min PSNR {min(q['psnr_db'] for q in plain):.1f} dB; wrote {png}")


def add_package_parser(sub: Any) -> None:
    p = sub.add_parser("vq-package")
    p.add_argument("package", type=Path)
    p.add_argument("--name", required=True, help="results file stem")
    p.add_argument("--prompt", default="the digit 7 on the left and the digit 2 on the right")
