"""``hpedge compress``: analysis -> plan -> prune -> PWP + SGDistill distillation -> a stock pipeline folder.

Work in progress lives in a hidden folder next to OUT (``.OUT.hpedge-work``: importance cache, plan,
teacher samples, checkpoints); OUT itself is written atomically at the very end, so an interrupted
run never leaves a half-written OUT that looks complete. ``resume=True`` continues from the newest
checkpoint and insists on the same plan.
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from hpedge.compress.analyze import AnalysisSettings, analyze, heatmap
from hpedge.compress.distill import DistillSettings, TrainState, distill
from hpedge.compress.importance import Importance
from hpedge.compress.importance import load as load_importance
from hpedge.compress.plan import Budget, Plan, make_plan, parse_blocks
from hpedge.compress.pool import data_pairs
from hpedge.compress.processes import Processes
from hpedge.compress.pwp import resolve_pwp
from hpedge.compress.sparsity import (
    Masks,
    SparsitySpec,
    check_pattern,
    pruned_layers,
    size_note,
    transformer_calibration,
)
from hpedge.compress.sparsity import apply as apply_sparsity
from hpedge.compress.vq import FILE as VQ_FILE
from hpedge.compress.vq import VQSpec, bits_per_weight, check_layers, densify, load_quantized
from hpedge.compress.vq import quantize as vector_quantize
from hpedge.compress.vq import save as save_vq
from hpedge.errors import HpedgeError
from hpedge.evaluation.image import save_grid
from hpedge.io import atomic_dir, atomic_file, check_parent
from hpedge.models import adapters
from hpedge.models.loading import TORCH_DTYPES, ModelRef, load_pipeline, load_transformer, make_stock_loadable, resolve
from hpedge.models.sampling import Defaults, check_pipeline, defaults, sample, with_overrides
from hpedge.prompts import calibration, read_prompts, training_prompts
from hpedge.targets.footprint import choose_t5, estimate
from hpedge.targets.profiles import load_profile
from hpedge.zoo.evaluator import DigitsEvaluator, evaluator_for

REPORT = "hpedge_compress.json"


@dataclass
class CompressOptions:
    budget: Budget
    importance: str | None = None
    protect_early: float = 0.5
    distill: DistillSettings = field(default_factory=DistillSettings)
    analysis: AnalysisSettings = field(default_factory=AnalysisSettings)
    resume: bool = False
    overwrite: bool = False
    eval_per_category: int = 100  # 500 prompts, the `hpedge eval` benchmark setting
    grid_samples: int = 16
    resolution: int | None = None  # square side for the sample pool, distillation and grid; None: the model's
    prompts_file: str | None = None  # training and calibration prompts; None: the project's set
    sparsity: SparsitySpec | None = None  # weight sparsity after block removal (or alone, without a block budget)
    sparsity_prompts: int = 8  # Wanda's calibration prompts
    vq: VQSpec | None = None  # vector quantization of the transformer's block layers (after block removal, or alone)
    vq_prompts: int = 8  # its calibration prompts


def work_dir(out: Path) -> Path:
    return out.resolve().parent / f".{out.name}.hpedge-work"


def plan_on_target(transformer: Any, budget: Budget, imp: Importance | None, protect_early: float, ref: ModelRef) -> Plan:
    """:func:`make_plan`; a ``--target`` budget sizes the package with its footprint on the target, and with
    ``--t5 auto`` takes T5's precision by :func:`hpedge.targets.footprint.choose_t5` (a removed transformer
    block costs more quality than T5's 4-bit weights)."""
    if budget.target is None:
        return make_plan(transformer, budget, imp, protect_early)
    profile = load_profile(budget.target)

    def plan_with(t5: str) -> Plan:
        return make_plan(transformer, budget, imp, protect_early,
                         estimate(ref, profile, budget.residency, budget.drop_t5, t5=t5), profile)

    if budget.t5 != "auto" or budget.drop_t5:
        return plan_with(budget.t5)
    plans: dict[str, Plan] = {}

    def cost(t5: str) -> float:
        try:
            plans[t5] = plan_with(t5)
        except HpedgeError:
            return math.inf
        return len(plans[t5].remove)

    chosen, _ = choose_t5(cost)
    return plans[chosen] if chosen in plans else plan_with(chosen)


