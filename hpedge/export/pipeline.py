"""``hpedge export``: pipeline folder -> verified package for a device profile.

1. transformer -> ONNX fp32 (dynamic shapes covering the profile), verified against PyTorch on fresh
   inputs before anything else runs; text encoding and VAE decoder -> ONNX;
2. calibration inputs captured from real denoising runs of the pipeline (never random data);
3. INT4 AWQ (ModelOpt): ``int4``, the TensorRT input, is a second export of the transformer that computes
   in ``--compute`` (fp16 by default; the engine is strongly typed, so the graph's types are the engine's
   precisions) quantized by ModelOpt; ``int4_cpu`` is ModelOpt's quantization of the fp32 graph turned into
   a form ONNX Runtime's CPU provider runs fast (int8 GEMM after load, or MatMulNBits);
4. TensorRT engines for the text encoding, the INT4 transformer and the VAE decoder (``--engine
   auto|require|skip``): TensorRT-RTX profiles build them here on any host; standard TensorRT profiles
   (Jetson) plan them for an on-device ``hpedge build`` (see :mod:`hpedge.export.engine_build`);
5. parity (Polygraphy) on held-out captured inputs + an end-to-end image check; it gates packaging;
6. manifest with sha256 of every file; the package directory is written atomically.
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from hpedge.backends import engines as eng
from hpedge.errors import HpedgeError
from hpedge.export import onnx_export as ox
from hpedge.export.parity import Check, ParityReport
from hpedge.io import atomic_dir
from hpedge.models.denoise import family_of
from hpedge.models.sampling import Defaults, check_pipeline, defaults as sampling_defaults, sample, with_overrides, zoo_marker
from hpedge.runtime import initial_latents
from hpedge.targets import Profile, load_profile


@dataclass
class ExportOptions:
    target: str = "rtx4090"
    engine: str = "auto"  # auto | require | skip
    method: str = "awq_clip"  # awq_clip | rtn
    exporter: str = "auto"
    calibration_prompts: int = 8
    steps: int | None = None  # denoising steps of the calibration runs and the end-to-end check; None: the model's
    allow_parity_failure: bool = False
    archive: bool = False
    overwrite: bool = False
    protect: list[str] = field(default_factory=list)
    e2e_samples: int = 4
    cpu_kernel: str = "int8"  # int8 | nbits (see hpedge.export.cpu_int4)
    compute: str = "fp16"  # what the TensorRT-input INT4 graph computes in: fp16 | fp32 (int4_cpu is always fp32)
    fp32_reference: bool = False  # also ship fp32 graphs of every component (variant "fp32": the exact reference; for debugging)
    residency: str = "auto"  # auto | resident | sequential (hpedge.export.footprint)
    drop_t5: bool = False  # SD3: ship no T5 (zeros in its place, as diffusers without text_encoder_3)
    t5: str = "auto"  # T5's weights: int4 (ModelOpt, --method) | int8 (weight-only, per channel) | auto (int8 where it fits)


def resolution_range(family: str, transformer_config: dict[str, Any], vae_scale_factor: int, profile: Profile,
                     marker: dict[str, Any]) -> tuple[int, int, int]:
    """Pixel resolutions (min, opt, max) the engine must cover: the profile's, within the model's limits."""
    vs = vae_scale_factor
    step = vs * 2
    cfg = transformer_config
    model_max = cfg["pos_embed_max_size"] * cfg["patch_size"] * vs if family == "sd3" else 1 << 14
    if "resolution" in marker:  # a small zoo model: around its native resolution
        r = int(marker["resolution"])
        lo, opt, hi = max(step, r // 2), r, r * 2
    else:
        lo, opt, hi = profile.resolution.min, profile.resolution.opt, profile.resolution.max
    hi = min(hi, model_max)
    lo, opt = min(lo, hi), min(opt, hi)
    snap = lambda v: max(step, v // step * step)  # noqa: E731
    return snap(lo), snap(opt), snap(hi)


def _plan_engines(pipe: Any, spec: ox.IOSpec, res: tuple[int, int, int], profile: Profile, mode: str,
                  reason: str, max_sequence_length: int, text: dict[str, Any]) -> dict[str, Any]:
    """The manifest's ``engines`` section before any build: library, GPUs, and each component's ONNX and shapes."""
    from hpedge.export import engine_build

    io = spec.to_dict()["inputs"]
    batch_axes = {k: spec.dynamic_axes.get(k, {}).get(0) == "batch" for k in io}
    text_lengths = {name: length for name, (_, length) in ox.text_inputs(pipe, max_sequence_length).items()}
    latents = tuple(r // pipe.vae_scale_factor for r in res)
    comps = engine_build.component_plan(family_of(pipe), io, batch_axes, text_lengths,
                                        int(pipe.vae.config.latent_channels), latents, profile,  # type: ignore[arg-type]
                                        text["encoders"])
    section: dict[str, Any] = {
        "status": "skipped" if mode == "skip" else "pending", "reason": reason, "library": profile.engine.library,
        "compute_capabilities": list(profile.engine.compute_capabilities), "portable": profile.engine.portable,
        "components": comps,
    }
    note = engine_build.runtime_cache_note(profile.engine.library)
    if note:
        section["runtime_cache"] = note
    return section


def _engine_parity(root: Path, engines: dict[str, Any], feeds: list[dict[str, np.ndarray]], ref: list[np.ndarray],
                   min_cosine: float, min_psnr: float, report: ParityReport | None = None) -> dict[str, Any]:
    """Run the transformer engine on ``feeds`` against PyTorch's ``ref`` where this machine can run it."""
    from hpedge.export import engine_build
    from hpedge.export import parity as par

    av = eng.can_run(engines)
    if not av.ok:
        return {"run": False, "reason": f"built here; not run: {av.reason}"}
    runner = eng.open_runner(root, engines, "transformer")
    feeds, ref = engine_build.within_batch(engines["components"]["transformer"], feeds, ref)
    outs = [runner.run(f)[0] for f in feeds]
    runner.save_cache()
    c = par.compare_quality(f"{engines['library']} transformer engine vs PyTorch", ref, outs, min_cosine, min_psnr)
    if report is not None:
        report.checks.append(c)
    return {"run": True, "passed": c.passed, **c.metrics}


