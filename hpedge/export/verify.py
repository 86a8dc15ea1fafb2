"""Parity: every check of a package against PyTorch, one code per check, used by export, check and build alike.

At export, PyTorch's outputs are computed here (:func:`torch_outputs`, :func:`text_reference`,
:func:`vae_reference`, :func:`stock_images`) and stored in the package (:func:`hpedge.runtime.format.save_reference`);
``hpedge check`` reruns the same checks against the stored outputs, without the original model. The fp32 graph
is judged element-wise (the profile's atol / rtol, through Polygraphy); INT4 graphs, text encoders, the VAE
decoder and engines by cosine similarity and PSNR (an element-wise tolerance is meaningless for 4-bit
weights). End to end, two gates: quantization quality (the package's runtime against the original pipeline's
stock images, the profile's loose ``e2e_min_psnr_db``) and implementation (the same runtime images against stock
diffusers' call driving the package's own graphs, :mod:`hpedge.export.driver`: both carry the same quantization
error, so the tight ``impl_min_psnr_db`` sees sampling bugs alone).
"""

from __future__ import annotations

import contextlib
import gc
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hpedge.backends import engines as eng
from hpedge.backends import ort
from hpedge.backends import polygraphy_runner as pgy
from hpedge.errors import HpedgeError
from hpedge.export import precision_variant
from hpedge.export.encoders import tokenize
from hpedge.export.onnx_export import IOSpec, _transformer_wrapper, input_names
from hpedge.export.quantize import rows_of
from hpedge.export.widen import fp32_view
from hpedge.models.denoise import encode
from hpedge.models.families import family as family_facts
from hpedge.models.sampling import Defaults, sample
from hpedge.runtime.format import load_implementation_reference, load_reference
from hpedge.runtime.package import Package
from hpedge.targets.profiles import Parity, profile_from_dict


@dataclass
class Check:
    name: str
    passed: bool
    metrics: dict[str, Any]
    limits: dict[str, Any]
    skipped: bool = False  # not run on this machine (the name says why); counts as passed


@dataclass
class ParityReport:
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "checks": [asdict(c) for c in self.checks]}

    def failures(self) -> list[str]:
        return [f"{c.name} {c.metrics} vs {c.limits}" for c in self.checks if not c.passed]


# -- measures -------------------------------------------------------------------------------------------------
def quality(ref: np.ndarray, out: np.ndarray) -> dict[str, float]:
    r, o = ref.astype(np.float64).ravel(), out.astype(np.float64).ravel()
    cos = float(r @ o / (np.linalg.norm(r) * np.linalg.norm(o) + 1e-12))
    mse = float(((r - o) ** 2).mean())
    peak = float(np.abs(r).max()) or 1.0
    psnr = float(10 * np.log10(peak**2 / mse)) if mse > 0 else float("inf")
    return {"cosine": cos, "psnr_db": psnr, "max_abs": float(np.abs(r - o).max())}


def compare_quality(name: str, reference: list[np.ndarray], outs: list[np.ndarray], min_cosine: float,
                    min_psnr: float) -> Check:
    qs = [quality(r, o) for r, o in zip(reference, outs)]
    cos = min(q["cosine"] for q in qs)
    psnr = min(q["psnr_db"] for q in qs)
    return Check(name, cos >= min_cosine and psnr >= min_psnr, {"min_cosine": cos, "min_psnr_db": psnr},
                 {"min_cosine": min_cosine, "min_psnr_db": min_psnr})


def compare_fp32(reference: list[np.ndarray], results: Any, output_name: str, atol: float, rtol: float,
                 name: str = "transformer fp32: ONNX Runtime vs PyTorch") -> Check:
    """Element-wise comparison through Polygraphy's Comparator.compare_accuracy."""
    passed = pgy.matches_elementwise(reference, results, output_name, atol, rtol)
    err = max(float(np.abs(r - o).max()) for r, o in zip(reference, pgy.outputs_of(results)))
    return Check(name, passed, {"max_abs": err}, {"atol": atol, "rtol": rtol})