def compress(model: str, out: Path, opts: CompressOptions, progress: Callable[..., None] | None = None) -> dict[str, Any]:
    """The stages in order: every rank checks OUT and the work folder, loads the teacher, analyses (or loads the
    importance table), plans and resolves PWP, prunes and distils; the main process scores and writes OUT."""
    ref, work, procs = _start(model, out, opts)
    t_start = time.time()
    say = progress if progress and procs.is_main else (lambda *a, **k: None)
    teacher_pipe, gen = _load_teacher(ref, opts, procs, say)
    if opts.sparsity is not None or opts.vq is not None:  # components and layer widths checked before the long steps
        try:
            if opts.sparsity is not None:
                _check_sparsity(teacher_pipe, opts.sparsity)
            if opts.vq is not None:
                check_layers(pruned_layers(teacher_pipe.transformer), opts.vq)
        except HpedgeError:
            if procs.is_main and not opts.resume:
                shutil.rmtree(work, ignore_errors=True)
            raise
    blocks = opts.budget.given()
    imp = _importance(teacher_pipe, ref, work, opts, procs, say) if blocks else None
    plan = _plan(teacher_pipe, ref, work, imp, opts, procs) if blocks else None
    if plan is not None:
        use_pwp, pwp_why = resolve_pwp(plan.remove, plan.num_blocks, opts.distill)  # before the teacher samples its pool
    else:
        use_pwp, pwp_why = False, "no blocks removed: PWP and SGDistill do not apply"
    ds = replace(opts.distill, pwp=use_pwp, sgd=opts.distill.sgd if plan is not None else "off")
    say(pwp_why, 0, 1)

    # prune blocks physically, then weights (sparsity), then distil with PWP + SGDistill; distill() holds the
    # trainable parameters in fp32 master weights, the frozen ones in the teacher's dtype
    student, kept = adapters.prune(teacher_pipe.transformer, plan.remove if plan is not None else [])
    evaluator = evaluator_for(ref.path)
    prompts = training_prompts(evaluator, opts.distill.pool_size, opts.distill.seed, opts.prompts_file)
    text, masks, sparsity = _sparsify(teacher_pipe, student, opts, evaluator, gen, say)
    vq = _quantize(teacher_pipe, student, opts, evaluator, gen, work, procs, say)
    harm = imp.block_harm() if imp else None
    if ds.steps > 0:
        student, state, weights = distill(
            teacher_pipe, student, kept, harm, prompts, work, ds, gen, resume=opts.resume,
            progress=lambda what, k, n, info: say(f"{what}: loss {info['loss']:.4f}" if what == "distilling" else what, k, n),
            procs=procs, masks=masks.masks if masks else None, student_text=text,
        )
    else:  # --steps 0: pruned, not distilled
        student.eval().requires_grad_(False)
        state, weights = TrainState(), {b: 0.0 for b in kept}
    student_pipe = type(teacher_pipe)(**{**teacher_pipe.components, **text, "transformer": student.to(teacher_pipe.dtype)})
    student_pipe.set_progress_bar_config(disable=True)
    if sparsity:
        sparsity["transformer_zeros_held"] = _zeros_held(student_pipe, masks)

    if not procs.is_main:
        procs.barrier()  # the main process evaluates and writes OUT
        return _report_of(out)
    scores: dict[str, Any] = {}
    if evaluator is not None and opts.eval_per_category > 0:
        scores = evaluator.compare(teacher_pipe, model, student_pipe, str(out), opts.eval_per_category, say)
    report = {
        "format": "hpedge-compress/1", "source": model, "family": ref.family,
        "removed_blocks": plan.remove if plan else [], "kept_blocks": kept,
        "first_removed_position": plan.first_removed if plan else None,
        "pwp": {"requested": {None: "hpedge's default", True: "--pwp", False: "--no-pwp"}[opts.distill.pwp],
                "used": use_pwp, "why": pwp_why},
        "frozen_blocks_pwp": [b for b in kept if plan and b < plan.first_removed] if use_pwp else [],
        "update_weights": {str(k): v for k, v in weights.items()},
        "sensitivity": "block harm from the contribution analysis" if harm else None,
        "plan": plan.to_dict() if plan else None,
        "sparsity": sparsity,
        "vq": vq,
        "importance": {"source": imp.source, "metric": imp.metric} if imp else None,
        "distill": asdict(ds), "sampling": gen.to_dict(), "losses": state.losses,
        "distill_seconds": round(state.seconds, 1), "resumed_from_step": state.resumed_from,
        "processes": {"count": procs.world, "distributed_type": procs.kind,
                      "batch_per_process": opts.distill.batch_size // procs.world},
        "total_seconds": round(time.time() - t_start, 1),
        **_sizes(teacher_pipe.transformer, student, plan),
        "scores": scores,
        "environment": _environment(),
    }
    _write(out, opts, ref, teacher_pipe, student_pipe, imp, evaluator, gen, report, say)
    shutil.rmtree(work, ignore_errors=True)
    procs.barrier()
    return report


def _sizes(teacher: Any, student: Any, plan: Plan | None) -> dict[str, Any]:
    """The report's ``params`` and ``bytes`` (dense counts: zeros of weight sparsity are still stored)."""
    if plan is not None:
        return {"params": {"before": plan.params_before, "after": plan.params_after, "kept_ratio": plan.kept_ratio},
                "bytes": {"bf16_before": plan.bytes_bf16_before, "bf16_after": plan.bytes_bf16_after,
                          "int4_after": plan.bytes_int4_after}}
    n = adapters.numel(teacher)
    return {"params": {"before": n, "after": n, "kept_ratio": 1.0},
            "bytes": {"bf16_before": 2 * n, "bf16_after": 2 * n, "int4_after": None}}


def _check_sparsity(teacher_pipe: Any, spec: SparsitySpec) -> None:
    """Every named component present and, for N:M, every pruned layer's input width a multiple of M."""
    for attr in spec.resolve(teacher_pipe):
        check_pattern(pruned_layers(getattr(teacher_pipe, attr)), spec.n_m, attr)


def _sparsify(teacher_pipe: Any, student: Any, opts: CompressOptions, evaluator: DigitsEvaluator | None, gen: Defaults,
              say: Callable[..., None]) -> tuple[dict[str, Any], Masks | None, dict[str, Any] | None]:
    """Weight sparsity (:mod:`hpedge.compress.sparsity`) of the student and copies of the teacher's text encoders."""
    if opts.sparsity is None:
        return {}, None, None
    say(f"weight sparsity ({opts.sparsity.method}, {opts.sparsity.pattern})", 0, 1)
    prompts, _ = calibration(evaluator, opts.sparsity_prompts, seed=5, prompts_file=opts.prompts_file)
    text, masks, report = apply_sparsity(teacher_pipe, student, opts.sparsity, prompts, gen)
    return text, masks, report


def _quantize(teacher_pipe: Any, student: Any, opts: CompressOptions, evaluator: DigitsEvaluator | None, gen: Defaults,
              work: Path, procs: Processes, say: Callable[..., None]) -> dict[str, Any] | None:
    """Vector quantization (:mod:`hpedge.compress.vq`) of the student's block layers, in place. The main process
    fits the codes and keeps them in the work folder; the other ranks, and a resumed run, load them from there (the
    distillation's checkpoints hold the tuned codebooks and scales, never other codes)."""
    if opts.vq is None:
        return None
    if procs.kind in ("fsdp", "deepspeed"):
        raise HpedgeError(f"vector quantization keeps its codes on whole layers: fine-tune it on one process or with DDP, "
                          f"not {procs.kind}")
    path = work / "vq-start.safetensors"
    layers: dict[str, Any] = {}
    if procs.is_main and not (opts.resume and path.exists()):
        prompts, _ = calibration(evaluator, opts.vq_prompts, seed=5, prompts_file=opts.prompts_file)
        run = transformer_calibration(teacher_pipe, student, prompts, gen)
        layers = vector_quantize(student, opts.vq, run, progress=say)
        save_vq(student, opts.vq, work, name=path.name)
        (work / "vq-start.json").write_text(json.dumps(layers))
    procs.barrier()
    if not layers:
        load_quantized(student, path)
        layers = json.loads((work / "vq-start.json").read_text())
    return {**opts.vq.to_dict(), "layers": layers, "file": VQ_FILE}


def _zeros_held(student_pipe: Any, masks: Masks | None) -> bool:
    """Whether every pruned weight of the student transformer (the one component distillation trains) is exactly
    zero."""
    if masks is None:
        return True
    layers = dict(student_pipe.transformer.named_modules())
    return all(bool((layers[n].weight.detach()[~m.to(layers[n].weight.device)] == 0).all()) for n, m in masks.masks.items())


def _start(model: str, out: Path, opts: CompressOptions) -> tuple[ModelRef, Path, Processes]:
    """Options, OUT and the work folder checked before anything runs; the processes of the launch started."""
    check_parent(out)
    if out.exists() and not opts.overwrite:
        raise HpedgeError(f"{out} already exists; pass --overwrite to replace it")
    if opts.sparsity is not None:
        opts.sparsity.check()
    if opts.vq is not None:
        opts.vq.check()
        if opts.sparsity is not None:
            raise HpedgeError("--vq with --sparsity: a codebook does not keep a pruned weight at zero; give one of them")
    alone = opts.sparsity is not None or opts.vq is not None
    if not alone or opts.budget.given():  # weight sparsity or vector quantization alone needs no block budget
        opts.budget.check()
    elif opts.importance is not None:
        raise HpedgeError("--importance plans block removal: give a block budget with it, or leave it out")
    opts.distill.check()
    opts.analysis.check()
    if opts.distill.data_dir is not None:
        data_pairs(Path(opts.distill.data_dir))
    if opts.prompts_file is not None:
        read_prompts(opts.prompts_file)
    ref = resolve(model)
    if opts.importance is not None:
        load_importance(opts.importance, family_hint=ref.family)
    work = work_dir(out)
    if work.exists() and not opts.resume and not opts.overwrite:
        raise HpedgeError(f"an earlier run left its work in {work}; pass --resume to continue it or --overwrite to start over")
    procs = Processes.start(opts.distill.mixed_precision)
    procs.barrier()  # every rank has checked OUT and the work folder before the main process touches them
    if procs.is_main:
        if work.exists() and not opts.resume:
            shutil.rmtree(work)
        work.mkdir(exist_ok=True)
    procs.barrier()
    return ref, work, procs


def _load_teacher(ref: ModelRef, opts: CompressOptions, procs: Processes, say: Callable[..., None]) -> tuple[Any, Defaults]:
    """The teacher on this rank's accelerator in the mixed-precision dtype (analysis and the sample pool run
    where training will), its sampling settings, and explicit block indices checked before the long analysis."""
    say("loading", 0, 1)
    teacher_pipe = load_pipeline(ref)
    check_pipeline(teacher_pipe)
    teacher_pipe.to(procs.device, TORCH_DTYPES[opts.distill.mixed_precision])
    gen = with_overrides(defaults(teacher_pipe, ref.path), height=opts.resolution, width=opts.resolution)
    if opts.analysis.prompts_file is None:
        opts.analysis.prompts_file = opts.prompts_file
    if opts.analysis.resolution is None:  # the analysis at the size the student is distilled at
        opts.analysis.resolution = opts.resolution
    if opts.budget.remove_blocks:
        indices = parse_blocks(opts.budget.remove_blocks)
        if isinstance(indices, list):
            adapters.validate_removal(teacher_pipe.transformer, set(indices))
    return teacher_pipe, gen


def _importance(teacher_pipe: Any, ref: ModelRef, work: Path, opts: CompressOptions, procs: Processes,
                say: Callable[..., None]) -> Importance | None:
    """The contribution analysis (cached in the work folder; reused by --resume), a given table, or none where
    explicit indices and no SGDistill need none."""
    if opts.importance:
        return load_importance(opts.importance, family_hint=ref.family)
    if opts.budget.remove_blocks and "," in opts.budget.remove_blocks and opts.distill.sgd == "off":
        return None
    return analyze(teacher_pipe, ref.path, work / "importance.json", opts.analysis,
                   progress=lambda what, k, n: say(f"analysis: {what}", k, n), procs=procs)


def _plan(teacher_pipe: Any, ref: ModelRef, work: Path, imp: Importance | None, opts: CompressOptions,
          procs: Processes) -> Plan:
    """The position-aware plan, written to the work folder (a --resume must plan the same cut)."""
    plan = plan_on_target(teacher_pipe.transformer, opts.budget, imp, opts.protect_early, ref)
    plan_file = work / "plan.json"
    if plan_file.exists():
        saved = json.loads(plan_file.read_text())
        if saved["remove"] != plan.remove:
            raise HpedgeError(f"the run in {work} removes blocks {saved['remove']}, this one {plan.remove}; "
                              "use the same budget to --resume, or --overwrite to start over")
    procs.barrier()
    if procs.is_main and not plan_file.exists():
        with atomic_file(plan_file) as tmp:
            tmp.write_text(json.dumps(plan.to_dict(), indent=2))
    return plan


def _environment() -> dict[str, Any]:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.machine()}


