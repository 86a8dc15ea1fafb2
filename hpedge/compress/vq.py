"""Vector quantization of the transformer's linear layers (VQDM, after AQLM's additive quantization).

Each quantized layer's weight ``W`` [out, in] is ``scales[o] * sum_m codebooks[m][codes[o, j, m]]`` over the
groups ``j`` of ``g`` consecutive input weights: ``M`` codebooks of ``2**B`` vectors of length ``g``, so
``M * B / g`` bits per weight for the codes, plus the codebooks and one scale per output row (:func:`bits_per_weight`
counts all three). What is quantized: the ``torch.nn.Linear`` layers inside the transformer's blocks (as weight
sparsity prunes them, :data:`hpedge.compress.sparsity.PRUNED`); embedders, norms' projections outside the blocks and
the final layer keep their precision.

Fitting one layer (:func:`fit_layer`), on ``H = X^T X / n`` of the layer's calibration inputs: scales are the rows'
RMS; codebooks start from residual k-means over the normalised weight groups; codes come from a beam search that
minimises the input-weighted error ``sum_k H_kk (w_k - w^_k)^2`` of each group; codebooks and scales are then tuned
by Adam on the layer's output error ``tr(dW H dW^T)`` (codes fixed), and the codes searched again. Layers are fitted
block by block with the blocks before already quantized (their outputs feed the later blocks' calibration). Then
``hpedge compress`` fine-tunes codebooks, scales and the unquantized parameters by distillation (codes fixed).

Storage (:func:`save`): ``vq/transformer.safetensors`` (codes, codebooks and scales per layer, the spec in its
metadata) next to the stock diffusers pipeline of dequantized weights that ``hpedge compress`` writes (so
``from_pretrained(OUT)`` loads it as is); :func:`load_quantized` puts the codebook layers back into a transformer.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hpedge.compress.sparsity import by_block, pruned_layers
from hpedge.errors import HpedgeError
from hpedge.models.codebooks import FILE, FORMAT, code_dtype, dequantize, layers_of, pack
from hpedge.models.codebooks import read as read_file

# presets by bits per weight of the codes (AQLM's MxB formats at group 8); "MxBgG" names any other
PRESETS = {"2bit": (2, 8, 8), "3bit": (3, 8, 8), "4bit": (4, 8, 8)}


@dataclass(frozen=True)
class VQSpec:
    codebooks: int  # M
    bits: int  # B: 2**B vectors per codebook
    group: int  # g: input weights per vector
    beam: int = 4  # beam width of the code search
    rounds: int = 2  # (code search, codebook/scale tuning) rounds after the k-means start
    tune_steps: int = 50  # Adam steps (at most) of codebooks and scales per round
    kmeans_iters: int = 12
    seed: int = 0

    @staticmethod
    def parse(text: str) -> VQSpec:
        """A preset (``2bit``, ``3bit``, ``4bit``) or ``MxBgG`` (``3x8g8``: 3 codebooks of 2**8 vectors of 8)."""
        if text in PRESETS:
            m, b, g = PRESETS[text]
            return VQSpec(m, b, g)
        hit = re.fullmatch(r"(\d+)x(\d+)g(\d+)", text.strip())
        if not hit:
            raise HpedgeError(f"--vq {text!r}: give a preset ({', '.join(PRESETS)}) or MxBgG, e.g. 3x8g8 (M codebooks of "
                              "2**B vectors of G weights)")
        m, b, g = (int(x) for x in hit.groups())
        return VQSpec(m, b, g)

    def check(self) -> None:
        if not 1 <= self.codebooks <= 8:
            raise HpedgeError(f"--vq: {self.codebooks} codebooks; give 1 to 8")
        if not 1 <= self.bits <= 16:
            raise HpedgeError(f"--vq: {self.bits} bits per codebook index; give 1 to 16 (codes are stored as 8-, 16- "
                              "or 32-bit integers; AQLM's largest codebooks have 2**16 vectors)")
        if not 1 <= self.group <= 64:
            raise HpedgeError(f"--vq: group of {self.group} weights; give 1 to 64")
        for name, v in (("beam", self.beam), ("rounds", self.rounds), ("kmeans_iters", self.kmeans_iters)):
            if v < 1:
                raise HpedgeError(f"--vq: {name} must be at least 1, got {v}")
        if self.tune_steps < 0:
            raise HpedgeError(f"--vq-tune-steps must be 0 or more, got {self.tune_steps}")

    @property
    def name(self) -> str:
        return f"{self.codebooks}x{self.bits}g{self.group}"

    @property
    def code_bits(self) -> float:
        return self.codebooks * self.bits / self.group

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "name": self.name, "code_bits_per_weight": self.code_bits}


def check_layers(layers: dict[str, Any], spec: VQSpec) -> None:
    """Every quantized layer's input width a multiple of the group size."""
    bad = [(n, m.in_features) for n, m in layers.items() if m.in_features % spec.group]
    if bad:
        raise HpedgeError(f"--vq {spec.name}: layer {bad[0][0]} has {bad[0][1]} inputs, not a multiple of the group "
                          f"size {spec.group}")