def compare_scaled(reference: list[np.ndarray], results: Any, output_name: str, atol: float, rtol: float,
                   name: str = "transformer fp32: ONNX Runtime vs PyTorch (the fp16 graph widened to float32)") -> Check:
    """Max |error| of each output within ``atol + rtol x max |reference|`` (the fresh-input criterion of
    :func:`check_fp32`): the widened fp16 graph keeps the exporter's fp16 constants (an attention scale rounded to
    fp16 moves logits by about 1e-4 of their size), which an element-wise relative test of small values would
    flag; an export bug moves outputs by far more (a changed weight: tests/export/test_widen.py)."""
    outs = pgy.outputs_of(results)
    errs = [float(np.abs(r - o).max()) for r, o in zip(reference, outs)]
    tols = [atol + rtol * float(np.abs(r).max()) for r in reference]
    ok = all(np.isfinite(o).all() for o in outs) and all(e <= t for e, t in zip(errs, tols))
    return Check(name, bool(ok), {"max_abs": max(errs), "tolerance": min(tols)}, {"atol": atol, "rtol": rtol})


# -- PyTorch references (export time) -------------------------------------------------------------------------
def torch_outputs(pipe: Any, feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    import torch

    wrapper = _transformer_wrapper(pipe.transformer)
    dev = next(pipe.transformer.parameters()).device
    names = input_names(pipe.transformer)
    outs = []
    with torch.no_grad():  # one batch row at a time (activations grow with the batch), joined as the batch
        for f in feeds:
            outs.append(np.concatenate([wrapper(*(torch.from_numpy(row[n]).to(dev) for n in names)).cpu().numpy()
                                        for row in rows_of(f)]))
    return outs


def fresh_feeds(spec: IOSpec, family: str) -> dict[str, dict[str, np.ndarray]]:
    """New random inputs at the profile's min and opt shapes and at its max resolution with batch 1 (the max
    batch at the max resolution is the engine's to cover, not a CPU check's)."""
    out = {}
    for which in ("min", "opt", "max"):
        feed = spec.sample(which, seed=7)
        if which == "max":
            feed = {k: v[:1] if spec.dynamic_axes.get(k, {}).get(0) == "batch" else v for k, v in feed.items()}
        if "timestep" in feed:  # sigma in [0, 1] as the transformer's timestep input
            feed["timestep"] = feed["timestep"] * np.float32(family_facts(family).timestep_scale)
        out[which if which != "max" else "max_batch1"] = feed
    return out


def text_reference(pipe: Any, prompts: list[str], seq: int, device: Any = None) -> dict[str, np.ndarray]:
    """Held-out prompts' token ids (``text/ids/...``) and the pipeline's own ``encode_prompt`` embeddings for them
    (on ``device``, default the transformer's)."""
    import torch

    ids = tokenize(pipe, prompts, seq)
    with torch.no_grad():
        ref = encode(pipe, prompts, seq, device=device)
    return {**{f"text/ids/{k}": v for k, v in ids.items()},
            "text/prompt_embeds": ref.prompt_embeds.float().cpu().numpy(), "text/pooled": ref.pooled.float().cpu().numpy()}


def vae_reference(pipe: Any, latent_hw: int) -> dict[str, np.ndarray]:
    """Seeded N(0, 1) latents at the package's opt size and PyTorch's decode of them (the VAE's own dtype)."""
    import torch

    c = int(pipe.vae.config.latent_channels)
    lat = np.random.default_rng(11).standard_normal((1, c, latent_hw, latent_hw)).astype(np.float32)
    vae = pipe.vae
    with torch.no_grad():
        z = torch.from_numpy(lat).to(vae.device) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        ref = (vae.decode(z.to(vae.dtype), return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1).cpu().numpy()
    return {"vae/latents": lat, "vae/image": ref}


def stock_images(pipe: Any, prompts: list[str], gen: Defaults, latents: np.ndarray,
                 embeds: dict[str, Any] | None = None) -> np.ndarray:
    """Stock diffusers' images (the original pipeline's own call) from initial noise ``latents``; ``embeds``: the
    call's own prompt embeddings computed earlier (:func:`hpedge.models.sampling.prompt_embeddings`)."""
    import torch

    ref = sample(pipe, prompts, gen, latents=torch.from_numpy(latents), embeds=embeds)
    return ref[..., 0] if ref.shape[-1] == 1 else ref


# -- the checks -----------------------------------------------------------------------------------------------
def release_memory() -> None:
    """Collect what Python no longer references and give freed heap memory back to the OS (between the export's
    stages, so that the next one starts from what is really in use)."""
    gc.collect()
    ort.return_freed_memory()


def check_fp32(path: Path, fresh: dict[str, dict[str, np.ndarray]], fresh_ref: list[np.ndarray],
               held: list[dict[str, np.ndarray]], parity: Parity) -> tuple[dict[str, float], Any]:
    """The fp32 graph in one ONNX Runtime session: fresh inputs against PyTorch's outputs for them (the export
    aborts on a mismatch), then the held-out inputs (returned as Polygraphy results for the parity report)."""
    sess = ort.session(path, "auto", low_memory=True)
    errs = {}
    for (which, feed), ref in zip(fresh.items(), fresh_ref):
        out = ort.run(sess, feed)[0]
        err = float(np.abs(out - ref).max())
        tol = parity.fp32_atol + parity.fp32_rtol * float(np.abs(ref).max())
        errs[which] = err
        if not np.isfinite(out).all() or err > tol:
            raise HpedgeError(f"the exported transformer does not match PyTorch on fresh {which} inputs "
                              f"(max abs error {err:.2e} > {tol:.2e}); export aborted")
    held_out = [np.concatenate([ort.run(sess, row)[0] for row in rows_of(f)]) for f in held]  # a row at a time
    del sess
    release_memory()
    return errs, pgy.reference_results(held_out, "out", "onnxrt-fp32")


def transformer_check(name: str, variant: str, results: Any, ref: list[np.ndarray], output: str,
                      lim: Parity) -> Check:
    """One transformer variant's outputs (Polygraphy results) against PyTorch's: fp32 element-wise, INT4 by
    cosine and PSNR (the profile's limits)."""
    if variant == "fp32":
        return compare_fp32(ref, results, output, lim.fp32_atol, lim.fp32_rtol, name)
    return compare_quality(name, ref, pgy.outputs_of(results), lim.int4_min_cosine, lim.int4_min_psnr_db)


def dequantized_check(variant: str, path: Path, feeds: list[dict[str, np.ndarray]], shipped: Any, ref: list[np.ndarray],
                      lim: Parity, cpu_kernel: str = "int8") -> Check:
    """Quantized transformer graph ``path`` vs PyTorch running the graph's own weights
    (:mod:`hpedge.export.dequantized`, float32 compute) on ``feeds``: implementation error alone.

    ``int4`` computes in the graph's type (fp16 by default), whose rounding is a precision choice, not a bug, and on
    some inputs as large as quantization's (on the FLUX.1-dev fixture the fp16 graph is 31 dB from its own weights
    computed in float32, and PyTorch in fp16 as far): the gate runs its float32 view (:mod:`hpedge.export.widen`,
    the same weights and nodes) and reports the shipped graph's distance (``shipped``, its Polygraphy results)
    beside it. ``int4_cpu`` computes in float32 as it ships: with the int8 kernel, ``ref`` is PyTorch with that
    kernel's int8 weights and its per-tensor uint8 activations emulated (its own, looser limit: the emulation is not
    exact, 61-71 dB on the fixtures and 50.2 dB on the digits-sd3 student); the ``nbits`` kernel's block-wise int8
    activations are not emulated: a skip that says so."""
    name = f"implementation: transformer {variant} vs PyTorch with the same dequantized weights"
    if variant == "int4_cpu":
        if cpu_kernel != "int8":
            return Check(f"{name}: not run for the {cpu_kernel} kernel (its activation quantization is not emulated; "
                         "the int4 graph with the same nibbles is gated)", True, {}, {}, True)
        return compare_quality(name + " and activation quantization", ref, pgy.outputs_of(shipped), lim.impl_min_cosine,
                               lim.impl_int4_cpu_min_psnr_db)
    results, widened = _float32_run(path, feeds, f"onnxrt-{variant}-float32", rows_of)
    # FP8 / NVFP4 quantize activations too: a value on a rounding boundary may round the other way in the graph than
    # in PyTorch (as int4_cpu's uint8 activations), so their gate is the activation-quantized one
    acts = variant in ("fp8", "nvfp4")
    c = compare_quality(name + (" and activation quantization" if acts else "") + (" (its float32 view)" if widened else ""),
                        ref, pgy.outputs_of(results), lim.impl_fp4_min_cosine if variant == "nvfp4" else lim.impl_min_cosine,
                        lim.impl_fp4_min_psnr_db if variant == "nvfp4" else
                        lim.impl_activation_quant_min_psnr_db if acts else lim.impl_graph_min_psnr_db)
    if widened:
        c.metrics["shipped_graph_min_psnr_db"] = compare_quality("", ref, pgy.outputs_of(shipped), 0, 0).metrics["min_psnr_db"]
    return c


def weights_only_check(variant: str, path: Path, folder: Path, feeds: list[dict[str, np.ndarray]], ref: list[np.ndarray],
                       lim: Parity) -> Check:
    """An FP8 / NVFP4 graph with its activation quantizers bypassed (:func:`hpedge.export.precision_variant.runnable`,
    written into ``folder``), computed in float32, vs PyTorch with the same weights and unquantized inputs: the
    weights' values, packing and scales alone, at INT4's tight limit (float32-exact)."""
    graph = precision_variant.runnable(variant, path, folder, activations=False)
    results, widened = _float32_run(graph, feeds, f"onnxrt-{variant}-weights-float32", rows_of)
    return compare_quality(f"implementation: transformer {variant} weights vs PyTorch with the same dequantized weights "
                           f"(activation quantizers bypassed{', its float32 view' if widened else ''})", ref,
                           pgy.outputs_of(results), lim.impl_min_cosine, lim.impl_graph_min_psnr_db)


@contextlib.contextmanager
def scratch() -> Iterator[Path]:
    """A temporary folder for graphs parity writes to run (NVFP4's emulation), removed after."""
    with tempfile.TemporaryDirectory(prefix="hpedge-parity-") as d:
        yield Path(d)


def _float32_run(path: Path, feeds: list[dict[str, np.ndarray]], name: str, split: Any = None) -> tuple[Any, bool]:
    """Polygraphy results of graph ``path`` computed in float32 (its float32 view: the graph alone, written in a
    temporary folder, its weights read from ``path``'s folder; a float32 graph as it is) and whether it was widened."""
    with tempfile.TemporaryDirectory(prefix="hpedge-view-") as d:
        try:
            view = fp32_view(path, "model.onnx", Path(d))
        except HpedgeError:  # a float32 graph: nothing to widen
            return pgy.run_onnxrt(path, feeds, name, split=split), False
        # weights in the graph file come along into the view (run from its path); weights in an external data file
        # stay there (the view is run with their folder: ONNX Runtime loads it from bytes then)
        external = path.with_name(path.name + ".data").exists()
        return pgy.run_onnxrt(view, feeds, name, split=split, data_dir=path.parent if external else None), True


def t5_dequantized_check(path: Path, ref: dict[str, np.ndarray], lim: Parity) -> Check:
    """The packaged T5 graph (INT8 or INT4 weights), computed in float32, vs PyTorch's T5 running its dequantized
    weights on the held-out prompts' ids (``text/t5_dequantized``, stored at export): its implementation alone."""
    results, _ = _float32_run(path, [{"t5_ids": ref["text/ids/t5_ids"]}], "onnxrt-t5-float32")
    return compare_quality("implementation: T5 graph (float32 view) vs PyTorch with the same dequantized weights",
                           [ref["text/t5_dequantized"]], pgy.outputs_of(results), lim.impl_min_cosine,
                           lim.impl_graph_min_psnr_db)


def text_check(name: str, pkg: Package, ref: dict[str, np.ndarray], min_cosine: float) -> Check:
    """Prompt embeddings of the packaged encoders (through the runtime) vs the pipeline's ``encode_prompt``."""
    if "text/prompt_embeds" not in ref:
        raise HpedgeError(f"{pkg.root}: the parity reference has no text encoder outputs; export it again",
                          HpedgeError.CHECK_FAILED)
    ids = {k.split("/", 2)[2]: v for k, v in ref.items() if k.startswith("text/ids/")}
    pe, pooled = pkg.encode_ids(ids)
    if ref["text/prompt_embeds"].shape != pe.shape:
        raise HpedgeError(f"internal: packaged prompt embeddings {pe.shape} differ in shape from encode_prompt's "
                          f"{ref['text/prompt_embeds'].shape}")
    c = compare_quality(name, list(ref["text/prompt_embeds"]), list(pe), min_cosine, 0.0)
    c2 = compare_quality("pooled", list(ref["text/pooled"]), list(pooled), min_cosine, 0.0)
    c.metrics["pooled_min_cosine"] = c2.metrics["min_cosine"]
    c.passed = c.passed and c2.passed
    return c


def vae_check(name: str, pkg: Package, ref: dict[str, np.ndarray], min_psnr: float) -> Check:
    """The packaged VAE decoder (through the runtime) vs PyTorch's decode of the same latents."""
    return compare_quality(name, [ref["vae/image"]], [pkg.decode(ref["vae/latents"])], 0.0, min_psnr)


def engine_checks(root: Path, section: dict[str, Any], feeds: list[dict[str, np.ndarray]], ref: list[np.ndarray],
                  lim: Parity, components: tuple[str, ...] | None = None, against: str = "PyTorch") -> list[Check]:
    """Each built engine (of ``components``, all by default) where this machine can run it, else a skip that
    says why. The transformer engine is compared with PyTorch's outputs (the profile's INT4 limits); the text
    and VAE engines with ONNX Runtime running their own ONNX files on the same inputs (cosine >= 0.999)."""
    names = [n for n in section["components"] if components is None or n in components]
    av = eng.can_run(section)
    caps = ", ".join("sm_" + c.replace(".", "") for c in section["compute_capabilities"])
    if not av.ok:
        return [Check(f"{n} engine ({section['library']}, {caps}): built here; not run: {av.reason}", True, {}, {}, True)
                for n in names]
    out = []
    for name in names:
        c = section["components"][name]
        runner = eng.open_runner(root, section, name)
        if name == "transformer":
            tf, tr = within_batch(c, feeds, ref)
            got = [runner.run(f)[0] for f in tf]
            chk = compare_quality(f"transformer engine ({section['library']}) vs {against}", tr, got,
                                  lim.int4_min_cosine, lim.int4_min_psnr_db)
        else:
            feed = {k: _sample_input(k, v["opt"]) for k, v in c["shapes"].items()}
            want = ort.run(ort.session(root / c["onnx"], "cpu"), feed)
            chk = compare_quality(f"{name} engine ({section['library']}) vs ONNX Runtime", want[:1], runner.run(feed)[:1],
                                  0.999, 0.0)
        runner.save_cache()
        out.append(chk)
    return out


def engine_summary(checks: list[Check]) -> dict[str, Any]:
    """The manifest's ``engines.parity``: the transformer engine's check, or why it did not run."""
    c = checks[0]
    if c.skipped:
        return {"run": False, "reason": c.name.split(": ", 1)[1]}
    return {"run": True, "passed": c.passed, **c.metrics}


def within_batch(component: dict[str, Any], feeds: list[dict[str, Any]], ref: list[Any]) -> tuple[list[dict[str, Any]], list[Any]]:
    """Transformer feeds (and their references) cut to the engine's largest batch."""
    names = list(component["shapes"])
    cap = min(component["shapes"][k]["max"][0] for k in component["batch_inputs"])
    cut = [{k: (f[k][:cap] if k in component["batch_inputs"] else f[k]) for k in names} for f in feeds]
    return cut, [r[:cap] for r in ref]


def _sample_input(name: str, shape: list[int]) -> np.ndarray:
    rng = np.random.default_rng(0)
    if name.endswith("_ids"):
        return rng.integers(0, 100, size=shape).astype(np.int64)
    return rng.standard_normal(shape).astype(np.float32)


def e2e_images(pkg: Package, prompts: list[str], latents: np.ndarray, gen: Defaults) -> np.ndarray:
    """The package runtime's images for ``prompts`` from initial noise ``latents`` at ``gen``'s steps, size and
    guidance. One prompt at a time: ONNX Runtime holds one sample's activations (a batch's attention scores grow
    with batch x tokens^2); each sample is computed alone anyway."""
    return np.concatenate([pkg.generate([p], steps=gen.steps, guidance=gen.guidance, latents=latents[i : i + 1])
                           for i, p in enumerate(prompts)])


def e2e_check(pkg: Package, prompts: list[str], latents: np.ndarray, ref: np.ndarray, gen: Defaults,
              min_psnr: float, got: np.ndarray | None = None) -> Check:
    """Full generations through the packaged components (``got``: :func:`e2e_images`, computed here if None) vs
    stock diffusers' images ``ref`` of the original pipeline: same prompts, initial noise, steps, size and guidance.
    Quantization quality: the loose gate (INT4 weights against the original's)."""
    got = e2e_images(pkg, prompts, latents, gen) if got is None else got
    q = [quality(r, g) for r, g in zip(ref, got)]
    psnr = min(x["psnr_db"] for x in q)
    return Check(f"end-to-end images: package ({pkg.variant}) vs stock diffusers", psnr >= min_psnr,
                 {"min_psnr_db": psnr, "mean_psnr_db": float(np.mean([x["psnr_db"] for x in q])),
                  "steps": gen.steps, "guidance": gen.guidance, "size": [gen.height, gen.width]},
                 {"min_psnr_db": min_psnr})


#: PSNR reported for images that are equal to the last bit (JSON has no infinity)
IDENTICAL_DB = 200.0


def implementation_check(variant: str, got: np.ndarray, driven: np.ndarray, min_psnr: float) -> Check:
    """The runtime's images ``got`` vs stock diffusers' call driving the same graphs (``driven``:
    :func:`hpedge.export.driver.driven_images`, same prompts, noise, steps, size and guidance). Both sides carry the
    same quantization error, so the tight gate measures the runtime's implementation alone: a wrong shift,
    guidance, T5 length, prompt, CFG or latent layout moves the images by tens of dB (tests/export/test_driver.py)."""
    name = f"implementation: package runtime ({variant}) vs stock diffusers driving the same graphs"
    if got.shape != driven.shape:
        return Check(name, False, {"shape": list(got.shape)}, {"shape": list(driven.shape)})
    q = [quality(d, g) for d, g in zip(driven, got)]
    psnr = min(min(x["psnr_db"] for x in q), IDENTICAL_DB)
    return Check(name, psnr >= min_psnr, {"min_psnr_db": psnr, "max_abs": max(x["max_abs"] for x in q), "samples": len(q)},
                 {"min_psnr_db": min_psnr})


# -- hpedge check ---------------------------------------------------------------------------------------------
def check(package: Path, rerun_parity: bool = True) -> dict[str, Any]:
    """``hpedge check``: verify checksums and the manifest, then rerun parity.

    Parity is rerun without the original model: every transformer variant in the package runs on the
    held-out inputs stored at export time and is compared with the PyTorch outputs stored next to them
    (cosine/PSNR limits from the manifest's profile for INT4, atol/rtol for fp32), the text encoders, VAE
    decoder and engines likewise, and the packaged pipeline must produce finite images in [0, 1].
    """
    # the CPU variant generates (int4_cpu where the package has it: the int4 graph on ONNX Runtime's CPU provider
    # holds every weight dequantized at once); raises CHECK_FAILED on any tampering
    pkg = Package(package, variant="auto", device="cpu")
    result: dict[str, Any] = {"package": str(package), "files": len(pkg.manifest["files"]), "checks": []}
    if not rerun_parity:
        return result
    feeds, ref, extra = load_reference(package, pkg.manifest)
    tr = pkg.manifest["components"]["transformer"]
    lim = profile_from_dict(pkg.manifest["target"], f"{package}/manifest.json target").parity
    kernel = pkg.manifest["int4"]["cpu_kernel"]
    checks = []
    with scratch() as folder:
        for v, rel in tr["variants"].items():
            path = precision_variant.runnable(v, package / rel, folder)  # NVFP4: its emulation
            results = pgy.run_onnxrt(path, feeds, v, split=rows_of)
            checks.append(transformer_check(f"{v} vs PyTorch (stored reference)" + (
                f", run by {precision_variant.ran_as(v)}" if path != package / rel else ""), v, results, ref,
                tr["io"]["outputs"][0], lim))
            key = {"int4": "dequantized", "int4_cpu": "dequantized_cpu"}.get(v, f"dequantized_{v}")
            # int4_cpu without its own reference (the nbits kernel): dequantized_check says why it is not run
            if v != "fp32" and (f"{key}/0" in extra or (v == "int4_cpu" and "dequantized/0" in extra)):
                want = [extra.get(f"{key}/{i}") for i in range(len(feeds))]
                checks.append(dequantized_check(v, path, feeds, results, want, lim, kernel))
            if f"{key}_weights/0" in extra:
                want = [extra[f"{key}_weights/{i}"] for i in range(len(feeds))]
                checks.append(weights_only_check(v, package / rel, folder, feeds, want, lim))
    checks.append(text_check("text encoders vs PyTorch (stored reference): prompt embeddings", pkg, extra,
                             lim.text_min_cosine))
    t5 = pkg.manifest["components"]["text"]["encoders"].get("t5")
    if t5 and "text/t5_dequantized" in extra:
        checks.append(t5_dequantized_check(package / t5["file"], extra, lim))
    checks.append(vae_check("VAE decoder vs PyTorch (stored reference)", pkg, extra, lim.vae_min_psnr_db))
    section = pkg.manifest.get("engines") or {}
    if section.get("status") == "built":
        checks += engine_checks(package, section, feeds, ref, lim, against="PyTorch (stored reference)")
    else:
        checks.append(Check(f"engines {section.get('status', 'absent')}: {section.get('reason', '')}", True, {}, {}, True))
    impl = (pkg.manifest.get("parity") or {}).get("implementation")
    if impl and impl["variant"] == pkg.variant:  # the runtime's sampling code against stock diffusers' (stored)
        latents, driven = load_implementation_reference(package, impl)
        g = impl["generation"]
        img = pkg.generate([impl["prompt"]], steps=g["steps"], guidance=g["guidance"], latents=latents)
        checks.append(implementation_check(pkg.variant, img, driven, lim.impl_min_psnr_db))
    else:
        why = (f"its reference drove the {impl['variant']} graphs, this check runs {pkg.variant}" if impl
               else "this package has no implementation reference (exported by an older hpedge)")
        checks.append(Check(f"implementation check not run: {why}", True, {}, {}, True))
        img = pkg.generate(["a photo of a cat"], seed=0, steps=min(4, pkg.manifest["generation"]["default_steps"]))
    result["checks"] = [asdict(c) for c in checks]
    ok = bool(np.isfinite(img).all() and img.min() >= 0 and img.max() <= 1)
    result["checks"].append({"name": f"package ({pkg.variant}) generates finite images in [0, 1]", "passed": ok})
    result["passed"] = all(c["passed"] for c in result["checks"])
    if not result["passed"]:
        failed = [c["name"] for c in result["checks"] if not c["passed"]]
        raise HpedgeError(f"parity failed for {package}: {', '.join(failed)}", HpedgeError.CHECK_FAILED)
    return result
