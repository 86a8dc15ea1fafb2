"""The ``hpedge`` command line: thin wrappers around library functions.

User errors are :class:`hpedge.HpedgeError`; they are printed as one line and turned into the
error's exit code, without a traceback.
"""

from __future__ import annotations

import functools
import json
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.table import Column, Table

from hpedge.compress import analyze as analysis
from hpedge.compress import pipeline as compression
from hpedge.compress.analyze import AnalysisSettings, heatmap
from hpedge.compress.distill import DistillSettings
from hpedge.compress.memory import estimate_for
from hpedge.compress.pipeline import CompressOptions, plan_for, sparsity_note
from hpedge.compress.plan import Budget
from hpedge.compress.processes import is_main_process
from hpedge.compress.pwp import resolve_pwp
from hpedge.compress.sparsity import SparsitySpec
from hpedge.compress.vq import VQSpec
from hpedge.console import (
    console,
    err_console,
    gb,
    params,
    print_distill_memory,
    print_engines,
    print_plan,
    print_precision_choice,
    progress,
)
from hpedge.errors import HpedgeError
from hpedge.evaluation.image import save_image
from hpedge.export import build as engine_build
from hpedge.export import export as packaging
from hpedge.export import verify
from hpedge.export.export import ExportOptions
from hpedge.io import atomic_file
from hpedge.models.adapters import describe
from hpedge.models.loading import compute_device, load_pipeline, load_transformer, resolve
from hpedge.models.loading import drop_t5 as without_t5
from hpedge.models.meta import text_encoder_held_bytes
from hpedge.models.sampling import defaults, defaults_of_ref, sample, with_overrides
from hpedge.runtime import Package
from hpedge.targets.footprint import choose_precision
from hpedge.targets.host import MEASURED_PEAK, available_bytes, export_need
from hpedge.targets.profiles import all_profiles, load_profile
from hpedge.zoo.evaluate import EvalSettings, evaluate, grid_of_result

app = typer.Typer(add_completion=False, no_args_is_help=True, help="HierarchicalPrune compression and edge deployment.")


def _user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except HpedgeError as e:
            err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None

    return wrapper