class _Modules:
    """``VQLinear`` is built on first use, so importing this module does not import torch."""

    cls: Any = None


def vq_linear_class() -> Any:
    if _Modules.cls is not None:
        return _Modules.cls
    import torch

    class VQLinear(torch.nn.Module):
        """A linear layer whose weight is :func:`dequantize` of fixed codes and trainable codebooks and scales."""

        def __init__(self, codes: Any, codebooks: Any, scales: Any, bias: Any | None) -> None:
            super().__init__()
            self.out_features, ngroups, _ = codes.shape
            self.in_features = ngroups * codebooks.shape[-1]
            self.register_buffer("codes", codes)
            self.codebooks = torch.nn.Parameter(codebooks)
            self.scales = torch.nn.Parameter(scales)
            self.bias = torch.nn.Parameter(bias) if bias is not None else None

        @property
        def weight(self) -> Any:
            return dequantize(self.codes, self.codebooks, self.scales)

        def forward(self, x: Any) -> Any:
            w = self.weight
            b = self.bias.to(x.dtype) if self.bias is not None else None
            return torch.nn.functional.linear(x, w.to(x.dtype), b)

        def dense(self) -> Any:
            """A ``torch.nn.Linear`` of the dequantized weight (what the stock pipeline stores)."""
            lin = torch.nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                                  dtype=self.codebooks.dtype, device=self.codebooks.device)
            with torch.no_grad():
                lin.weight.copy_(self.weight)
                if self.bias is not None:
                    lin.bias.copy_(self.bias)
            return lin

    _Modules.cls = VQLinear
    return VQLinear


def is_vq(module: Any) -> bool:
    return _Modules.cls is not None and isinstance(module, _Modules.cls)


# --- fitting one layer -------------------------------------------------------------------------------------------

def _kmeans(x: Any, k: int, iters: int, gen: Any) -> Any:
    """k centroids of the rows of ``x`` (Lloyd's algorithm from k distinct random rows; an empty cluster keeps its
    centroid). Fewer rows than ``k``: the rows are repeated."""
    import torch

    n = x.shape[0]
    pick = torch.randperm(n, generator=gen)[:k]
    if n < k:
        pick = torch.cat([pick, torch.randint(0, n, (k - n,), generator=gen)])
    c = x[pick].clone()
    for _ in range(iters):
        assign = _nearest(x, c)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)[:, None]
        c = torch.where(counts > 0, sums / counts.clamp_min(1), c)
    return c


