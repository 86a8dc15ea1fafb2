"""``hpedge export``: pipeline folder -> verified package for a device profile, as a sequence of named stages.

1. :func:`_text` -- before the transformer's weights are read: every prompt the export samples with is encoded as
   the stock pipeline call encodes it (T5 held as stored and computed in float32), the text encoders' reference
   taken, and the encoders exported (T5 quantized) and freed, so that they never share memory with the transformer;
2. :func:`_capture` -- calibration inputs from real denoising runs of the pipeline (never random data), one batch
   row each, and the transformer's, VAE's and end-to-end PyTorch references. The transformer is held as its
   checkpoint stores it (bfloat16 for the published models) and computed in float32
   (:func:`hpedge.models.precision.fp32_compute`): the exact numbers of a float32 model, at 2 bytes per parameter;
   :func:`_export_graphs` -- the transformer exported in fp16 (cast in place), checked element-wise in float32
   against PyTorch on fresh inputs before anything else runs: through an exported float32 graph while its weights
   fit protobuf's limit (or with ``--compute fp32`` / ``--fp32-reference``), above it through the fp16 graph
   widened to float32 (:mod:`hpedge.export.widen`, the same weights on disk) against the fp16 weights computed in
   float32, so that no float32 copy of a large model is ever made. The PyTorch transformer leaves memory right
   after, so no ONNX Runtime session or quantizer ever runs beside it. Then the VAE decoder;
3. :func:`_quantize` -- INT4 (hpedge's streamed AWQ-clip or RTN, or ModelOpt's AWQ) of the graph TensorRT builds from: its
   engine is strongly typed, so the graph's types (``--compute``) decide the kernels; ``int4_cpu`` (ONNX
   Runtime's CPU provider) is made from the very same 4-bit weights and scales (:mod:`hpedge.export.cpu_int4`);
4. engines (:mod:`hpedge.export.build`): TensorRT-RTX profiles build here on any host; standard TensorRT
   profiles (Jetson) plan them for an on-device ``hpedge build``;
5. :func:`_parity` -- every component against PyTorch (:mod:`hpedge.export.verify`); it gates packaging;
6. a manifest with the sha256 of every file (:mod:`hpedge.runtime.format`); the folder is written atomically.
"""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import json
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from hpedge.backends import polygraphy_runner as pgy
from hpedge.errors import HpedgeError
from hpedge.export import build as engine_build
from hpedge.export import onnx_export as ox
from hpedge.export import precision_variant, verify, vq_variant
from hpedge.export.cpu_int4 import KERNELS, convert
from hpedge.export.dequantized import dynamic_uint8_inputs, int8_kernel_weight, load_dequantized, reload_weights
from hpedge.export.driver import driven_images
from hpedge.export.encoders import export_text_encoder, export_vae_decoder, text_inputs, tokenize
from hpedge.export.onnx_io import size_of
from hpedge.export.quantize import QuantReport, quantize_int4, quantize_int8_weights, rows_of, store_floats_fp16
from hpedge.export.verify import Check, ParityReport
from hpedge.export.widen import fp32_view
from hpedge.io import atomic_dir, check_parent
from hpedge.models import adapters
from hpedge.models.denoise import family_of
from hpedge.models.families import family as family_facts
from hpedge.models.loading import (
    TEXT_ENCODER_ATTRS,
    ModelRef,
    compute_device,
    drop_t5,
    load_pipeline,
    read_text_encoders,
    read_transformer,
    resolve,
)
from hpedge.models.meta import meta_transformer, text_encoder_held_bytes
from hpedge.models.precision import fp32_compute, t5_fp32_compute
from hpedge.models.sampling import (
    Defaults,
    check_pipeline,
    prompt_embeddings,
    recording_transformer_calls,
    sample,
    with_overrides,
    zoo_marker,
)
from hpedge.models.sampling import defaults as sampling_defaults
from hpedge.prompts import calibration
from hpedge.runtime.format import finalize_manifest, save_implementation_reference, save_reference, write_archive
from hpedge.runtime.package import Package
from hpedge.runtime.schedule import initial_latents
from hpedge.targets import precisions
from hpedge.targets.footprint import choose_precision, estimate, refuse_unless_fits
from hpedge.targets.host import check_host
from hpedge.targets.profiles import Profile, load_profile
from hpedge.targets.shapes import resolution_range
from hpedge.zoo.evaluator import evaluator_for

REFERENCE_SAMPLES = 2
CHECK_STEPS = 8  # at most, in the implementation case hpedge check reruns
IMPL_SAMPLES = 2  # end-to-end samples the implementation check drives through stock diffusers
# float32 weights of the transformer above which the export's element-wise check runs on the fp16 graph widened to
# float32 instead of an exported float32 graph (protobuf's limit, where the exporters change too)
FP32_CHECK_GRAPH_LIMIT = ox.PROTOBUF_LIMIT
E2E_SEED = 5


@dataclass
class ExportOptions:
    target: str = "rtx4090"
    engine: str = "auto"  # auto | require | skip
    method: str = "awq_clip"  # awq_clip | rtn (hpedge, streamed) | awq_clip_modelopt (ModelOpt's own pass)
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
    residency: str = "auto"  # auto | resident | sequential (hpedge.targets.footprint)
    drop_t5: bool = False  # SD3: ship no T5 (zeros in its place, as diffusers without text_encoder_3)
    t5: str = "auto"  # T5's weights: int4 (ModelOpt, --method) | int8 (weight-only, per channel) | auto (int8 where it fits)
    ignore_host_memory: bool = False  # go ahead although the host has less memory available than measured to be needed
    precision: str = "auto"  # the transformer engine's: auto | int4 | int8 | fp8 | nvfp4 (hpedge.targets.precisions)