def command(*args: Any, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        return app.command(*args, **kwargs)(_user_errors(fn))

    return deco


@command()
def info(model: Annotated[str, typer.Argument(help="pipeline folder, zoo:NAME, or architecture (sd3.5-large, ...)")],
         json_out: Annotated[Optional[Path], typer.Option("--json", help="write the description as JSON")] = None) -> None:
    """Blocks, sub-components, parameters and bytes per precision of a transformer."""

    ref = resolve(model, allow_architecture=True)
    d = describe(load_transformer(ref))
    console.print(f"[bold]{model}[/]  {d['class']} ({d['family']}), {len(d['blocks'])} blocks")
    console.print(f"parameters: {params(d['params'])} ({d['params']:,})")
    console.print(
        f"bytes: fp32 {gb(d['bytes']['fp32'])}, bf16 {gb(d['bytes']['bf16'])}, "
        f"int4 weights {gb(d['bytes']['int4'])}"
    )
    sampling = defaults_of_ref(ref)
    if sampling is not None:
        d["sampling"] = sampling.to_dict()
        console.print(f"sampling defaults ({sampling.source}): {sampling.width}x{sampling.height}, {sampling.steps} steps, "
                      f"guidance {sampling.guidance:g} ({sampling.guidance_kind}), T5 length {sampling.max_sequence_length}")
    t = Table("block", "kind", "params", "components")
    for b in d["blocks"]:
        t.add_row(str(b["index"]), b["kind"], params(b["params"]), ", ".join(b["components"]))
    console.print(t)
    if json_out:
        with atomic_file(json_out) as tmp:
            tmp.write_text(json.dumps(d, indent=2))


@command("eval")
def eval_(model: Annotated[str, typer.Argument(help="pipeline folder or zoo:NAME")],
          json_out: Annotated[Optional[Path], typer.Option("--json", help="write the result as JSON")] = None,
          grid: Annotated[Optional[Path], typer.Option("--grid", help="write a PNG sample grid")] = None,
          per_category: Annotated[int, typer.Option(help="prompts per category (5 categories)")] = 100,
          steps: Annotated[int, typer.Option(help="denoising steps")] = 16,
          guidance: Annotated[float, typer.Option(help="classifier-free guidance (1 = off)")] = 1.0,
          seed: Annotated[int, typer.Option(help="seed of the sampling noise")] = 0,
          drop_t5: Annotated[bool, typer.Option("--drop-t5", help="SD3: sample without T5 (zeros in its place, as diffusers without text_encoder_3; what `export --drop-t5` ships)")] = False) -> None:
    """GenEval-style score per category, overall score and Frechet distance of a digits pipeline."""

    if per_category < 2:
        raise HpedgeError("--per-category must be at least 2")
    pipe = load_pipeline(resolve(model))
    if drop_t5:
        without_t5(pipe)
    s = EvalSettings(per_category=per_category, steps=steps, guidance=guidance, seed=seed)
    total, done = 5 * per_category, [0]
    with progress("eval") as cb:
        def advance(n: int) -> None:
            done[0] += n
            cb("generating", done[0], total)

        result, canv, prompts = evaluate(pipe, model, s, progress=advance)
    t = Table("category", "score")
    for c, v in result.categories.items():
        t.add_row(c, f"{v:.3f}")
    t.add_row("seen phrasings", f"{result.seen_phrasings:.3f}")
    t.add_row("held-out phrasings", f"{result.heldout_phrasings:.3f}")
    t.add_row("[bold]overall[/]", f"[bold]{result.overall:.3f}[/]")
    t.add_row("Frechet distance", f"{result.frechet_distance:.1f}")
    console.print(t)
    if json_out:
        with atomic_file(json_out) as tmp:
            tmp.write_text(result.to_json())
    if grid:
        grid_of_result(canv, prompts, grid)


@command()
def generate(model: Annotated[str, typer.Argument(help="package folder, pipeline folder or zoo:NAME")],
             prompt: Annotated[str, typer.Argument(help="text prompt")],
             output: Annotated[Path, typer.Option("-o", "--output", help="PNG file to write")],
             seed: Annotated[int, typer.Option()] = 0,
             steps: Annotated[Optional[int], typer.Option(help="denoising steps (default: the model's)")] = None,
             guidance: Annotated[Optional[float], typer.Option(help="guidance scale (default: the model's): CFG for SD3, the distilled guidance input for FLUX.1-dev")] = None,
             negative_prompt: Annotated[Optional[str], typer.Option(help="negative prompt (CFG pipelines)")] = None,
             height: Annotated[Optional[int], typer.Option(help="image height in pixels (default: the model's)")] = None,
             width: Annotated[Optional[int], typer.Option(help="image width in pixels (default: the model's)")] = None,
             variant: Annotated[str, typer.Option(help="packages only: auto | engine (its TensorRT engines, on a GPU that runs them) | int4 | int4_cpu | vq (a pipeline compressed with --vq: codebook lookups) | fp32 (if exported with --fp32-reference)")] = "auto",
             device: Annotated[str, typer.Option(help="packages only: auto | cpu | cuda")] = "auto") -> None:
    """Generate one image with a package (runtime only: no torch) or a diffusers pipeline."""

    if (Path(model) / "manifest.json").exists():
        pkg = Package(model, variant=variant, device=device)
        if variant == "auto":
            console.print(f"variant: {pkg.variant} (auto)")
        image = pkg.generate([prompt], seed=seed, steps=steps, guidance=guidance, negative_prompt=negative_prompt,
                             height=height, width=width)[0]
    else:
        ref = resolve(model)
        pipe = load_pipeline(ref)
        pipe.to(compute_device())
        d = with_overrides(defaults(pipe, ref.path), height=height, width=width, steps=steps, guidance=guidance)
        image = sample(pipe, [prompt], d, seeds=[seed], negative_prompt=negative_prompt)[0]
    save_image(image, output)
    console.print(f"wrote {output} ({image.shape[1]}x{image.shape[0]})")


BudgetBlocks = Annotated[Optional[str], typer.Option("--remove-blocks", help="a count (3) or indices (25-29,31-35)")]
BudgetFraction = Annotated[Optional[float], typer.Option("--remove-fraction", help="fraction of blocks to remove")]
BudgetKeep = Annotated[Optional[float], typer.Option("--keep-ratio", help="keep at most this fraction of parameters")]
BudgetTarget = Annotated[Optional[str], typer.Option("--target", help="device profile name or JSON file")]
ProtectEarly = Annotated[float, typer.Option(help="fraction of early blocks never removed")]
Residency = Annotated[str, typer.Option(help="how the package's components share the device: auto (sequential on shared-memory Jetsons, resident elsewhere) | resident (all loaded) | sequential (each phase's components loaded for that phase alone)")]
T5Precision = Annotated[str, typer.Option("--t5", help="T5's weights in the package: auto (int8 where the package fits with it, else int4) | int4 (ModelOpt AWQ) | int8 (weight-only, per channel)")]
DropT5 = Annotated[bool, typer.Option("--drop-t5", help="SD3: the package ships no T5 encoder (zeros in its place, as diffusers without text_encoder_3)")]


@command()
def analyze(model: Annotated[str, typer.Argument(help="pipeline folder or zoo:NAME")],
            output: Annotated[Path, typer.Option("-o", "--output", help="importance JSON to write")],
            heatmap_png: Annotated[Optional[Path], typer.Option("--heatmap", help="PNG heatmap (blocks x components)")] = None,
            num_prompts: Annotated[int, typer.Option(help="calibration prompts")] = 40,
            prompts: Annotated[Optional[Path], typer.Option(help="calibration prompts file, one per line (default: the project's set of 126)")] = None,
            steps: Annotated[Optional[int], typer.Option(help="denoising steps per calibration image (default: the model's)")] = None,
            guidance: Annotated[Optional[float], typer.Option(help="guidance scale (default: the model's)")] = None,
            resolution: Annotated[Optional[int], typer.Option(help="square image side in pixels (default: the model's size; a reduced one is recorded in the result)")] = None,
            scorer: Annotated[Optional[str], typer.Option(help="add a learned score's drop to the harm: clip=FOLDER (a local CLIPModel; never downloaded)")] = None,
            seed: Annotated[int, typer.Option()] = 0,
            components: Annotated[bool, typer.Option(help="also score sub-components")] = True,
            reference_format: Annotated[Optional[Path], typer.Option("--reference-format", help="also write the reference's <tab> format")] = None) -> None:
    """Contribution analysis: the harm of removing each block and sub-component (cached, resumable)."""

    settings = AnalysisSettings(prompts=num_prompts, steps=steps, seed=seed, components=components,
                                resolution=resolution, guidance=guidance, prompts_file=str(prompts) if prompts else None,
                                scorer=scorer)
    settings.check()
    ref = resolve(model)
    pipe = load_pipeline(ref)
    pipe.to(compute_device())
    with progress("analysis") as cb:
        imp = analysis.analyze(pipe, ref.path, output, settings, progress=lambda what, k, n: cb(f"analysis: {what}", k, n))
    harm = imp.block_harm()
    t = Table("block", "harm (whole block)", "most harmful component")
    comp = imp.component_harm()
    for b in sorted(harm):
        mine = {c: v for (bb, c), v in comp.items() if bb == b}
        top = max(mine, key=mine.get) if mine else "-"
        t.add_row(str(b), f"{harm[b]:.4f}", f"{top} ({mine[top]:.4f})" if mine else "-")
    console.print(t)
    if heatmap_png:
        heatmap(imp, heatmap_png)
    if reference_format:
        with atomic_file(reference_format) as tmp:
            tmp.write_text(json.dumps(imp.to_reference(), indent=1))
    console.print(f"wrote {output}")


@command()
def plan(model: Annotated[str, typer.Argument(help="pipeline folder, zoo:NAME or architecture (sd3.5-large, ...)")],
         remove_blocks: BudgetBlocks = None, remove_fraction: BudgetFraction = None, keep_ratio: BudgetKeep = None,
         target: BudgetTarget = None,
         importance: Annotated[Optional[str], typer.Option(help="importance JSON (hpedge or reference format)")] = None,
         protect_early: ProtectEarly = 0.5, residency: Residency = "auto", drop_t5: DropT5 = False,
         t5: T5Precision = "auto",
         json_out: Annotated[Optional[Path], typer.Option("--json", help="write the plan as JSON")] = None,
         distill: Annotated[bool, typer.Option("--distill", help="also estimate the memory per GPU of distilling this plan")] = False,
         batch_size: Annotated[int, typer.Option(help="--distill: the global batch (compress --batch-size)")] = 16,
         processes: Annotated[int, typer.Option(help="--distill: GPUs sharing the batch (data parallel)")] = 1,
         resolution: Annotated[Optional[int], typer.Option(help="--distill: square image side (default: the model's)")] = None,
         mixed_precision: Annotated[str, typer.Option(help="--distill: no | bf16 | fp16 (compress --mixed-precision; GPU runs use bf16)")] = "bf16",
         pwp: Annotated[Optional[bool], typer.Option("--pwp/--no-pwp", help="Positional Weight Preservation as compress uses it (default: compress's)")] = None,
         sparsity: Annotated[Optional[str], typer.Option(help="weight sparsity as compress takes it (COMPONENT=FRACTION,...): what it changes in the package")] = None,
         sparsity_pattern: Annotated[str, typer.Option(help="unstructured | N:M")] = "unstructured") -> None:
    """Print which blocks Hierarchical Position Pruning removes, and the sizes before/after (no weights touched)."""

    p = plan_for(model, Budget(remove_blocks, remove_fraction, keep_ratio, target, residency, drop_t5, t5), importance,
                 protect_early)
    print_plan(p)
    out = p.to_dict()
    if target is not None:  # the engine precision export --precision auto would take for this plan, and its footprint
        choice = choose_precision(resolve(model, allow_architecture=True), load_profile(target), "auto", residency,
                                  drop_t5, p.remove, t5)
        print_precision_choice(choice)
        out["precision"] = {"order": choice.order, "why": choice.why,
                            "footprints": {k: fp.to_dict() for k, fp in choice.footprints.items()}}
    use_pwp, why = resolve_pwp(p.remove, p.num_blocks, DistillSettings(pwp=pwp))
    console.print(f"compress: {why}")
    out["pwp"] = {"used": use_pwp, "why": why}
    text = text_encoder_held_bytes(resolve(model, allow_architecture=True), drop_t5)
    needs = {m: export_need(p.params_after, m, text) for m in MEASURED_PEAK}
    avail = available_bytes()
    console.print("host memory to export it (the larger of the text and transformer phases, measured lines): "
                  + ", ".join(f"{m} {n.need / 1e9:.1f} GB ({n.rule})" for m, n in needs.items())
                  + (f"; this host has {avail / 1e9:.1f} GB available" if avail is not None else ""))
    out["export_host_memory"] = {m: n.to_dict() for m, n in needs.items()}
    note = sparsity_note(model, sparsity, sparsity_pattern)
    if note:
        console.print(note)
        out["sparsity"] = note
    if distill:
        m = estimate_for(model, p.remove, batch_size, processes, resolution, mixed_precision, use_pwp)
        print_distill_memory(m)
        out["distill_memory"] = m.to_dict()
    if json_out:
        with atomic_file(json_out) as tmp:
            tmp.write_text(json.dumps(out, indent=2))


@command()
def compress(model: Annotated[str, typer.Argument(help="pipeline folder or zoo:NAME")],
             output: Annotated[Path, typer.Option("-o", "--output", help="output pipeline folder")],
             remove_blocks: BudgetBlocks = None, remove_fraction: BudgetFraction = None, keep_ratio: BudgetKeep = None,
             target: BudgetTarget = None,
             importance: Annotated[Optional[str], typer.Option(help="importance JSON; analysed if omitted")] = None,
             protect_early: ProtectEarly = 0.5, residency: Residency = "auto", drop_t5: DropT5 = False,
             t5: T5Precision = "auto",
             steps: Annotated[int, typer.Option(help="distillation steps")] = 600,
             batch_size: Annotated[int, typer.Option()] = 16,
             pool_size: Annotated[int, typer.Option(help="teacher samples distilled from (data-free)")] = 256,
             lr: Annotated[float, typer.Option()] = 3e-4,
             sgd: Annotated[str, typer.Option(help="SGDistill: continuous | binary | off")] = "continuous",
             pwp: Annotated[Optional[bool], typer.Option("--pwp/--no-pwp", help="Positional Weight Preservation (default: on, off only for a cut that leaves no kept block after it)")] = None,
             lambda_feat: Annotated[float, typer.Option(help="feature KD weight")] = 0.1,
             data: Annotated[Optional[Path], typer.Option(help="captioned image folder instead of teacher samples")] = None,
             checkpoint_every: Annotated[int, typer.Option()] = 100,
             mixed_precision: Annotated[str, typer.Option(help="no | bf16 | fp16")] = "no",
             gradient_checkpointing: Annotated[bool, typer.Option()] = False,
             seed: Annotated[int, typer.Option()] = 0,
             resolution: Annotated[Optional[int], typer.Option(help="square image side for analysis, sample pool, distillation and grid (default: the model's size)")] = None,
             prompts: Annotated[Optional[Path], typer.Option(help="training/calibration prompts file, one per line (default: the project's set; the digits grammar for zoo models)")] = None,
             grid_samples: Annotated[int, typer.Option(help="teacher/student prompt pairs in teacher_vs_student.png (0 = no grid)")] = 16,
             analysis_prompts: Annotated[int, typer.Option(help="prompts of the contribution analysis (when no --importance is given)")] = 40,
             analysis_steps: Annotated[Optional[int], typer.Option(help="denoising steps of the contribution analysis (default: the model's)")] = None,
             eval_per_category: Annotated[int, typer.Option(help="prompts per category for the before/after scores (100 = the 500 prompts of `hpedge eval`; 0 = skip)")] = 100,
             sparsity: Annotated[Optional[str], typer.Option(help="weight sparsity per component after block removal (or alone): COMPONENT=FRACTION,... with transformer, text, clip, t5, text_encoder, text_encoder_2, text_encoder_3 (e.g. transformer=0.35,text=0.475)")] = None,
             sparsity_pattern: Annotated[str, typer.Option(help="unstructured | N:M (2:4: two zeros in every four inputs, sparse tensor cores; the fraction must be 0.5)")] = "unstructured",
             sparsity_method: Annotated[str, typer.Option(help="magnitude | wanda (|W| x input norms from calibration prompts)")] = "magnitude",
             sparsity_scope: Annotated[str, typer.Option(help="layer (each layer's share) | global (one magnitude threshold per component)")] = "layer",
             vq: Annotated[Optional[str], typer.Option(help="vector quantization of the transformer's block layers after block removal (or alone), fine-tuned by the distillation: 2bit | 3bit | 4bit | MxBgG (M codebooks of 2**B vectors of G weights, e.g. 3x8g8); codes in OUT/vq/, beside the dequantized pipeline")] = None,
             vq_tune_steps: Annotated[int, typer.Option(help="--vq: Adam steps (at most) tuning each layer's codebooks and scales on its output error, per round (0: k-means and code search only)")] = 50,
             resume: Annotated[bool, typer.Option(help="continue from the last checkpoint")] = False,
             overwrite: Annotated[bool, typer.Option(help="replace OUT and any earlier work")] = False) -> None:
    """HierarchicalPrune: analyse, plan, prune, distil (PWP + SGDistill) and write a stock diffusers pipeline; with
    --sparsity, weight sparsity too, with --vq vector quantization (after block removal, or alone)."""

    if mixed_precision not in ("no", "bf16", "fp16"):
        raise HpedgeError(f"--mixed-precision must be no, bf16 or fp16, got {mixed_precision!r}")
    ds = DistillSettings(steps=steps, batch_size=batch_size, pool_size=pool_size, lr=lr, sgd=sgd, pwp=pwp, lambda_feat=lambda_feat,
                         checkpoint_every=checkpoint_every, mixed_precision=mixed_precision,
                         gradient_checkpointing=gradient_checkpointing, seed=seed,
                         data_dir=str(data) if data else None)
    opts = CompressOptions(Budget(remove_blocks, remove_fraction, keep_ratio, target, residency, drop_t5, t5), importance, protect_early,
                           ds, analysis=AnalysisSettings(prompts=analysis_prompts, steps=analysis_steps), resume=resume, overwrite=overwrite, eval_per_category=eval_per_category, grid_samples=grid_samples,
                           resolution=resolution, prompts_file=str(prompts) if prompts else None,
                           sparsity=SparsitySpec.parse(sparsity, sparsity_pattern, sparsity_method, sparsity_scope)
                           if sparsity is not None else None, vq=replace(VQSpec.parse(vq), tune_steps=vq_tune_steps) if vq is not None else None)
    with progress("compress") as cb:
        report = compression.compress(model, output, opts, progress=cb)

    if not is_main_process():  # every process of a launch ran the command; the main one reports
        return
    console.print(f"removed blocks {report['removed_blocks']}; kept {report['params']['kept_ratio']:.1%} of parameters")
    for name, c in ((report.get("sparsity") or {}).get("components") or {}).items():
        console.print(f"{name}: {c['achieved']:.1%} of its pruned layers' weights zero ({report['sparsity']['method']}, "
                      f"{report['sparsity']['pattern']})")
    if report.get("vq"):
        v = report["vq"]
        console.print(f"vector quantization {v['name']}: {len(v['layers'])} layers, {v['bits_per_weight']['codes']:.2f} bits "
                      f"per weight in codes, {v['bits_per_weight']['total']:.2f} with codebooks and scales "
                      f"({v['file_bytes'] / 2**20:.1f} MiB in {v['file']})")
    console.print(report["pwp"]["why"])
    sc = report["scores"]
    if sc:
        ci = sc["paired"]["ci95"] if sc.get("paired") else None
        interval = f", paired 95 % interval {ci[0]:.1%}-{ci[1]:.1%}" if ci else ""
        console.print(f"eval overall: teacher {sc['teacher']['overall']:.3f}, student {sc['student']['overall']:.3f} "
                      f"({sc['student_over_teacher']:.1%} of teacher{interval}, {sc['student']['samples']} prompts); "
                      f"Frechet {sc['teacher']['frechet_distance']:.1f} -> {sc['student']['frechet_distance']:.1f}")
    console.print(f"wrote {output}")


@command()
def targets() -> None:
    """List the built-in device profiles."""

    t = Table(Column("name", no_wrap=True), "device", "sm", "memory", "precision (auto order)",
              "resolution", "batch", "engine library", "engine built on")
    for p in all_profiles():
        caps = ",".join("sm_" + c.replace(".", "") for c in p.engine.compute_capabilities)
        t.add_row(p.name, p.display_name, p.compute_capability, f"{p.memory_gb:g} GB{' shared' if p.shared_memory else ''}",
                  ">".join(p.transformer_precisions), f"{p.resolution.min}-{p.resolution.max}", f"{p.batch.min}-{p.batch.max}",
                  f"{p.engine.library} ({caps})", "any host" if p.build_on == "host" else "the device (hpedge build)")
    console.print(t)



@command()
def export(model: Annotated[str, typer.Argument(help="pipeline folder (pruned or not) or zoo:NAME")],
           target: Annotated[str, typer.Option(help="device profile name (see `hpedge targets`) or JSON file")],
           output: Annotated[Path, typer.Option("-o", "--output", help="package folder to write")],
           engine: Annotated[str, typer.Option(help="TensorRT engines: auto (build where possible) | require (fail if they cannot be built here) | skip")] = "auto",
           method: Annotated[str, typer.Option(help="INT4 method: awq_clip | rtn (both streamed by hpedge) | awq_clip_modelopt (ModelOpt's pass; needs ~13.5x the transformer's fp16 bytes of memory)")] = "awq_clip",
           exporter: Annotated[str, typer.Option(help="ONNX exporter: auto | legacy | dynamo")] = "auto",
           cpu_kernel: Annotated[str, typer.Option(help="CPU variant of the INT4 transformer: int8 (stored int8 weights, int8 GEMM) | nbits (MatMulNBits)")] = "int8",
           compute: Annotated[str, typer.Option(help="precision the TensorRT-input INT4 graph computes in: fp16 | fp32 (the CPU variant is fp32)")] = "fp16",
           fp32_reference: Annotated[bool, typer.Option(help="also ship fp32 graphs of every component (the transformer alone is larger than the original's bf16 weights; the exact reference for debugging, `--variant fp32`)")] = False,
           calibration_prompts: Annotated[int, typer.Option(help="prompts for calibration (and as many held out for parity)")] = 8,
           steps: Annotated[Optional[int], typer.Option(help="denoising steps of the calibration runs and the end-to-end check (default: the model's)")] = None,
           protect: Annotated[Optional[list[str]], typer.Option(help="regex of layers kept in full precision (repeatable)")] = None,
           allow_parity_failure: Annotated[bool, typer.Option(help="write the package even if parity fails (recorded in the manifest)")] = False,
           archive: Annotated[bool, typer.Option(help="also write PACKAGE.tar")] = False,
           ignore_host_memory: Annotated[bool, typer.Option(help="go ahead although this host has less memory available than the export is measured to need")] = False,
           residency: Residency = "auto", drop_t5: DropT5 = False, t5: T5Precision = "auto",
           precision: Annotated[str, typer.Option(help="the transformer engine's precision: auto (the target's best that fits and passes its quality gate: nvfp4 > fp8 > int4 on an RTX 5090, fp8 > int4 on RTX 40xx, int4 elsewhere) | int4 | int8 | fp8 | nvfp4")] = "auto",
           overwrite: Annotated[bool, typer.Option()] = False) -> None:
    """ONNX + INT4 AWQ + TensorRT engines (TensorRT-RTX on any host, or an on-device build) + parity -> a self-describing package."""

    opts = ExportOptions(target=target, engine=engine, steps=steps, method=method, exporter=exporter, cpu_kernel=cpu_kernel, compute=compute,
                         fp32_reference=fp32_reference,
                         calibration_prompts=calibration_prompts, allow_parity_failure=allow_parity_failure,
                         archive=archive, overwrite=overwrite, protect=list(protect or []), residency=residency,
                         drop_t5=drop_t5, t5=t5, ignore_host_memory=ignore_host_memory, precision=precision)
    with progress("export") as cb:
        m = packaging.export(model, output, opts, progress=lambda what: cb(what, 0, 1))
    b, fp32_bytes = m["components"]["transformer"]["bytes"], m["components"]["transformer"]["fp32_bytes"]
    console.print(f"transformer: fp32 weights {fp32_bytes / 1e6:.1f} MB{'' if 'fp32' in b else ' (not shipped)'}, "
                  f"int4 ({m['int4']['compute']} compute) {b['int4'] / 1e6:.1f} MB ({b['int4'] / fp32_bytes:.2f}x), "
                  f"int4_cpu {b['int4_cpu'] / 1e6:.1f} MB; "
                  f"{len(m['int4']['excluded'])} layers not quantized")
    pr = m["precision"]
    console.print(f"engine precision: {pr['transformer']} ({pr['title']}"
                  + (f", {b[pr['transformer']] / 1e6:.1f} MB" if pr["transformer"] in b else "") + f"); {pr['why']}")
    console.print(f"parity: {'passed' if m['parity']['passed'] else '[bold red]FAILED (overridden)[/]'}")
    print_engines(m["engines"])
    console.print(f"wrote {output}")


@command()
def check(package: Annotated[Path, typer.Argument(help="package folder")],
          no_parity: Annotated[bool, typer.Option("--no-parity", help="only verify checksums")] = False) -> None:
    """CI gate: verify checksums and rerun parity. Exit 0 pass, 3 parity failure or tampering, 2 usage error."""

    r = verify.check(package, rerun_parity=not no_parity)
    for c in r.get("checks", []):
        console.print(f"{'skip' if c.get('skipped') else 'ok  ' if c['passed'] else 'FAIL'} {c['name']}", highlight=False)
    console.print(f"{r['files']} files verified; package OK")


@command()
def build(package: Annotated[Path, typer.Argument(help="package folder whose engines are pending")]) -> None:
    """Build the package's pending engines here (Jetson: on the board with its JetPack TensorRT)."""

    print_engines(engine_build.build(package)["engines"])

def main() -> None:
    app()


if __name__ == "__main__":
    main()