def _write(out: Path, opts: CompressOptions, ref: ModelRef, teacher_pipe: Any, student_pipe: Any, imp: Importance | None,
           evaluator: DigitsEvaluator | None, gen: Defaults, report: dict[str, Any], say: Callable[..., None]) -> None:
    """OUT, atomically, by the main process alone: the student pipeline (fp32 weights, stock-loadable, like the
    source), the importance table and heatmap, the teacher-vs-student grid and the report."""
    import torch

    say("writing", 0, 1)
    teacher_pipe.to("cpu", torch.float32)
    student_pipe.to("cpu", torch.float32)
    with atomic_dir(out, overwrite=opts.overwrite) as tmp:
        if opts.vq is not None:  # the codes beside a stock pipeline of their dequantized weights
            report["vq"]["bits_per_weight"] = bits_per_weight(student_pipe.transformer)  # as stored (float32)
            save_vq(student_pipe.transformer, opts.vq, tmp)
            densify(student_pipe.transformer)
            report["vq"]["file_bytes"] = (tmp / VQ_FILE).stat().st_size
        student_pipe.save_pretrained(tmp, safe_serialization=True)
        make_stock_loadable(tmp)
        if ref.path is not None and (ref.path / "hpedge_zoo.json").exists():
            shutil.copy(ref.path / "hpedge_zoo.json", tmp / "hpedge_zoo.json")
        if imp is not None:
            (tmp / "hpedge_importance.json").write_text(json.dumps(imp.to_dict(), indent=2))
            heatmap(imp, tmp / "importance.png")
        if opts.grid_samples > 0:
            _teacher_student_grid(teacher_pipe, student_pipe, evaluator, opts.grid_samples, gen,
                                  tmp / "teacher_vs_student.png", opts.prompts_file)
        (tmp / REPORT).write_text(json.dumps(report, indent=2))