@dataclass
class _Run:
    """What the stages share: the resolved inputs, then what each stage produced."""

    model: str
    opts: ExportOptions
    profile: Profile
    ref: ModelRef
    memory: dict[str, Any]
    build_now: bool
    engine_reason: str
    say: Callable[[str], None]
    t0: float = 0.0  # when the export started (after the up-front checks)
    pipe: Any = None
    family: str = ""
    res: tuple[int, int, int] = (0, 0, 0)
    gen: Any = None  # the calibration and end-to-end sampling settings (Defaults)
    model_gen: Any = None  # the model's own defaults
    spec: Any = None  # the transformer's IOSpec
    prompts: list[str] = field(default_factory=list)
    refs: dict[str, Any] = field(default_factory=dict)  # PyTorch references and captured inputs
    fp32: Path = Path()  # the float32 graph the export is checked with
    fp32_check: str = ""  # what that graph is
    widened: bool = False  # ``fp32`` is the fp16 graph widened to float32 (no weights of its own)
    exporter: str = ""
    fp32_bytes: int = 0
    candidates: list[str] = field(default_factory=list)  # the engine precisions to try, best first
    precision: dict[str, Any] = field(default_factory=dict)  # the manifest's ``precision`` section
    keep: dict[str, str] = field(default_factory=dict)  # weight key -> layer, left in 16 bits by FP8 / NVFP4
    footprints: dict[str, Any] = field(default_factory=dict)  # each candidate precision's package footprint

    @property
    def seq(self) -> int:
        return int(self.gen.max_sequence_length)


def capture_inputs(pipe: Any, prompts: list[str], gen: Defaults, names: list[str], seed: int,
                   every: int = 4, embeds: dict[str, Any] | None = None) -> list[dict[str, np.ndarray]]:
    """Transformer inputs recorded during real denoising runs (every ``every``-th call) at sampling
    defaults ``gen``: with CFG, the [negative, positive] batch the pipeline really feeds the transformer (parity
    judges each such batch, run one row at a time and joined again; so does AWQ-clip's activation sampling,
    :func:`rows_of`)."""
    with recording_transformer_calls(pipe, every) as calls:
        sample(pipe, prompts, gen, seeds=[seed * 1000 + i for i in range(len(prompts))], output="latent", embeds=embeds)
    feeds = [{k: c[k].float().numpy() for k in names if c.get(k) is not None} for c in calls]
    for f in feeds:  # the pipeline passes one guidance value per sample; the graph takes one per batch row
        if "guidance" in names and "guidance" in f and f["guidance"].shape[0] != f["hidden_states"].shape[0]:
            f["guidance"] = np.broadcast_to(f["guidance"], (f["hidden_states"].shape[0],)).astype(np.float32)
    return feeds