def _nearest(x: Any, c: Any, chunk: int = 16384) -> Any:
    import torch

    c2 = (c * c).sum(1)
    out = []
    for i in range(0, x.shape[0], chunk):
        xi = x[i:i + chunk]
        out.append((c2[None, :] - 2 * xi @ c.T).argmin(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def beam_search(v: Any, d: Any, codebooks: Any, codes: Any, beam: int, chunk: int = 2048) -> Any:
    """Codes [N, M] for the vectors ``v`` [N, g] minimising ``sum_k d_k (v_k - sum_m C_m[c_m]_k)^2`` (``d`` [N, g]:
    the weights of each coordinate), starting from ``codes``: codebook after codebook, every beam tries every vector
    of that codebook in its place and the ``beam`` best code tuples go on; the best at the end is kept (never worse
    than the start, which stays a candidate)."""
    import torch

    m = codebooks.shape[0]
    out = []
    for i in range(0, v.shape[0], chunk):
        vi, di, ci = v[i:i + chunk], d[i:i + chunk], codes[i:i + chunk].long()
        n = vi.shape[0]
        beams = ci[:, None, :]  # [n, K, M]
        for k in range(m):
            recon = sum(codebooks[j][beams[..., j]] for j in range(m) if j != k)  # [n, K, g]
            t = vi[:, None, :] - recon if m > 1 else vi[:, None, :].expand(n, 1, -1)
            cb = codebooks[k]  # [V, g]
            # sum d (t - c)^2 = sum d t^2 - 2 (d t) . c + d . c^2
            err = ((di[:, None, :] * t * t).sum(-1, keepdim=True) - 2 * (di[:, None, :] * t) @ cb.T
                   + (di @ (cb * cb).T)[:, None, :])  # [n, K, V]
            kk = beams.shape[1]
            flat = err.reshape(n, kk * cb.shape[0])
            top = flat.topk(min(beam, flat.shape[1]), dim=1, largest=False).indices
            src, word = top // cb.shape[0], top % cb.shape[0]
            beams = torch.gather(beams, 1, src[..., None].expand(-1, -1, m)).clone()
            beams[..., k] = word
        best = beams[:, 0, :]
        old, new = _group_error(vi, di, codebooks, ci), _group_error(vi, di, codebooks, best)
        out.append(torch.where((new <= old)[:, None], best, ci))
    return torch.cat(out)


def _group_error(v: Any, d: Any, codebooks: Any, codes: Any) -> Any:
    recon = sum(codebooks[j][codes[:, j]] for j in range(codebooks.shape[0]))
    return (d * (v - recon) ** 2).sum(1)


def output_error(w: Any, w_hat: Any, h: Any) -> float:
    """``tr(dW H dW^T) / tr(W H W^T)``: the layer's relative output error on its calibration inputs."""
    dw = (w - w_hat).double()
    den = float(((w.double() @ h.double()) * w.double()).sum())
    return float(((dw @ h.double()) * dw).sum()) / max(den, 1e-30)


@dataclass
class LayerFit:
    codes: Any
    codebooks: Any
    scales: Any
    error_start: float  # after k-means and the first code search
    error: float  # at the end


def fit_layer(w: Any, h: Any, spec: VQSpec) -> LayerFit:
    """Codes, codebooks and scales for the weight ``w`` [out, in] given ``h`` = X^T X / n [in, in] (float32)."""
    import torch

    gen = torch.Generator().manual_seed(spec.seed)
    w = w.detach().float()
    out = w.shape[0]
    g, m, size = spec.group, spec.codebooks, 2 ** spec.bits
    h = h.float()
    scales = w.pow(2).mean(1, keepdim=True).sqrt().clamp_min(1e-12)
    v = (w / scales).reshape(-1, g)  # [out * in/g, g]
    diag = h.diagonal().clamp_min(0)
    d = (diag / diag.mean().clamp_min(1e-12)).reshape(1, -1, g).expand(out, -1, -1).reshape(-1, g) + 1e-6
    books, codes, resid = [], [], v
    for _ in range(m):  # residual k-means
        c = _kmeans(resid, size, spec.kmeans_iters, gen)
        a = _nearest(resid, c)
        books.append(c)
        codes.append(a)
        resid = resid - c[a]
    codebooks = torch.stack(books)
    code = torch.stack(codes, 1)
    code = beam_search(v, d, codebooks, code, spec.beam)
    error_start = output_error(w, dequantize(code.reshape(out, -1, m), codebooks, scales), h)
    for r in range(spec.rounds):
        codebooks, scales = _tune(w, h, code.reshape(out, -1, m), codebooks, scales, spec.tune_steps)
        if r < spec.rounds - 1:
            v = (w / scales).reshape(-1, g)
            code = beam_search(v, d, codebooks, code, spec.beam)
    codes_out = code.reshape(out, -1, m)
    err = output_error(w, dequantize(codes_out, codebooks, scales), h)
    return LayerFit(codes_out.to(code_dtype(spec.bits)), codebooks.contiguous(), scales.contiguous(), error_start, err)


def _tune(w: Any, h: Any, codes: Any, codebooks: Any, scales: Any, steps: int) -> tuple[Any, Any]:
    """Adam on codebooks and scales (codes fixed) minimising the relative output error; the best iterate is kept."""
    import torch

    if steps <= 0:
        return codebooks, scales
    cb = codebooks.clone().requires_grad_(True)
    sc = scales.clone().requires_grad_(True)
    opt = torch.optim.Adam([cb, sc], lr=3e-3)
    den = ((w @ h) * w).sum().clamp_min(1e-30)
    best = (float("inf"), codebooks, scales)
    last_check = float("inf")
    for step in range(steps + 1):
        dw = w - dequantize(codes, cb, sc)
        loss = ((dw @ h) * dw).sum() / den
        value = float(loss.detach())
        if value < best[0]:
            best = (value, cb.detach().clone(), sc.detach().clone())
        if step % 10 == 0:  # converged: under 0.5 % better than ten steps before
            if best[0] > 0.995 * last_check:
                break
            last_check = best[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return best[1], best[2]


# --- the transformer -----------------------------------------------------------------------------------------------

class InputGrams:
    """Forward pre-hooks on ``layers`` summing ``X^T X`` of each layer's inputs (float64, on the CPU); :meth:`grams`
    divides by the rows seen."""

    def __init__(self, layers: dict[str, Any]) -> None:
        self.sums: dict[str, Any] = {}
        self.rows: dict[str, int] = {}
        self.handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in layers.items()]

    def _hook(self, name: str) -> Any:
        def fn(_m: Any, args: tuple[Any, ...]) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double().cpu()
            s = x.T @ x
            self.sums[name] = s if name not in self.sums else self.sums[name] + s
            self.rows[name] = self.rows.get(name, 0) + x.shape[0]
        return fn

    def close(self) -> None:
        for h in self.handles:
            h.remove()

    def grams(self) -> dict[str, Any]:
        return {n: (s / max(self.rows[n], 1)).float() for n, s in self.sums.items()}


def _set_module(root: Any, name: str, module: Any) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def quantize(transformer: Any, spec: VQSpec, calibrate: Callable[[], None],
             progress: Callable[[str, int, int], None] | None = None) -> dict[str, dict[str, float]]:
    """Replace the block Linear layers of ``transformer`` by codebook layers, block by block (each block's inputs
    recorded by ``calibrate``, a run of ``transformer`` over calibration inputs, with the blocks before it already
    quantized). Returns per layer the relative output errors at the start and the end of the fit."""
    import torch

    spec.check()
    layers = pruned_layers(transformer)
    check_layers(layers, spec)
    cls = vq_linear_class()
    report: dict[str, dict[str, float]] = {}
    groups = by_block(layers)
    done = 0
    for group in groups:
        rec = InputGrams(group)
        try:
            calibrate()
        finally:
            rec.close()
        grams = rec.grams()
        for name, layer in group.items():
            if name not in grams:
                raise HpedgeError(f"internal: the calibration run never reached {name}")
            fit = fit_layer(layer.weight, grams[name], spec)
            dt, dev = layer.weight.dtype, layer.weight.device
            bias = layer.bias.detach().clone() if layer.bias is not None else None
            with torch.no_grad():
                _set_module(transformer, name, cls(fit.codes.to(dev), fit.codebooks.to(dev, dt), fit.scales.to(dev, dt),
                                                   bias))
            report[name] = {"error_start": round(fit.error_start, 6), "error": round(fit.error, 6)}
            done += 1
            if progress:
                progress(f"vector quantization {spec.name}", done, len(layers))
    return report


def vq_layers(module: Any) -> dict[str, Any]:
    return {n: m for n, m in module.named_modules() if is_vq(m)}


def densify(module: Any) -> None:
    """Replace every codebook layer of ``module`` by a ``torch.nn.Linear`` of its dequantized weight (in place)."""
    for name, layer in list(vq_layers(module).items()):
        _set_module(module, name, layer.dense())


def tensors(module: Any) -> dict[str, Any]:
    """The codes (bit-packed, :func:`pack`), codebooks and scales of every codebook layer by ``NAME.codes`` /
    ``.codebooks`` / ``.scales``."""
    out: dict[str, Any] = {}
    for name, layer in vq_layers(module).items():
        out[f"{name}.codes"] = pack(layer.codes.detach().cpu(), _code_bits(layer))
        out[f"{name}.codebooks"] = layer.codebooks.detach().cpu().contiguous()
        out[f"{name}.scales"] = layer.scales.detach().cpu().contiguous()
    return out


def bits_per_weight(module: Any) -> dict[str, Any]:
    """Bits per quantized weight: the codes alone and with the codebooks and scales (as stored)."""
    n = code = total = 0
    for layer in vq_layers(module).values():
        n += layer.out_features * layer.in_features
        code += layer.codes.numel() * _code_bits(layer)
        total += layer.codes.numel() * _code_bits(layer) + 8 * (
            layer.codebooks.numel() * layer.codebooks.element_size() + layer.scales.numel() * layer.scales.element_size())
    return {"weights": n, "codes": code / max(n, 1), "total": total / max(n, 1)}


def _code_bits(layer: Any) -> int:
    """Bits a code takes in the file (codes are bit-packed: B bits each)."""
    return int(layer.codebooks.shape[1]).bit_length() - 1


def save(module: Any, spec: VQSpec, folder: Path, name: str | None = None) -> Path:
    """``folder/vq/transformer.safetensors`` (or ``folder/NAME``), atomically: every codebook layer's tensors; the
    spec in the metadata."""
    from safetensors.torch import save_file

    from hpedge.io import atomic_file

    path = folder / (name or FILE)
    path.parent.mkdir(parents=True, exist_ok=True)
    layers = vq_layers(module)
    meta = {"format": FORMAT, "spec": json.dumps(spec.to_dict()),
            "code_shapes": json.dumps({n: list(m.codes.shape) for n, m in sorted(layers.items())})}
    with atomic_file(path) as tmp:
        save_file(tensors(module), str(tmp), metadata=meta)
    return path


def read(path: Path) -> tuple[VQSpec, dict[str, Any]]:
    """The spec and tensors (codes unpacked) of a saved VQ file."""
    d, t = read_file(path)
    return VQSpec(**{k: d[k] for k in ("codebooks", "bits", "group", "beam", "rounds", "tune_steps", "kmeans_iters",
                                       "seed")}), t


def load_quantized(transformer: Any, path: Path) -> VQSpec:
    """Put the codebook layers of a saved VQ file back into ``transformer`` (the dense one ``from_pretrained(OUT)``
    loads; its block Linear layers are replaced, their biases kept). Returns the spec."""
    spec, t = read(path)
    cls = vq_linear_class()
    for name in layers_of(t):
        try:
            layer = transformer.get_submodule(name)
        except AttributeError:
            raise HpedgeError(f"{path}: layer {name} is not in the transformer") from None
        dt, dev = layer.weight.dtype, layer.weight.device
        bias = layer.bias.detach().clone() if layer.bias is not None else None
        _set_module(transformer, name, cls(t[f"{name}.codes"].to(dev), t[f"{name}.codebooks"].to(dev, dt),
                                           t[f"{name}.scales"].to(dev, dt), bias))
    return spec