def capture_inputs(pipe: Any, prompts: list[str], gen: Defaults, names: list[str], seed: int,
                   every: int = 4) -> list[dict[str, np.ndarray]]:
    """Transformer inputs recorded during real denoising runs (every ``every``-th call) at sampling
    defaults ``gen``: with CFG, the [negative, positive] batch the pipeline really feeds the transformer."""
    feeds: list[dict[str, np.ndarray]] = []
    counter = {"n": 0}

    def hook(_m: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        if counter["n"] % every == 0:
            feeds.append({k: kwargs[k].detach().float().cpu().numpy() for k in names if kwargs.get(k) is not None})
        counter["n"] += 1

    h = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        sample(pipe, prompts, gen, seeds=[seed * 1000 + i for i in range(len(prompts))], output="latent")
    finally:
        h.remove()
    for f in feeds:  # the pipeline passes one guidance value per sample; the graph takes one per batch row
        if "guidance" in names and "guidance" in f and f["guidance"].shape[0] != f["hidden_states"].shape[0]:
            f["guidance"] = np.broadcast_to(f["guidance"], (f["hidden_states"].shape[0],)).astype(np.float32)
    return feeds


def _torch_outputs(pipe: Any, feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    import torch

    wrapper = ox._transformer_wrapper(pipe.transformer)
    dev = next(pipe.transformer.parameters()).device
    outs = []
    with torch.no_grad():
        for f in feeds:
            outs.append(wrapper(*(torch.from_numpy(f[n]).to(dev) for n in ox.input_names(pipe.transformer))).cpu().numpy())
    return outs


REFERENCE_SAMPLES = 2


def _save_reference(path: Path, feeds: list[dict[str, np.ndarray]], outputs: list[np.ndarray],
                    extra: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Held-out transformer inputs and PyTorch's outputs for them, as safetensors (``{i}/{input}``, ``{i}/out``),
    plus ``extra`` (``text/...``: held-out token ids and PyTorch's prompt embeddings; ``vae/...``: latents and
    PyTorch's images)."""
    from safetensors.numpy import save_file

    tensors = {f"{i}/{k}": np.ascontiguousarray(v) for i, f in enumerate(feeds) for k, v in f.items()}
    tensors.update({f"{i}/out": np.ascontiguousarray(o) for i, o in enumerate(outputs)})
    tensors.update({k: np.ascontiguousarray(v) for k, v in (extra or {}).items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return {"file": str(path.relative_to(path.parents[1])), "samples": len(feeds),
            "what": "held-out transformer inputs captured from real denoising runs and the PyTorch model's outputs"}


def load_reference(package: Path, manifest: dict[str, Any]) -> tuple[list[dict[str, np.ndarray]], list[np.ndarray]]:
    ref = manifest["components"]["transformer"].get("reference")
    if not ref:
        raise HpedgeError(f"{package} has no parity reference (written by an older hpedge); export it again",
                          HpedgeError.CHECK_FAILED)
    from safetensors.numpy import load_file

    t = load_file(str(package / ref["file"]))
    feeds = [{k.split("/", 1)[1]: v for k, v in t.items() if k.startswith(f"{i}/") and not k.endswith("/out")}
             for i in range(ref["samples"])]
    return feeds, [t[f"{i}/out"] for i in range(ref["samples"])]


def _fresh_feeds(spec: ox.IOSpec, family: str) -> dict[str, dict[str, np.ndarray]]:
    """New random inputs at the profile's min and opt shapes and at its max resolution with batch 1 (the max
    batch at the max resolution is the engine's to cover, not a CPU check's)."""
    out = {}
    for which in ("min", "opt", "max"):
        feed = spec.sample(which, seed=7)
        if which == "max":
            feed = {k: v[:1] if spec.dynamic_axes.get(k, {}).get(0) == "batch" else v for k, v in feed.items()}
        if "timestep" in feed and family == "sd3":
            feed["timestep"] = feed["timestep"] * 1000
        out[which if which != "max" else "max_batch1"] = feed
    return out


def _check_fp32(path: Path, fresh: dict[str, dict[str, np.ndarray]], fresh_ref: list[np.ndarray],
                held: list[dict[str, np.ndarray]], profile: Profile) -> tuple[dict[str, float], Any]:
    """The fp32 graph in one ONNX Runtime session: fresh inputs against PyTorch's outputs for them (the export
    aborts on a mismatch), then the held-out inputs (returned as Polygraphy results for the parity report)."""
    from hpedge.backends import ort
    from hpedge.export import parity as par

    sess = ort.session(path, "auto", low_memory=True)
    errs = {}
    for (which, feed), ref in zip(fresh.items(), fresh_ref):
        out = ort.run(sess, feed)[0]
        err = float(np.abs(out - ref).max())
        tol = profile.parity.fp32_atol + profile.parity.fp32_rtol * float(np.abs(ref).max())
        errs[which] = err
        if not np.isfinite(out).all() or err > tol:
            raise HpedgeError(f"the exported transformer does not match PyTorch on fresh {which} inputs "
                              f"(max abs error {err:.2e} > {tol:.2e}); export aborted")
    held_out = [ort.run(sess, f)[0] for f in held]
    del sess
    release_memory()
    return errs, par.reference_results(held_out, "out", "onnxrt-fp32")


def release_memory() -> None:
    """Collect what Python no longer references and give freed heap memory back to the OS (between the export's
    stages, so that the next one starts from what is really in use)."""
    import gc

    from hpedge.backends import ort

    gc.collect()
    ort.return_freed_memory()


def _tokenizer_entries(pipe: Any, root: Path, max_sequence_length: int) -> dict[str, Any]:
    out = {}
    for name, (attr, length) in ox.text_inputs(pipe, max_sequence_length).items():
        tok = getattr(pipe, attr)
        folder = root / "tokenizers" / attr
        tok.save_pretrained(folder)
        if not (folder / "tokenizer.json").exists():
            raise HpedgeError(f"{attr} has no fast tokenizer.json; the runtime needs one")
        out[name] = {"file": f"tokenizers/{attr}/tokenizer.json", "length": length, "pad_id": int(tok.pad_token_id),
                     "pad_token": str(tok.pad_token)}
    return out


def export(model: str, out: Path, opts: ExportOptions, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    from hpedge.export import engine_build
    from hpedge.export import parity as par
    from hpedge.export.cpu_int4 import KERNELS, convert
    from hpedge.export.package import finalize_manifest, write_archive
    from hpedge.export.quantize import quantize_int4, store_floats_fp16
    from hpedge.io import _check_parent
    from hpedge.models.loading import compute_device, drop_t5, load_pipeline, resolve

    say = progress or (lambda _s: None)
    if opts.cpu_kernel not in KERNELS:
        raise HpedgeError(f"--cpu-kernel must be one of {', '.join(KERNELS)}, got {opts.cpu_kernel!r}")
    profile = load_profile(opts.target)
    if "int4" not in profile.precisions:
        raise HpedgeError(f"target {profile.name} cannot run INT4 weights (precisions: {', '.join(profile.precisions)})")
    if opts.compute not in ox.COMPUTE_DTYPES:
        raise HpedgeError(f"--compute must be one of {', '.join(ox.COMPUTE_DTYPES)}, got {opts.compute!r}")
    if opts.compute not in profile.precisions:
        raise HpedgeError(f"target {profile.name} cannot compute in {opts.compute} (precisions: {', '.join(profile.precisions)})")
    _check_parent(out)
    if out.exists() and not opts.overwrite:
        raise HpedgeError(f"{out} already exists; pass --overwrite to replace it")
    build_now, engine_reason = engine_build.plan(opts.engine, profile, {"int4", opts.compute})
    ref = resolve(model)
    t0 = time.time()
    memory = _fits(ref, profile, opts)  # before any work: a package that cannot fit is not built
    say("loading pipeline")
    pipe = load_pipeline(ref)
    if opts.drop_t5:
        drop_t5(pipe)  # diffusers' own T5-less SD3 (zeros in T5's place)
    check_pipeline(pipe)
    marker = zoo_marker(ref.path)
    family = family_of(pipe)
    tr_config = {k: v for k, v in dict(pipe.transformer.config).items() if not k.startswith("_")}
    channels = int(pipe.transformer.config.in_channels) // (1 if family == "sd3" else 4)
    res = resolution_range(family, dict(pipe.transformer.config), pipe.vae_scale_factor, profile, marker)
    batch = (profile.batch.min, profile.batch.opt, profile.batch.max)
    model_gen = sampling_defaults(pipe, ref.path)
    # calibration and the end-to-end check sample at the model's defaults, at the profile's opt size
    gen = with_overrides(model_gen, height=res[1], width=res[1], steps=opts.steps)
    seq = gen.max_sequence_length
    spec = ox.transformer_spec(pipe, res, batch, seq)
    compress_report = json.loads((ref.path / "hpedge_compress.json").read_text()) if ref.path and (ref.path / "hpedge_compress.json").exists() else None
    report_path = out.resolve().parent / f"{out.name}.parity.json"

    with atomic_dir(out, overwrite=opts.overwrite) as tmp:
        work = tmp / ".work"  # intermediate files, removed before the manifest is written
        from hpedge.compress.analyze import calibration, evaluator_of

        # 1. Everything PyTorch is asked for, first: afterwards the transformer leaves memory (cast to fp16 for
        #    its fp16 export, then released), so that no ONNX Runtime session or ModelOpt pass ever runs beside it.
        say("capturing calibration inputs from real denoising runs")
        prompts, _ = calibration(evaluator_of(ref.path), 2 * opts.calibration_prompts, seed=21)
        half = len(prompts) // 2
        names = ox.input_names(pipe.transformer)
        pipe.to(compute_device())  # calibration and references run on the accelerator where there is one
        calib = capture_inputs(pipe, prompts[:half], gen, names, seed=1)
        held = capture_inputs(pipe, prompts[half:], gen, names, seed=2)
        say("PyTorch references: transformer (held-out and fresh inputs), text encoders, VAE, end-to-end images")
        fresh = _fresh_feeds(spec, family)
        ref_out = _torch_outputs(pipe, held)
        fresh_ref = _torch_outputs(pipe, list(fresh.values()))
        text_ids, text_ref = _text_reference(pipe, prompts[half:], seq)
        lat_hw = res[1] // pipe.vae_scale_factor
        vae_ref = _vae_reference(pipe, lat_hw)
        e2e_prompts = prompts[half:][: opts.e2e_samples]
        e2e_latents = initial_latents(len(e2e_prompts), E2E_SEED, channels, gen.height // pipe.vae_scale_factor,
                                      gen.width // pipe.vae_scale_factor)
        e2e_ref = _stock_images(pipe, e2e_prompts, gen, e2e_latents)
        pipe.to("cpu")

        say("exporting transformer (fp32 ONNX)")
        fp32 = (tmp / "transformer" if opts.fp32_reference else work) / "fp32" / "model.onnx"
        exporter = ox.export_transformer(pipe.transformer, spec, fp32, opts.exporter)
        fp32_bytes = ox.size_of(fp32)
        quantize_src = fp32
        if opts.compute == "fp16":
            say("exporting transformer (fp16 ONNX; the model is cast in place)")
            quantize_src = work / "fp16" / "model.onnx"
            pipe.transformer.half()
            ox.export_transformer(pipe.transformer, spec, quantize_src, exporter, dtype="fp16")
        pipe.transformer = None  # no PyTorch transformer from here on
        release_memory()

        t5_what = memory["precisions"].get("t5", "").upper() + (f" ({opts.method})" if memory["precisions"].get("t5") == "int4" else "")
        say(f"exporting text encoders (CLIP {opts.compute}" + ("" if opts.drop_t5 else f", T5 {t5_what}")
            + f") and VAE decoder ({opts.compute})")
        text, t5_rep = _export_text(pipe, tmp, work, seq, opts, memory["precisions"].get("t5", ""), prompts[:half],
                                    int(tr_config["joint_attention_dim"]))
        ox.export_vae_decoder(pipe, tmp / "vae_decoder" / "model.onnx", lat_hw, opts.compute)
        if opts.fp32_reference:
            ox.export_vae_decoder(pipe, tmp / "vae_decoder" / "fp32" / "model.onnx", lat_hw)
        toks = _tokenizer_entries(pipe, tmp, seq)
        pipe.scheduler.save_pretrained(tmp / "scheduler")

        say("checking the fp32 graph against PyTorch (fresh min, opt and max-at-batch-1 inputs; held-out inputs)")
        fresh_err, fp32_held = _check_fp32(fp32, fresh, fresh_ref, held, profile)
        if not opts.fp32_reference and quantize_src != fp32:
            shutil.rmtree(fp32.parent)  # checked; on disk it would only take room (4 bytes per parameter)

        # 2. One INT4 quantization (ModelOpt AWQ, or hpedge's streamed RTN) of the graph TensorRT builds from: its engine is strongly typed, so the
        #    graph's own types (opts.compute) decide the kernels. int4_cpu (ONNX Runtime CPU, fp32 compute) is made
        #    from the very same 4-bit weights and scales.
        say(f"INT4 quantization ({opts.method}, {'hpedge, streamed' if opts.method == 'rtn' else 'ModelOpt'}, {opts.compute} graph)"
            " and its int4_cpu variant")
        int4 = tmp / "transformer" / "int4" / "model.onnx"
        int4_cpu = tmp / "transformer" / "int4_cpu" / "model.onnx"
        qrep = quantize_int4(quantize_src, int4, calib, opts.method, 128, opts.protect)
        n_cpu = convert(int4, int4_cpu, opts.cpu_kernel)  # reads the scales: before store_floats_fp16
        store_floats_fp16(int4)  # 4-bit weights, 16-bit rest (an fp32 graph keeps its DequantizeLinear scales fp32)
        for f in quantize_src.parent.glob("*"):
            if quantize_src != fp32 or not opts.fp32_reference:
                f.unlink()

        engines = _plan_engines(pipe, spec, res, profile, opts.engine, engine_reason, seq, text)
        if build_now:
            engines["components"] = engine_build.build_all(tmp, engines["components"], profile.to_dict(), say)
            engines["status"] = "built"

        say("parity checks (Polygraphy)")
        report = ParityReport()
        p = profile.parity
        report.checks.append(par.compare_fp32(ref_out, fp32_held, "out", p.fp32_atol, p.fp32_rtol))
        report.checks.append(par.compare_quality(f"transformer int4 (DequantizeLinear, {opts.compute} compute) vs PyTorch", ref_out,
                                                 par.outputs_of(par.run_onnxrt(int4, held, "onnxrt-int4")),
                                                 p.int4_min_cosine, p.int4_min_psnr_db))
        report.checks.append(par.compare_quality(f"transformer int4_cpu ({opts.cpu_kernel}) vs PyTorch", ref_out,
                                                 par.outputs_of(par.run_onnxrt(int4_cpu, held, "onnxrt-int4-cpu")),
                                                 p.int4_min_cosine, p.int4_min_psnr_db))
        report.checks.append(_text_parity(family, tmp, text, text_ids, text_ref, p.text_min_cosine))
        report.checks.append(_vae_parity(tmp / "vae_decoder" / "model.onnx", vae_ref, opts.compute, p.vae_min_psnr_db))
        if engines["status"] == "built":
            engines["parity"] = _engine_parity(tmp, engines, held, ref_out, p.int4_min_cosine, p.int4_min_psnr_db, report)
        # what `hpedge check` compares against later: held-out captured inputs and PyTorch's outputs
        reference = _save_reference(tmp / "parity" / "reference.safetensors", held[:REFERENCE_SAMPLES],
                                    ref_out[:REFERENCE_SAMPLES], {**{f"text/ids/{k}": v for k, v in text_ids.items()},
                                                                  **text_ref, **vae_ref})
        shutil.rmtree(work, ignore_errors=True)
        variants = {v: f"transformer/{v}/model.onnx" for v in ("fp32", "int4", "int4_cpu") if (tmp / "transformer" / v).exists()}
        generation = {
            "family": family, "resolution": res[1], "resolution_range": list(res),
            "latent_channels": channels,
            "vae_scale_factor": pipe.vae_scale_factor, "max_sequence_length": seq,
            "tokenizers": toks, "default_steps": model_gen.steps, "timestep_scale": 1000.0 if family == "sd3" else 1.0,
            "height": _within(model_gen.height, res), "width": _within(model_gen.width, res),
            "size_multiple": pipe.vae_scale_factor * 2,
            "guidance": {"kind": model_gen.guidance_kind, "default": model_gen.guidance},
            "scheduler": {k: v for k, v in dict(pipe.scheduler.config).items() if not k.startswith("_")},
            "defaults_source": model_gen.source,
        }
        manifest: dict[str, Any] = {
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": {"model": model, "family": ref.family, "evaluator": marker.get("evaluator"),
                       "kept_blocks": compress_report["kept_blocks"] if compress_report else None,
                       "removed_blocks": compress_report["removed_blocks"] if compress_report else [],
                       "transformer_config": tr_config},
            "target": profile.to_dict(),
            "components": {
                "text": text,
                "transformer": {"variants": variants, "io": spec.to_dict(), "exporter": exporter,
                                "fresh_input_max_abs_error": fresh_err, "fp32_bytes": fp32_bytes,
                                "bytes": {v: ox.size_of(tmp / f) for v, f in variants.items()},
                                "reference": reference},
                "vae_decoder": {"file": "vae_decoder/model.onnx", "precision": opts.compute,
                                **({"fp32_file": "vae_decoder/fp32/model.onnx"} if opts.fp32_reference else {})},
            },
            "generation": generation,
            "int4": {**{k: v for k, v in qrep.to_dict().items() if k != "layer_error"}, "compute": opts.compute,
                     "cpu_kernel": opts.cpu_kernel, "cpu_converted": n_cpu, "cpu_source": "int4",
                     "report": "quant_report.json"},
            "engines": engines,
            "memory": memory,
            "tools": _versions(),
        }
        (tmp / "quant_report.json").write_text(json.dumps(
            {**qrep.to_dict(), "compute": opts.compute, **({"t5": t5_rep.to_dict()} if t5_rep is not None else {})}, indent=2))
        hashes: dict[str, Any] = {}  # each file's sha256 is computed once, however often the manifest is finished
        finalize_manifest(tmp, manifest, hashes)  # the runtime reads the manifest: finish it once before the e2e check
        say("end-to-end check through the packaged components")
        report.checks.append(_e2e_check(tmp, e2e_prompts, e2e_latents, e2e_ref, gen, p.e2e_min_psnr_db))
        (tmp / "parity.json").write_text(json.dumps(report.to_dict(), indent=2))
        if not report.passed and not opts.allow_parity_failure:
            report_path.write_text(json.dumps(report.to_dict(), indent=2))
            first = report.failures()[0]
            hint = ("; T5 in INT8 keeps more of it (--t5 int8)" if first.startswith("text encoders")
                    and memory["precisions"].get("t5") == "int4" else "")
            raise HpedgeError(f"parity failed, no package written (report: {report_path}): {first}{hint}",
                              HpedgeError.CHECK_FAILED)
        manifest["parity"] = {"passed": report.passed, "overridden": not report.passed, "report": "parity.json",
                              "checks": {c.name: c.passed for c in report.checks}}
        manifest["seconds"] = round(time.time() - t0, 1)
        manifest = finalize_manifest(tmp, manifest, hashes)
    if report_path.exists() and report.passed:
        report_path.unlink()
    if opts.archive:
        write_archive(out, out.with_name(out.name + ".tar"))
    return manifest


def _fits(ref: Any, profile: Profile, opts: ExportOptions) -> dict[str, Any]:
    """The package's footprint on the profile (:mod:`hpedge.export.footprint`); refuses one that cannot fit."""
    from hpedge.export.footprint import estimate

    fp = estimate(ref, opts.target, opts.residency, opts.drop_t5, t5=opts.t5)
    if not fp.fits():
        parts = ", ".join(f"{c} {b / 1e9:.2f}" for c, b in fp.weights.items())
        acts = ", ".join(f"{c} {b / 1e9:.2f}" for c, b in fp.activations.items())
        raise HpedgeError(f"this package does not fit {profile.name} ({fp.residency}, {fp.resolution} px): it needs "
                          f"{fp.need() / 1e9:.2f} GB (weights GB: {parts}; activations GB: {acts}), "
                          f"{(fp.need() - fp.capacity) / 1e9:.2f} GB more than the {fp.capacity / 1e9:.2f} GB available; "
                          f"compress it first (`hpedge compress --target {profile.name}`), or see `hpedge plan --target`")
    return fp.to_dict()


def _export_text(pipe: Any, tmp: Path, work: Path, seq: int, opts: ExportOptions, t5: str,
                 calibration_prompts: list[str], width: int) -> tuple[dict[str, Any], Any]:
    """CLIP graph in ``opts.compute``; T5 in ``opts.compute`` with INT4 weights (ModelOpt, calibrated on the
    calibration prompts' token ids). Returns the manifest's ``text`` section and T5's quantization report."""
    from hpedge.export.quantize import quantize_int4, quantize_int8_weights, store_floats_fp16

    family = family_of(pipe)
    enc = {"clip": {"file": "text/clip/model.onnx", "precision": opts.compute,
                    **ox.export_text_encoder(pipe, "clip", tmp / "text" / "clip" / "model.onnx", seq, opts.compute)}}
    rep = None
    if family == "flux" or pipe.text_encoder_3 is not None:
        src = work / "t5" / "model.onnx"
        entry = ox.export_text_encoder(pipe, "t5", src, seq, opts.compute)
        ids = ox.tokenize(pipe, calibration_prompts, seq)["t5_ids"]
        dst = tmp / "text" / "t5" / "model.onnx"
        if t5 == "int4":
            rep = quantize_int4(src, dst, [{"t5_ids": ids[i : i + 1]} for i in range(len(ids))], opts.method, 128)
        else:
            rep = quantize_int8_weights(src, dst)
        store_floats_fp16(dst)
        enc["t5"] = {"file": "text/t5/model.onnx", "precision": t5, **entry,
                     "quantization": {"method": rep.method, "block_size": rep.block_size, "quantized": len(rep.quantized),
                                      "excluded": len(rep.excluded),
                                      "max_layer_error": max(rep.layer_error.values(), default=0.0)}}
    if opts.fp32_reference:  # the exact graphs, for the package's fp32 variant
        for name, e in enc.items():
            e["fp32_file"] = f"text/{name}/fp32/model.onnx"
            ox.export_text_encoder(pipe, name, tmp / e["fp32_file"], seq, "fp32")
    return {"encoders": enc, "t5_dropped": "t5" not in enc, "t5_shape": [seq, width]}, rep


def _text_reference(pipe: Any, prompts: list[str], seq: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Held-out prompts' token ids and the pipeline's own ``encode_prompt`` embeddings for them (PyTorch)."""
    import torch

    from hpedge.models.denoise import encode

    ids = ox.tokenize(pipe, prompts, seq)
    with torch.no_grad():
        ref = encode(pipe, prompts, seq)
    return ids, {"text/prompt_embeds": ref.prompt_embeds.float().cpu().numpy(), "text/pooled": ref.pooled.float().cpu().numpy()}


def _text_parity(family: str, root: Path, text: dict[str, Any], ids: dict[str, np.ndarray], ref: dict[str, np.ndarray],
                 min_cosine: float) -> Check:
    """Prompt embeddings of the packaged encoders (ONNX Runtime) vs the pipeline's ``encode_prompt`` (PyTorch)."""
    from hpedge.backends import ort
    from hpedge.export import parity as par
    from hpedge.runtime import combine_text

    outs: dict[str, np.ndarray] = {}
    for e in text["encoders"].values():
        outs.update(zip(e["outputs"], ort.run(ort.session(root / e["file"], "auto", low_memory=True), {k: ids[k] for k in e["inputs"]})))
    pe, pooled = combine_text(family, outs, tuple(text["t5_shape"]))
    ref_pe, ref_pooled = ref["text/prompt_embeds"], ref["text/pooled"]
    if ref_pe.shape != pe.shape:
        raise HpedgeError(f"internal: packaged prompt embeddings {pe.shape} differ in shape from encode_prompt's {ref_pe.shape}")
    what = "CLIP " + text["encoders"]["clip"]["compute"] + ("" if text["t5_dropped"] else
                                                            f", T5 {text['encoders']['t5']['precision'].upper()}")
    c = par.compare_quality(f"text encoders ({what}) vs PyTorch encode_prompt: prompt embeddings, held-out prompts",
                            list(ref_pe), list(pe), min_cosine, 0.0)
    c2 = par.compare_quality("pooled", list(ref_pooled), list(pooled), min_cosine, 0.0)
    c.metrics["pooled_min_cosine"] = c2.metrics["min_cosine"]
    c.passed = c.passed and c2.passed
    return c


def _vae_reference(pipe: Any, latent_hw: int) -> dict[str, np.ndarray]:
    """Seeded N(0, 1) latents at the package's opt size and PyTorch's decode of them (the VAE's own dtype)."""
    import torch

    c = int(pipe.vae.config.latent_channels)
    lat = np.random.default_rng(11).standard_normal((1, c, latent_hw, latent_hw)).astype(np.float32)
    vae = pipe.vae
    with torch.no_grad():
        z = torch.from_numpy(lat).to(vae.device) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        ref = (vae.decode(z.to(vae.dtype), return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1).cpu().numpy()
    return {"vae/latents": lat, "vae/image": ref}


def _vae_parity(path: Path, ref: dict[str, np.ndarray], compute: str, min_psnr: float) -> Check:
    """The packaged VAE decoder (ONNX Runtime) vs PyTorch's decode of the same latents."""
    from hpedge.backends import ort
    from hpedge.export import parity as par

    got = ort.run(ort.session(path, "auto", low_memory=True), {"latents": ref["vae/latents"]})[0]
    return par.compare_quality(f"VAE decoder ({compute}) vs PyTorch fp32 decode", [ref["vae/image"]], [got], 0.0, min_psnr)


def _within(value: int, res: tuple[int, int, int]) -> int:
    """The model's default size if the package covers it, else the profile's opt size."""
    return value if res[0] <= value <= res[2] else res[1]


E2E_SEED = 5


def _stock_images(pipe: Any, prompts: list[str], gen: Defaults, latents: np.ndarray) -> np.ndarray:
    """Stock diffusers' images (the original pipeline's own call) from initial noise ``latents``."""
    import torch

    ref = sample(pipe, prompts, gen, latents=torch.from_numpy(latents))
    return ref[..., 0] if ref.shape[-1] == 1 else ref


def _e2e_check(root: Path, prompts: list[str], latents: np.ndarray, ref: np.ndarray, gen: Defaults, min_psnr: float) -> Check:
    """Full generations through the packaged components (int4_cpu) vs stock diffusers' images ``ref``: same
    prompts, initial noise, steps, size and guidance (the model's default: CFG batches, FLUX.1-dev's guidance
    input and the scheduler's shift are all in the comparison)."""
    from hpedge.export.parity import quality
    from hpedge.runtime import Package

    pkg = Package(root, variant="int4_cpu", device="cpu", verify=False)  # hashed when the manifest was finished
    got = pkg.generate(prompts, steps=gen.steps, guidance=gen.guidance, latents=latents)
    q = [quality(r, g) for r, g in zip(ref, got)]
    psnr = min(x["psnr_db"] for x in q)
    return Check("end-to-end images: package (int4_cpu) vs stock diffusers", psnr >= min_psnr,
                 {"min_psnr_db": psnr, "mean_psnr_db": float(np.mean([x["psnr_db"] for x in q])),
                  "steps": gen.steps, "guidance": gen.guidance, "size": [gen.height, gen.width]},
                 {"min_psnr_db": min_psnr})


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("hpedge", "torch", "diffusers", "transformers", "onnx", "onnxruntime-gpu", "onnxruntime",
                "nvidia-modelopt", "polygraphy", "tensorrt", "tensorrt-rtx-cu12"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def check(package: Path, rerun_parity: bool = True) -> dict[str, Any]:
    """``hpedge check``: verify checksums and the manifest, then rerun parity.

    Parity is rerun without the original model: every transformer variant in the package runs on the
    held-out inputs stored at export time and is compared with the PyTorch outputs stored next to them
    (cosine/PSNR limits from the manifest's profile for INT4, atol/rtol for fp32), and the packaged
    pipeline must produce finite images in [0, 1].
    """
    from hpedge.export import parity as par
    from hpedge.runtime import Package

    pkg = Package(package, variant="int4", device="cpu")  # raises CHECK_FAILED on any tampering
    result: dict[str, Any] = {"package": str(package), "files": len(pkg.manifest["files"]), "checks": []}
    if not rerun_parity:
        return result
    feeds, ref = load_reference(package, pkg.manifest)
    variants = pkg.manifest["components"]["transformer"]["variants"]
    lim = pkg.manifest["target"]["parity"]
    output = pkg.manifest["components"]["transformer"]["io"]["outputs"][0]
    for v in variants:
        results = par.run_onnxrt(package / variants[v], feeds, v)
        name = f"{v} vs PyTorch (stored reference)"
        c = (par.compare_fp32(ref, results, output, lim["fp32_atol"], lim["fp32_rtol"], name) if v == "fp32" else
             par.compare_quality(name, ref, par.outputs_of(results), lim["int4_min_cosine"], lim["int4_min_psnr_db"]))
        result["checks"].append(asdict(c))
    result["checks"].extend(_component_checks(package, pkg, lim))
    result["checks"].extend(_engine_checks(package, pkg.manifest, feeds, ref))
    img = pkg.generate(["a photo of a cat"], seed=0, steps=min(4, pkg.manifest["generation"]["default_steps"]))
    ok = bool(np.isfinite(img).all() and img.min() >= 0 and img.max() <= 1)
    result["checks"].append({"name": "package generates finite images in [0, 1]", "passed": ok})
    result["passed"] = all(c["passed"] for c in result["checks"])
    if not result["passed"]:
        failed = [c["name"] for c in result["checks"] if not c["passed"]]
        raise HpedgeError(f"parity failed for {package}: {', '.join(failed)}", HpedgeError.CHECK_FAILED)
    return result


def _component_checks(package: Path, pkg: Any, lim: dict[str, Any]) -> list[dict[str, Any]]:
    """The packaged text encoders and VAE decoder (ONNX Runtime) against PyTorch's outputs stored at export."""
    from safetensors.numpy import load_file

    from hpedge.export import parity as par

    t = load_file(str(package / pkg.manifest["components"]["transformer"]["reference"]["file"]))
    if "text/prompt_embeds" not in t:
        raise HpedgeError(f"{package}: the parity reference has no text encoder outputs; export it again",
                          HpedgeError.CHECK_FAILED)
    ids = {k.split("/", 2)[2]: v for k, v in t.items() if k.startswith("text/ids/")}
    pe, pooled = pkg.encode_ids(ids)
    cos = float(lim.get("text_min_cosine", 0.99))
    c = par.compare_quality("text encoders vs PyTorch (stored reference): prompt embeddings", list(t["text/prompt_embeds"]),
                            list(pe), cos, 0.0)
    c2 = par.compare_quality("pooled", list(t["text/pooled"]), list(pooled), cos, 0.0)
    c.metrics["pooled_min_cosine"] = c2.metrics["min_cosine"]
    c.passed = c.passed and c2.passed
    img = pkg.decode(t["vae/latents"])
    v = par.compare_quality("VAE decoder vs PyTorch (stored reference)", [t["vae/image"]], [img], 0.0,
                            float(lim.get("vae_min_psnr_db", 30.0)))
    return [asdict(c), asdict(v)]


def _engine_checks(package: Path, manifest: dict[str, Any], feeds: list[dict[str, np.ndarray]],
                   ref: list[np.ndarray]) -> list[dict[str, Any]]:
    """Each built engine against the stored references where this machine can run it; a skip that says why elsewhere.

    The transformer engine is compared with the stored PyTorch outputs (profile's INT4 limits); the text and
    VAE engines with ONNX Runtime running their own ONNX files on the same inputs (cosine >= 0.999).
    """
    from hpedge.export import engine_build
    from hpedge.export import parity as par

    section = manifest.get("engines") or {}
    if section.get("status") != "built":
        return [{"name": f"engines {section.get('status', 'absent')}: {section.get('reason', '')}", "passed": True,
                 "skipped": True}]
    av = eng.can_run(section)
    caps = ", ".join("sm_" + c.replace(".", "") for c in section["compute_capabilities"])
    if not av.ok:
        return [{"name": f"{name} engine ({section['library']}, {caps}): built here; not run: {av.reason}",
                 "passed": True, "skipped": True} for name in section["components"]]
    lim = manifest["target"]["parity"]
    out = []
    for name, c in section["components"].items():
        runner = eng.open_runner(package, section, name)
        if name == "transformer":
            tf, tr = engine_build.within_batch(c, feeds, ref)
            got = [runner.run(f)[0] for f in tf]
            chk = par.compare_quality(f"transformer engine ({section['library']}) vs PyTorch (stored reference)", tr, got,
                                      lim["int4_min_cosine"], lim["int4_min_psnr_db"])
        else:
            from hpedge.backends import ort

            sample = {k: _sample_input(k, v["opt"]) for k, v in c["shapes"].items()}
            want = ort.run(ort.session(package / c["onnx"], "cpu"), sample)
            chk = par.compare_quality(f"{name} engine ({section['library']}) vs ONNX Runtime", want[:1], runner.run(sample)[:1],
                                      0.999, 0.0)
        runner.save_cache()
        out.append(asdict(chk))
    return out


def _sample_input(name: str, shape: list[int]) -> np.ndarray:
    rng = np.random.default_rng(0)
    if name.endswith("_ids"):
        return rng.integers(0, 100, size=shape).astype(np.int64)
    return rng.standard_normal(shape).astype(np.float32)


def build(package: Path) -> dict[str, Any]:
    """``hpedge build PACKAGE``: build the package's pending engines on this machine (a Jetson board for
    standard TensorRT; any host for TensorRT-RTX). They join the package only if the transformer engine
    matches the PyTorch reference stored at export time, where this machine can run it."""
    from hpedge.export import engine_build
    from hpedge.export.package import finalize_manifest
    from hpedge.runtime import Package

    pkg = Package(package, variant="int4", device="cpu")
    section = pkg.manifest.get("engines")
    if not section:
        raise HpedgeError(f"{package} has no engines section (written by an older hpedge); export it again")
    target = pkg.manifest["target"]
    av = engine_build.eng.library(section["library"]).build_availability(tuple(section["compute_capabilities"]))
    if not av.ok:
        raise HpedgeError(f"cannot build the {section['library']} engines here: {av.reason}")
    built = engine_build.build_all(package, engine_build.planned(section["components"]), target)
    new = {**section, "status": "built", "reason": av.reason, "components": built}
    feeds, ref = load_reference(package, pkg.manifest)
    lim = target["parity"]
    new["parity"] = _engine_parity(package, new, feeds, ref, lim["int4_min_cosine"], lim["int4_min_psnr_db"])
    if new["parity"].get("run") and not new["parity"]["passed"]:
        for c in built.values():
            (package / c["file"]).unlink(missing_ok=True)
        raise HpedgeError(f"the engines built but the transformer engine failed parity, not added to the package: "
                          f"{new['parity']}", HpedgeError.CHECK_FAILED)
    manifest = {k: v for k, v in pkg.manifest.items() if k not in ("files", "manifest_sha256")}
    manifest["engines"] = new
    return finalize_manifest(package, manifest)