def export(model: str, out: Path, opts: ExportOptions, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    run = _prepare(model, out, opts, progress or (lambda _s: None))
    report_path = out.resolve().parent / f"{out.name}.parity.json"
    with atomic_dir(out, overwrite=opts.overwrite) as tmp:
        work = tmp / ".work"  # intermediate files, removed before the manifest is written
        _load(run)
        text, t5_rep = _text(run, tmp, work)  # text encoders: used, exported and freed before the transformer loads
        _capture(run)
        _export_graphs(run, tmp, work)
        fp32_check = _check_fp32(run, tmp)
        qrep, n_cpu = _quantize(run, tmp, work)
        _dequantized_reference(run, tmp, qrep)
        _vq_reference(run)
        engines = _engines(run, tmp, text)
        manifest = _manifest(run, tmp, text, engines, qrep, n_cpu, t5_rep)
        shutil.rmtree(work, ignore_errors=True)
        hashes: dict[str, Any] = {}  # each file's sha256 is computed once, however often the manifest is finished
        finalize_manifest(tmp, manifest, hashes)  # the runtime reads the manifest: finish it once before parity
        report, impl = _parity(run, tmp, text, engines, fp32_check)
        (tmp / "parity.json").write_text(json.dumps(report.to_dict(), indent=2))
        _gate(run, report, report_path)
        manifest["engines"] = engines
        manifest["parity"] = {"passed": report.passed, "overridden": not report.passed, "report": "parity.json",
                              "checks": {c.name: c.passed for c in report.checks}, "implementation": impl}
        manifest["seconds"] = round(time.time() - run.t0, 1)
        manifest = finalize_manifest(tmp, manifest, hashes)
    if report_path.exists() and report.passed:
        report_path.unlink()
    if opts.archive:
        write_archive(out, out.with_name(out.name + ".tar"))
    return manifest


def _prepare(model: str, out: Path, opts: ExportOptions, say: Callable[[str], None]) -> _Run:
    """Every option and the target checked, and the package's footprint sized, before any work."""
    for name, v in (("calibration-prompts", opts.calibration_prompts), ("e2e-samples", opts.e2e_samples),
                    ("steps", opts.steps)):
        if v is not None and v < 1:
            raise HpedgeError(f"--{name} must be at least 1, got {v}")
    if opts.cpu_kernel not in KERNELS:
        raise HpedgeError(f"--cpu-kernel must be one of {', '.join(KERNELS)}, got {opts.cpu_kernel!r}")
    profile = load_profile(opts.target)
    if "int4" not in profile.precisions:
        raise HpedgeError(f"target {profile.name} cannot run INT4 weights (precisions: {', '.join(profile.precisions)})")
    if opts.compute not in ox.COMPUTE_DTYPES:
        raise HpedgeError(f"--compute must be one of {', '.join(ox.COMPUTE_DTYPES)}, got {opts.compute!r}")
    if opts.compute not in profile.precisions:
        raise HpedgeError(f"target {profile.name} cannot compute in {opts.compute} (precisions: {', '.join(profile.precisions)})")
    check_parent(out)
    if out.exists() and not opts.overwrite:
        raise HpedgeError(f"{out} already exists; pass --overwrite to replace it")
    ref = resolve(model)
    t0 = time.time()
    choice = choose_precision(ref, profile, opts.precision, opts.residency, opts.drop_t5, t5=opts.t5)
    # a package that cannot fit is not built
    refuse_unless_fits(choice.footprints[choice.order[0] if choice.order else list(choice.footprints)[-1]])
    fitting, why = choice.order, choice.why
    build_now, engine_reason = engine_build.plan(opts.engine, profile, {fitting[0], "int4", opts.compute})
    memory = choice.footprints[fitting[0]].to_dict()
    # nor one this host is measured to run out of memory exporting
    memory["host"] = check_host(adapters.numel(meta_transformer(ref)), opts.method, opts.ignore_host_memory,
                                text_encoder_held_bytes(ref, opts.drop_t5))
    say(f"transformer precision: {why}")
    return _Run(model, opts, profile, ref, memory, build_now, engine_reason, say, t0, candidates=fitting,
                precision={"requested": opts.precision, "why": why},
                footprints={p: choice.footprints[p].to_dict() for p in fitting})


def _load(run: _Run) -> None:
    """The pipeline (its transformer from its config alone, weights later), its family, the resolution range and
    the sampling settings of calibration and checks."""
    run.say("loading pipeline (text encoders and VAE; the transformer's config)")
    # T5 as its checkpoint stores it (16 bits for published SD3.5 and FLUX.1), computed in float32
    pipe = run.pipe = load_pipeline(run.ref, transformer_on_meta=True, t5_as_stored=True)
    if run.opts.drop_t5:
        drop_t5(pipe)  # diffusers' own T5-less SD3 (zeros in T5's place)
    check_pipeline(pipe)
    run.family = family_of(pipe)
    run.refs["transformer_config"] = {k: v for k, v in dict(pipe.transformer.config).items() if not k.startswith("_")}
    run.res = resolution_range(run.family, dict(pipe.transformer.config), pipe.vae_scale_factor, run.profile,
                               zoo_marker(run.ref.path))
    run.model_gen = sampling_defaults(pipe, run.ref.path)
    # calibration and the end-to-end check sample at the model's defaults, at the profile's opt size
    run.gen = with_overrides(run.model_gen, height=run.res[1], width=run.res[1], steps=run.opts.steps)
    batch = (run.profile.batch.min, run.profile.batch.opt, run.profile.batch.max)
    run.spec = ox.transformer_spec(pipe, run.res, batch, run.seq)


def _text(run: _Run, tmp: Path, work: Path) -> tuple[dict[str, Any], QuantReport | None]:
    """The text encoders' part, before the transformer's weights are read: every prompt the export samples with is
    encoded as the stock pipeline call encodes it (:func:`prompt_embeddings`), the held-out prompts' text
    reference is taken, and the encoders are exported and freed. The text encoders (T5-XXL: 19 GB in float32) and
    the transformer are never in memory together."""
    pipe, gen, r = run.pipe, run.gen, run.refs
    run.say("encoding the calibration, held-out and end-to-end prompts; text encoder references")
    prompts, _ = calibration(evaluator_for(run.ref.path), 2 * run.opts.calibration_prompts, seed=21)
    half = len(prompts) // 2
    run.prompts = prompts
    encoders = [m for m in (getattr(pipe, a, None) for a in TEXT_ENCODER_ATTRS) if m is not None]
    dev = compute_device()
    for m in encoders:
        m.to(dev)
    t5 = getattr(pipe, family_facts(run.family).t5_attribute, None)
    with t5_fp32_compute(t5) if t5 is not None else contextlib.nullcontext():
        r["embeds_calib"] = prompt_embeddings(pipe, prompts[:half], gen, device=dev)
        r["embeds_held"] = prompt_embeddings(pipe, prompts[half:], gen, device=dev)
        r["text"] = verify.text_reference(pipe, prompts[half:], run.seq, device=dev)
    for m in encoders:
        m.to("cpu")
    r["e2e_prompts"] = prompts[half:][: run.opts.e2e_samples]
    r["embeds_e2e"] = {k: v[: len(r["e2e_prompts"])] for k, v in r["embeds_held"].items()}
    t5 = run.memory["precisions"].get("t5", "")
    t5_what = t5.upper() + (f" ({run.opts.method})" if t5 == "int4" else "")
    run.say(f"exporting text encoders (CLIP {run.opts.compute}" + ("" if run.opts.drop_t5 else f", T5 {t5_what}") + ")")
    text, t5_rep = _export_text(run, tmp, work, t5)
    run.refs["tokenizers"] = _tokenizer_entries(pipe, tmp, run.seq)
    return text, t5_rep


def _capture(run: _Run) -> None:
    """The transformer's weights read as stored, then everything PyTorch is asked for (on the accelerator where
    there is one)."""
    pipe = run.pipe
    run.say("loading the transformer as its checkpoint stores it")
    # bfloat16 for published SD3.5 and FLUX.1, computed in float32
    pipe.transformer = read_transformer(run.ref)
    run.refs["transformer_storage"] = str(next(pipe.transformer.parameters()).dtype).removeprefix("torch.")
    run.say("capturing calibration inputs from real denoising runs")
    names = ox.input_names(pipe.transformer)
    dev = compute_device()
    for m in (pipe.transformer, pipe.vae):  # the text encoders are gone (meta device)
        m.to(dev)
    with fp32_compute(pipe.transformer):
        _capture_all(run, names)
    for m in (pipe.transformer, pipe.vae):
        m.to("cpu")


def _capture_all(run: _Run, names: list[str]) -> None:
    pipe, gen, r = run.pipe, run.gen, run.refs
    half = len(run.prompts) // 2
    r["calib"] = capture_inputs(pipe, run.prompts[:half], gen, names, seed=1, embeds=r.pop("embeds_calib"))
    r["held"] = capture_inputs(pipe, run.prompts[half:], gen, names, seed=2, embeds=r.pop("embeds_held"))
    run.say("PyTorch references: transformer (held-out inputs), VAE, end-to-end images")
    r["fresh"] = verify.fresh_feeds(run.spec, run.family)
    r["out"] = verify.torch_outputs(pipe, r["held"])
    r["vae"] = verify.vae_reference(pipe, run.res[1] // pipe.vae_scale_factor)
    vs = pipe.vae_scale_factor
    channels = int(pipe.transformer.config.in_channels) // family_facts(run.family).latent_packing
    r["e2e_latents"] = initial_latents(len(r["e2e_prompts"]), E2E_SEED, channels, gen.height // vs, gen.width // vs)
    r["e2e_images"] = verify.stock_images(pipe, r["e2e_prompts"], gen, r["e2e_latents"], embeds=r.pop("embeds_e2e"))


def _export_graphs(run: _Run, tmp: Path, work: Path) -> None:
    """The transformer (fp16 for the INT4 graph; the float32 graph it is checked with), then the VAE decoder."""
    pipe, opts, r = run.pipe, run.opts, run.refs
    run.fp32_bytes = 4 * sum(p.numel() for p in pipe.transformer.parameters())
    run.exporter = ox.auto_exporter(pipe.transformer) if opts.exporter == "auto" else opts.exporter
    fresh = list(r["fresh"].values())
    # a float32 graph is shipped or quantized, or is small enough to be the exact check: float32 weights for it;
    # above that, the fp16 graph widened to float32 is the check (no float32 copy of the weights anywhere)
    view = run.widened = opts.compute == "fp16" and not opts.fp32_reference and run.fp32_bytes > FP32_CHECK_GRAPH_LIMIT
    if not view:
        run.say("exporting transformer (fp32 ONNX; the model is held in float32 for it)")
        pipe.transformer.float()
        r["check_out"], r["check_fresh_out"] = r["out"], verify.torch_outputs(pipe, fresh)
        run.fp32 = (tmp / "transformer" if opts.fp32_reference else work) / "fp32" / "model.onnx"
        ox.export_transformer(pipe.transformer, run.spec, run.fp32, run.exporter)
        run.fp32_check = "fp32 graph"
    if opts.compute == "fp16":
        pipe.transformer.half()  # in place: one 16-bit copy of the weights
        if view:
            # the graph check runs the fp16 graph widened to float32 (hpedge.export.widen), so its reference is
            # these fp16 weights computed in float32
            run.say("PyTorch references of the fp16 weights computed in float32 (fresh min, opt and max-at-batch-1 "
                    "inputs; held-out inputs)")
            with fp32_compute(pipe.transformer):
                r["check_fresh_out"] = verify.torch_outputs(pipe, fresh)
                r["check_out"] = verify.torch_outputs(pipe, r["held"])
        run.say("exporting transformer (fp16 ONNX; the model is cast in place)")
        ox.export_transformer(pipe.transformer, run.spec, work / "fp16" / "model.onnx", run.exporter, dtype="fp16")
        if view:
            run.fp32 = fp32_view(work / "fp16" / "model.onnx")
            run.fp32_check = "fp16 graph widened to float32 (same weights as the fp16 graph)"
    # the layers FP8 / NVFP4 leave in 16 bits, keyed as the quantizer reads them (the graph's node names say nothing)
    run.keep = precision_variant.keep_16bit(pipe.transformer, run.candidates)
    pipe.transformer = None  # no PyTorch transformer from here on
    verify.release_memory()

    run.say(f"exporting the VAE decoder ({opts.compute})")
    f = pipe.vae_scale_factor
    lat = (run.res[0] // f, run.res[1] // f, run.res[2] // f)
    chunks = export_vae_decoder(pipe, tmp / "vae_decoder" / "model.onnx", lat, opts.compute)
    if chunks > 1:
        run.say(f"the VAE decoder's attention runs in {chunks} blocks of queries (exact; its scores are held a "
                "block at a time)")
    if opts.fp32_reference:
        export_vae_decoder(pipe, tmp / "vae_decoder" / "fp32" / "model.onnx", lat)
    pipe.scheduler.save_pretrained(tmp / "scheduler")


def _export_text(run: _Run, tmp: Path, work: Path, t5: str) -> tuple[dict[str, Any], QuantReport | None]:
    """CLIP graph in ``--compute``; T5 in ``--compute`` with INT8 weights or INT4 (``--method``, calibrated on the
    calibration prompts' token ids). Returns the manifest's ``text`` section and T5's quantization report."""
    pipe, opts, seq = run.pipe, run.opts, run.seq
    has_t5 = getattr(pipe, family_facts(run.family).t5_attribute) is not None
    if opts.fp32_reference:  # the exact graphs, for the package's fp32 variant (before the encoders are cast)
        if has_t5:
            getattr(pipe, family_facts(run.family).t5_attribute).float()  # stored 16-bit: its float32 model (in place)
        for name in ("clip", "t5") if has_t5 else ("clip",):
            export_text_encoder(pipe, name, tmp / f"text/{name}/fp32/model.onnx", seq, "fp32")
    # the references were computed: the graphs come from the pipeline's encoders cast in place, which then go
    enc = {"clip": {"file": "text/clip/model.onnx", "precision": opts.compute,
                    **export_text_encoder(pipe, "clip", tmp / "text" / "clip" / "model.onnx", seq, opts.compute, True)}}
    t5_attr = family_facts(run.family).t5_attribute
    _release_encoders(pipe, [a for a in TEXT_ENCODER_ATTRS if a != t5_attr])
    rep = None
    if has_t5:
        src = work / "t5" / "model.onnx"
        # dynamo: T5's weights streamed to external data (T5-XXL width, 3 blocks: 3.7 GB peak RSS, TorchScript's 6.2 GB)
        entry = export_text_encoder(pipe, "t5", src, seq, opts.compute, True, "dynamo")
        _release_encoders(pipe, [t5_attr])  # the graph has its weights: not held while they are quantized
        ids = tokenize(pipe, run.prompts[: len(run.prompts) // 2], seq)["t5_ids"]
        dst = tmp / "text" / "t5" / "model.onnx"
        if t5 == "int4":
            rep = quantize_int4(src, dst, [{"t5_ids": ids[i : i + 1]} for i in range(len(ids))], opts.method, 128)
        else:
            rep = quantize_int8_weights(src, dst)
        _t5_dequantized_reference(run, dst, rep)
        store_floats_fp16(dst)
        enc["t5"] = {"file": "text/t5/model.onnx", "precision": t5, **entry,
                     "quantization": {"method": rep.method, "block_size": rep.block_size, "quantized": len(rep.quantized),
                                      "excluded": len(rep.excluded),
                                      "max_layer_error": max(rep.layer_error.values(), default=0.0)}}
    if opts.fp32_reference:
        for name, e in enc.items():
            e["fp32_file"] = f"text/{name}/fp32/model.onnx"
    width = int(run.refs["transformer_config"]["joint_attention_dim"])
    return {"encoders": enc, "t5_dropped": "t5" not in enc, "t5_shape": [seq, width]}, rep


def _t5_dequantized_reference(run: _Run, graph: Path, rep: QuantReport) -> None:
    """PyTorch's T5 with the quantized graph's own weights (read again as stored, cast in place to the graph's type,
    dequantized weights loaded: :mod:`hpedge.export.dequantized`) on the held-out prompts' ids, computed in float32:
    ``refs["text"]["text/t5_dequantized"]``, the reference of T5's implementation gate."""
    import torch

    if not rep.sources:
        return
    attr = family_facts(run.family).t5_attribute
    run.say("PyTorch T5 with the quantized graph's own weights (held-out prompts)")
    t5 = read_text_encoders(run.ref, torch.float32, as_stored=(attr,), only=(attr,))[attr]
    t5.half() if run.opts.compute == "fp16" else t5.float()  # the graph's weight type (in place)
    done = load_dequantized(t5, graph, rep.sources)
    if done.unmatched:
        raise HpedgeError(f"internal: {len(done.unmatched)} of the T5 graph's {done.quantized} quantized weights match "
                          f"no Linear layer of T5 (first: {done.unmatched[0]}); export aborted")
    ids = torch.from_numpy(run.refs["text"]["text/ids/t5_ids"])
    with torch.no_grad(), t5_fp32_compute(t5):
        run.refs["text"]["text/t5_dequantized"] = t5(ids)[0].float().numpy()
    del t5
    verify.release_memory()


def _release_encoders(pipe: Any, attrs: list[str]) -> None:
    """Exported encoders' weights leave memory (the modules stay on the meta device, for their configs)."""
    for attr in attrs:
        if getattr(pipe, attr, None) is not None:
            getattr(pipe, attr).to("meta")
    verify.release_memory()


def _tokenizer_entries(pipe: Any, root: Path, max_sequence_length: int) -> dict[str, Any]:
    out = {}
    for name, (attr, length) in text_inputs(pipe, max_sequence_length).items():
        tok = getattr(pipe, attr)
        folder = root / "tokenizers" / attr
        tok.save_pretrained(folder)
        if not (folder / "tokenizer.json").exists():
            raise HpedgeError(f"{attr} has no fast tokenizer.json; the runtime needs one")
        out[name] = {"file": f"tokenizers/{attr}/tokenizer.json", "length": length, "pad_id": int(tok.pad_token_id),
                     "pad_token": str(tok.pad_token)}
    return out


def _check_fp32(run: _Run, tmp: Path) -> Check:
    """The fp32 graph against PyTorch: fresh min / opt / max-at-batch-1 inputs abort the export on a mismatch;
    the held-out inputs' comparison joins the parity report."""
    run.say("checking the fp32 graph against PyTorch (fresh min, opt and max-at-batch-1 inputs; held-out inputs)")
    r = run.refs
    r["fresh_err"], held = verify.check_fp32(run.fp32, r["fresh"], r["check_fresh_out"], r["held"], run.profile.parity)
    if not run.widened and not run.opts.fp32_reference and run.opts.compute == "fp16":
        shutil.rmtree(run.fp32.parent)  # checked; on disk it would only take room (4 bytes per parameter)
    p = run.profile.parity
    if run.widened:  # fp16 constants (e.g. attention scales): judged as the fresh inputs are
        return verify.compare_scaled(r["check_out"], held, "out", p.fp32_atol, p.fp32_rtol)
    return verify.compare_fp32(r["check_out"], held, "out", p.fp32_atol, p.fp32_rtol)


def _quantize(run: _Run, tmp: Path, work: Path) -> tuple[QuantReport, int]:
    """One INT4 quantization of the graph TensorRT builds from, and its int4_cpu variant from the same weights."""
    opts = run.opts
    src = work / "fp16" / "model.onnx" if opts.compute == "fp16" else run.fp32
    run.say(f"INT4 quantization ({opts.method}, {'ModelOpt' if opts.method == 'awq_clip_modelopt' else 'hpedge, streamed'}, "
            f"{opts.compute} graph) and its int4_cpu variant")
    int4 = tmp / "transformer" / "int4" / "model.onnx"
    # the widened view stayed (no weights of its own): AWQ-clip samples activations through it (same tensor names)
    view = run.fp32 if run.widened else None
    qrep = quantize_int4(src, int4, run.refs["calib"], opts.method, 128, opts.protect, activations_from=view,
                         progress=run.say)
    run.say(f"int4_cpu variant ({opts.cpu_kernel} kernel) from the INT4 weights")
    n_cpu = convert(int4, tmp / "transformer" / "int4_cpu" / "model.onnx", opts.cpu_kernel)  # reads the scales first
    store_floats_fp16(int4)  # 4-bit weights, 16-bit rest (an fp32 graph keeps its DequantizeLinear scales fp32)
    vq_file = vq_variant.source_file(run.ref.path)
    if vq_file is not None:  # hpedge compress --vq: the same graph with its codebook layers as lookups
        run.say("vq variant: the codebook layers as lookups (Gather over the stored codes and codebooks)")
        dst = tmp / "transformer" / vq_variant.VARIANT / "model.onnx"
        run.refs["vq_graph"] = vq_variant.write_graph(src, dst, vq_file)
    _engine_precision(run, tmp, src, view)
    if src != run.fp32 or not opts.fp32_reference:
        for f in src.parent.glob("*"):
            f.unlink()
    return qrep, n_cpu


def _engine_precision(run: _Run, tmp: Path, src: Path, view: Path | None) -> None:
    """The engines' precision (:func:`hpedge.export.precision_variant.choose`), its graph written from ``src`` (the
    fp16 export); with ``--precision auto`` the first candidate whose transformer passes the quality gate (vs PyTorch
    on the held-out inputs, INT4's limits)."""

    def judge(p: str, dst: Path) -> Check:
        with verify.scratch() as folder:
            results = pgy.run_onnxrt(precision_variant.runnable(p, dst, folder), run.refs["held"], f"onnxrt-{p}",
                                     split=rows_of)
            return verify.transformer_check(f"{p} quality gate", p, results, run.refs["out"], "out", run.profile.parity)

    chosen, rep, tried = precision_variant.choose(run.candidates, run.opts.precision == "auto", src, tmp / "transformer",
                                                  run.refs["calib"], run.keep, view, judge, run.say)
    if rep is not None:
        run.refs["precision_report"] = rep
    # the package's footprint at the precision taken, T5 as it was exported (chosen with the first candidate)
    fp, t5 = run.footprints[chosen], run.memory["precisions"].get("t5")
    if fp["precisions"].get("t5") != t5:
        fp = estimate(run.ref, run.profile, run.opts.residency, run.opts.drop_t5, t5=t5, precision=chosen).to_dict()
    run.memory = {**fp, "host": run.memory["host"]}
    facts = precisions.get(chosen)
    run.precision.update(transformer=chosen, title=facts.title, onnxruntime=facts.ort_cpu, tried=tried,
                         file=f"transformer/{chosen}/model.onnx", activations=facts.activations,
                         **({"quantization": {k: v for k, v in rep.to_dict().items() if k != "layer_error"},
                             "max_layer_error": max(rep.layer_error.values(), default=0.0)} if rep else {}))
    run.say(f"engine precision: {chosen} ({facts.title})")


def _dequantized_reference(run: _Run, tmp: Path, qrep: QuantReport) -> None:
    """PyTorch's outputs for the held-out inputs with each quantized graph's own weights: the transformer read again
    as stored, cast in place to the graph's type and given the INT4 graph's dequantized weights
    (:mod:`hpedge.export.dequantized`), computed in float32 (``refs["out_dq"]``); for ``int4_cpu``'s int8 kernel, the
    same layers then given that kernel's int8 weights, its per-tensor uint8 activations emulated
    (``refs["out_dq_cpu"]``). The references of the component-level implementation gates; none where the quantizer
    did not key its weights (ModelOpt's own pass)."""
    r, pipe = run.refs, run.pipe
    if not qrep.sources:
        r["dq"] = {"reason": f"the {qrep.method} pass of {qrep.implementation} does not trace its weights to the model's layers"}
        return
    run.say("PyTorch references with the INT4 graph's own weights (dequantized into the transformer; held-out inputs)")
    graph = tmp / "transformer" / "int4" / "model.onnx"
    pipe.transformer = read_transformer(run.ref)
    # the graph's weight type (in place)
    pipe.transformer.half() if run.opts.compute == "fp16" else pipe.transformer.float()
    done = load_dequantized(pipe.transformer, graph, qrep.sources)
    r["dq"] = done.to_dict()
    if done.unmatched:
        raise HpedgeError(f"internal: {len(done.unmatched)} of the INT4 graph's {done.quantized} quantized weights match "
                          f"no Linear layer of the transformer (first: {done.unmatched[0]}); export aborted")
    pipe.transformer.to(compute_device())
    with fp32_compute(pipe.transformer):
        r["out_dq"] = verify.torch_outputs(pipe, r["held"])
        if run.opts.cpu_kernel == "int8":
            run.say("PyTorch references with int4_cpu's int8 weights and its activation quantization (held-out inputs)")
            reload_weights(done.layers, graph, int8_kernel_weight)
            with dynamic_uint8_inputs([m for m, _ in done.layers]):
                r["out_dq_cpu"] = verify.torch_outputs(pipe, r["held"])
    pipe.transformer = None
    del done  # its layers are the transformer's: gone only with it
    verify.release_memory()
    _precision_reference(run, tmp)


def _precision_reference(run: _Run, tmp: Path) -> None:
    """PyTorch's outputs for the held-out inputs with the engine precision's graph's own weights and activation
    quantization (``refs["out_dq_<precision>"]``, :func:`hpedge.export.precision_variant.torch_reference`)."""
    p, rep = run.precision["transformer"], run.refs.get("precision_report")
    if rep is None or not rep.sources:
        return
    run.say(f"PyTorch references with the {p} graph's own weights and activation quantization (held-out inputs)")
    pipe = run.pipe
    pipe.transformer = read_transformer(run.ref)
    pipe.transformer.half() if run.opts.compute == "fp16" else pipe.transformer.float()
    with precision_variant.torch_reference(pipe.transformer, tmp / run.precision["file"], rep, p) as ref:
        pipe.transformer.to(compute_device())
        with fp32_compute(pipe.transformer):
            run.refs[f"out_dq_{p}"] = verify.torch_outputs(pipe, run.refs["held"])
            if p in ("fp8", "nvfp4"):  # the weights alone, for the tight gate
                ref.activations = False
                run.refs[f"out_dq_{p}_weights"] = verify.torch_outputs(pipe, run.refs["held"])
    pipe.transformer = None
    verify.release_memory()


def _vq_reference(run: _Run) -> None:
    """PyTorch's outputs for the held-out inputs with the vq variant's own weights (``refs["out_dq_vq"]``,
    :func:`hpedge.export.vq_variant.reference_transformer`): the reference of its implementation gate."""
    vq_file = vq_variant.source_file(run.ref.path)
    if vq_file is None:
        return
    run.say("PyTorch references with the vq graph's own weights (held-out inputs)")
    pipe = run.pipe
    pipe.transformer = read_transformer(run.ref)
    vq_variant.reference_transformer(pipe.transformer, vq_file, run.opts.compute)
    pipe.transformer.to(compute_device())
    run.refs["out_dq_vq"] = verify.torch_outputs(pipe, run.refs["held"])
    pipe.transformer = None
    verify.release_memory()


def _engines(run: _Run, tmp: Path, text: dict[str, Any]) -> dict[str, Any]:
    """The manifest's engine section, built here where the profile's library can."""
    spec, pipe = run.spec, run.pipe
    io = spec.to_dict()["inputs"]
    batch_axes = {k: spec.dynamic_axes.get(k, {}).get(0) == "batch" for k in io}
    lengths = {name: length for name, (_, length) in text_inputs(pipe, run.seq).items()}
    latents = tuple(r // pipe.vae_scale_factor for r in run.res)
    sparse = engine_build.sparse_components(_sparsity_summary(_compress_report(run)), run.family)
    engines = engine_build.plan_engines(run.family, io, batch_axes, lengths, int(pipe.vae.config.latent_channels),
                                        latents, run.profile, run.opts.engine, run.engine_reason, text,  # type: ignore[arg-type]
                                        sparse, run.precision["file"])
    if run.build_now:
        engines["components"] = engine_build.build_all(tmp, engines["components"], run.profile, run.say)
        engines["status"] = "built"
    return engines


def _manifest(run: _Run, tmp: Path, text: dict[str, Any], engines: dict[str, Any], qrep: QuantReport, n_cpu: int,
              t5_rep: QuantReport | None) -> dict[str, Any]:
    """The manifest before parity, and the quantization report (``quant_report.json``) beside it."""
    pipe, family, res, model_gen, ref, opts = run.pipe, run.family, run.res, run.model_gen, run.ref, run.opts
    compress_report = _compress_report(run)
    variants = {v: f"transformer/{v}/model.onnx" for v in ("fp32", "int4", "int4_cpu", *precision_variant.VARIANTS,
                                                            vq_variant.VARIANT) if (tmp / "transformer" / v).exists()}
    within = lambda value: value if res[0] <= value <= res[2] else res[1]  # noqa: E731 - the model's size if covered
    channels = int(run.refs["transformer_config"]["in_channels"]) // family_facts(family).latent_packing
    dq = {f"{key}/{i}": o for ref, key in (("out_dq", "dequantized"), ("out_dq_cpu", "dequantized_cpu"),
                                           ("out_dq_vq", "dequantized_vq"),
                                           *((f"out_dq_{p}{w}", f"dequantized_{p}{w}") for p in precision_variant.VARIANTS
                                             for w in ("", "_weights")))
          for i, o in enumerate(run.refs.get(ref, [])[:REFERENCE_SAMPLES])}
    reference = save_reference(tmp, run.refs["held"][:REFERENCE_SAMPLES], run.refs["out"][:REFERENCE_SAMPLES],
                               {**run.refs["text"], **run.refs["vae"], **dq})
    reference["dequantized"] = run.refs["dq"]
    (tmp / "quant_report.json").write_text(json.dumps(
        {**qrep.to_dict(), "compute": opts.compute, **({"t5": t5_rep.to_dict()} if t5_rep is not None else {})}, indent=2))
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": {"model": run.model, "family": ref.family, "evaluator": zoo_marker(ref.path).get("evaluator"),
                   "kept_blocks": compress_report["kept_blocks"] if compress_report else None,
                   "removed_blocks": compress_report["removed_blocks"] if compress_report else [],
                   "sparsity": _sparsity_summary(compress_report),
                   "vq": _vq_summary(compress_report, run.refs.get("vq_graph")),
                   "transformer_config": run.refs["transformer_config"]},
        "target": run.profile.to_dict(),
        "components": {
            "text": text,
            "transformer": {"variants": variants, "io": run.spec.to_dict(), "exporter": run.exporter,
                            "fresh_input_max_abs_error": run.refs["fresh_err"], "fp32_bytes": run.fp32_bytes,
                            "fp32_check": run.fp32_check, "storage": run.refs["transformer_storage"],
                            "bytes": {v: size_of(tmp / f) for v, f in variants.items()}, "reference": reference},
            "vae_decoder": {"file": "vae_decoder/model.onnx", "precision": opts.compute,
                            **({"fp32_file": "vae_decoder/fp32/model.onnx"} if opts.fp32_reference else {})},
        },
        "generation": {
            "family": family, "resolution": res[1], "resolution_range": list(res), "latent_channels": channels,
            "vae_scale_factor": pipe.vae_scale_factor, "max_sequence_length": run.seq,
            "tokenizers": run.refs["tokenizers"], "default_steps": model_gen.steps,
            "timestep_scale": family_facts(family).timestep_scale,
            "height": within(model_gen.height), "width": within(model_gen.width), "size_multiple": pipe.vae_scale_factor * 2,
            "guidance": {"kind": model_gen.guidance_kind, "default": model_gen.guidance},
            "scheduler": {k: v for k, v in dict(pipe.scheduler.config).items() if not k.startswith("_")},
            "defaults_source": model_gen.source,
        },
        "precision": run.precision,
        "int4": {**{k: v for k, v in qrep.to_dict().items() if k != "layer_error"}, "compute": opts.compute,
                 "cpu_kernel": opts.cpu_kernel, "cpu_converted": n_cpu, "cpu_source": "int4", "report": "quant_report.json"},
        "engines": engines,
        "memory": run.memory,
        "tools": _versions(),
    }


def _compress_report(run: _Run) -> dict[str, Any] | None:
    """The source's ``hpedge_compress.json`` (a pipeline ``hpedge compress`` wrote), or None."""
    f = run.ref.path / "hpedge_compress.json" if run.ref.path else None
    return json.loads(f.read_text()) if f and f.exists() else None


def _sparsity_summary(compress_report: dict[str, Any] | None) -> dict[str, Any] | None:
    """The source's weight sparsity (``hpedge compress --sparsity``) as the manifest records it: pattern, method and
    each component's share of zeros in its pruned layers (the per-layer shares stay in hpedge_compress.json)."""
    sp = (compress_report or {}).get("sparsity")
    if not sp:
        return None
    return {"pattern": sp["pattern"], "method": sp["method"], "scope": sp["scope"],
            "components": {k: c["achieved"] for k, c in sp["components"].items()}}


def _vq_summary(compress_report: dict[str, Any] | None, graph: dict[str, Any] | None) -> dict[str, Any] | None:
    """The source's vector quantization (``hpedge compress --vq``): its format and bits, and the package's ``vq``
    variant (:mod:`hpedge.export.vq_variant`). The int4 / int4_cpu variants and the engines quantize the
    dequantized weights to INT4 again."""
    v = (compress_report or {}).get("vq")
    if not v:
        return None
    return {"format": v["name"], "bits_per_weight": v.get("bits_per_weight"), "file": v["file"],
            "variant": {"file": f"transformer/{vq_variant.VARIANT}/model.onnx", **graph} if graph else None,
            "int4_and_engines": "INT4 of the dequantized weights",
            "engines_from": "int4: TensorRT-RTX keeps the lookups but folds the codes' Cast into int32 constants, 4 bytes "
                            "per code (a 3x8g8 engine 2.9x the INT4 engine at width 3072; benchmarks/results/vq-engine.md)"}


def _parity(run: _Run, tmp: Path, text: dict[str, Any], engines: dict[str, Any], fp32_check: Check
            ) -> tuple[ParityReport, dict[str, Any]]:
    with contextlib.ExitStack() as stack:
        return _parity_checks(run, tmp, text, engines, fp32_check, stack)


def _parity_checks(run: _Run, tmp: Path, text: dict[str, Any], engines: dict[str, Any], fp32_check: Check,
                   stack: contextlib.ExitStack) -> tuple[ParityReport, dict[str, Any]]:
    """Every packaged component against PyTorch (:mod:`hpedge.export.verify`, the checks ``hpedge check`` reruns),
    the end-to-end images against the original pipeline's (quantization quality) and against stock diffusers
    driving the packaged graphs (implementation); returns the report and the manifest's ``parity.implementation``
    entry (a smaller case's driven image, which ``hpedge check`` compares again)."""
    run.say("parity checks (Polygraphy)")
    r, p, opts = run.refs, run.profile.parity, run.opts
    lim = run.profile.parity
    report = ParityReport([fp32_check])
    variants = [("int4", f"DequantizeLinear, {opts.compute} compute"), ("int4_cpu", opts.cpu_kernel)]
    if "out_dq_vq" in r:
        variants.append((vq_variant.VARIANT, f"codebook lookups, {opts.compute} compute"))
    chosen = run.precision["transformer"]
    if chosen != "int4":
        variants.append((chosen, f"{precisions.get(chosen).title}; run by {precision_variant.ran_as(chosen)}"))
    scratch = stack.enter_context(verify.scratch())  # NVFP4's emulation, while parity runs
    stand_in = {}
    for v, what in variants:
        path = precision_variant.runnable(v, tmp / "transformer" / v / "model.onnx", scratch)
        if path != tmp / "transformer" / v / "model.onnx":
            stand_in[v] = path
        results = pgy.run_onnxrt(path, r["held"], f"onnxrt-{v.replace('_', '-')}",
                                 split=rows_of)  # a row at a time; judged on whole batches
        report.checks.append(verify.transformer_check(f"transformer {v} ({what}) vs PyTorch", v, results, r["out"], "out", lim))
        want = r.get({"int4_cpu": "out_dq_cpu", vq_variant.VARIANT: "out_dq_vq"}.get(v, "out_dq" if v == "int4" else f"out_dq_{v}"))
        if "out_dq" in r or want is not None:
            report.checks.append(verify.dequantized_check(v, path, r["held"], results, want, lim, opts.cpu_kernel))
        if f"out_dq_{v}_weights" in r:
            report.checks.append(verify.weights_only_check(v, tmp / "transformer" / v / "model.onnx", scratch,
                                                           r["held"], r[f"out_dq_{v}_weights"], lim))
    pkg = Package(tmp, variant="int4_cpu", device="cpu", verify=False)  # hashed when the manifest was finished
    what = "CLIP " + text["encoders"]["clip"]["compute"] + ("" if text["t5_dropped"] else
                                                            f", T5 {text['encoders']['t5']['precision'].upper()}")
    report.checks.append(verify.text_check(f"text encoders ({what}) vs PyTorch encode_prompt: prompt embeddings, "
                                           "held-out prompts", pkg, r["text"], p.text_min_cosine))
    if "text/t5_dequantized" in r["text"]:
        report.checks.append(verify.t5_dequantized_check(tmp / text["encoders"]["t5"]["file"], r["text"], lim))
    report.checks.append(verify.vae_check(f"VAE decoder ({opts.compute}) vs PyTorch fp32 decode", pkg, r["vae"], p.vae_min_psnr_db))
    if engines["status"] == "built":
        checks = verify.engine_checks(tmp, engines, r["held"], r["out"], lim, ("transformer",))
        engines["parity"] = verify.engine_summary(checks)
        report.checks += [c for c in checks if not c.skipped]
    run.say("end-to-end check through the packaged components")
    got = verify.e2e_images(pkg, r["e2e_prompts"], r["e2e_latents"], run.gen)
    report.checks.append(verify.e2e_check(pkg, r["e2e_prompts"], r["e2e_latents"], r["e2e_images"], run.gen,
                                          p.e2e_min_psnr_db, got=got))
    # the codebook graph and the engine precision's generate as well (NVFP4 as emulated)
    for v in [vq_variant.VARIANT] * ("out_dq_vq" in r) + [chosen] * (chosen != "int4"):
        other = Package(tmp, variant=v, device="cpu", verify=False, stand_in=stand_in)
        report.checks.append(verify.e2e_check(other, r["e2e_prompts"], r["e2e_latents"], r["e2e_images"], run.gen,
                                              p.e2e_min_psnr_db))
    k = min(IMPL_SAMPLES, len(r["e2e_prompts"]))
    run.say(f"implementation check: stock diffusers driving the packaged graphs ({k} of the end-to-end samples)")
    driven = driven_images(run.pipe, pkg, run.refs["transformer_config"], r["e2e_prompts"][:k], r["e2e_latents"][:k],
                           run.gen)
    report.checks.append(verify.implementation_check(pkg.variant, got[:k], driven, p.impl_min_psnr_db))
    # hpedge check's case, stored: the first prompt at the smallest size the package covers and at most
    # CHECK_STEPS steps (a check of a real package on a CPU then takes minutes, not the e2e size's hour)
    small = with_overrides(run.gen, height=run.res[0], width=run.res[0], steps=min(run.gen.steps, CHECK_STEPS))
    vs = run.pipe.vae_scale_factor
    lat = initial_latents(1, E2E_SEED, r["e2e_latents"].shape[1], small.height // vs, small.width // vs)
    run.say(f"implementation check, hpedge check's case ({small.height} px, {small.steps} steps), stored")
    driven = driven_images(run.pipe, pkg, run.refs["transformer_config"], r["e2e_prompts"][:1], lat, small)
    got = verify.e2e_images(pkg, r["e2e_prompts"][:1], lat, small)
    check = verify.implementation_check(pkg.variant, got, driven, p.impl_min_psnr_db)
    check.name += f" ({small.height} px, {small.steps} steps: hpedge check's case)"
    report.checks.append(check)
    impl = save_implementation_reference(tmp, pkg.variant, r["e2e_prompts"][0], lat, driven, small.to_dict())
    return report, impl


def _gate(run: _Run, report: ParityReport, report_path: Path) -> None:
    """No package unless parity passed (or ``--allow-parity-failure``); the report is kept beside OUT."""
    if report.passed or run.opts.allow_parity_failure:
        return
    report_path.write_text(json.dumps(report.to_dict(), indent=2))
    first = report.failures()[0]
    hint = ("; T5 in INT8 keeps more of it (--t5 int8)" if first.startswith("text encoders")
            and run.memory["precisions"].get("t5") == "int4" else "")
    raise HpedgeError(f"parity failed, no package written (report: {report_path}): {first}{hint}", HpedgeError.CHECK_FAILED)


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("hpedge", "torch", "diffusers", "transformers", "onnx", "onnxruntime-gpu", "onnxruntime",
                "nvidia-modelopt", "polygraphy", "tensorrt", "tensorrt-rtx-cu12"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out