def _report_of(out: Path) -> dict[str, Any]:
    return json.loads((out / REPORT).read_text())


def _teacher_student_grid(teacher: Any, student: Any, evaluator: DigitsEvaluator | None, n: int, gen: Defaults, path: Path,
                          prompts_file: str | None = None) -> None:
    """Row pairs: teacher images above the student's, same prompts and seeds, at the sampling defaults."""

    prompts, _ = calibration(evaluator, max(n, 5), seed=3, prompts_file=prompts_file)
    prompts = prompts[:: max(1, len(prompts) // n)][:n]
    seeds = list(range(len(prompts)))
    a = sample(teacher, prompts, gen, seeds=seeds, batch_size=8)
    b = sample(student, prompts, gen, seeds=seeds, batch_size=8)
    if a.shape[-1] == 1:
        a, b = a[..., 0], b[..., 0]
    cols = 8
    tiles, labels = teacher_student_rows(list(a), list(b), prompts, cols)
    save_grid(tiles, labels, path, cols=cols)


def teacher_student_rows(a: list[Any], b: list[Any], prompts: list[str], cols: int) -> tuple[list[Any], list[str]]:
    """Cells for a grid of ``cols`` columns: each row of teacher images directly above the student's row,
    a short last row padded with blank cells so the pairs stay aligned."""
    tiles: list[Any] = []
    labels: list[str] = []
    for i in range(0, len(prompts), cols):
        chunk = prompts[i : i + cols]
        pad = cols - len(chunk)
        tiles += list(a[i : i + cols]) + [None] * pad + list(b[i : i + cols]) + [None] * pad
        labels += ["T: " + p for p in chunk] + [""] * pad + ["S: " + p for p in chunk] + [""] * pad
    return tiles, labels


def plan_for(model: str, budget: Budget, importance: str | None, protect_early: float) -> Plan:

    ref = resolve(model, allow_architecture=True)
    imp = load_importance(importance, family_hint=ref.family) if importance else None
    if imp is None and ref.path is not None:
        cached = ref.path / "hpedge_importance.json"
        if cached.exists():
            imp = load_importance(cached)
    tr = load_transformer(ref)
    return plan_on_target(tr, budget, imp, protect_early, ref)


def sparsity_note(model: str, sparsity: str | None, pattern: str = "unstructured") -> str | None:
    """``hpedge plan``'s line on weight sparsity: of ``--sparsity`` as given, else of the sparsity MODEL was
    compressed with (its ``hpedge_compress.json``), else None."""
    if sparsity is not None:
        spec = SparsitySpec.parse(sparsity, pattern)
        spec.check()
        return size_note(pattern, spec.fractions)
    ref = resolve(model, allow_architecture=True)
    report = ref.path / REPORT if ref.path is not None else None
    sp = json.loads(report.read_text()).get("sparsity") if report is not None and report.exists() else None
    return size_note(sp["pattern"], {k: c["achieved"] for k, c in sp["components"].items()}) if sp else None
