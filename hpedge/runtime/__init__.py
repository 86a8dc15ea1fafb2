"""Run an hpedge package: tokenize -> text encoder -> denoising loop -> VAE decode.

Needs only numpy, ``tokenizers`` and ONNX Runtime; a package whose engines were built runs them instead
(``variant="engine"``, chosen by ``auto`` on a GPU that can run them: an RTX card for TensorRT-RTX engines,
the board for Jetson ones), with CuPy for device memory. torch, diffusers and ModelOpt are not imported. The package's manifest and the
sha256 of every file are verified before any compute.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hpedge.errors import HpedgeError

SCHEMA = "hpedge-package/2"
log = logging.getLogger("hpedge.runtime")
MANIFEST = "manifest.json"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def initial_latents(n: int, seed: int, channels: int, height: int, width: int) -> np.ndarray:
    """Seeded N(0, 1) initial noise (n, channels, height, width) in latent pixels, as every hpedge runtime draws it."""
    return np.random.default_rng(seed).standard_normal((n, channels, height, width)).astype(np.float32)


def read_manifest(root: Path) -> dict[str, Any]:
    mf = root / MANIFEST
    if not root.is_dir():
        raise HpedgeError(f"package {root} not found (expected a folder with {MANIFEST})", HpedgeError.USAGE)
    if not mf.exists():
        raise HpedgeError(f"{root} is not an hpedge package: {MANIFEST} is missing", HpedgeError.CHECK_FAILED)
    try:
        data = json.loads(mf.read_text())
    except json.JSONDecodeError as e:
        raise HpedgeError(f"{mf} is corrupt: {e}", HpedgeError.CHECK_FAILED) from None
    if isinstance(data, dict) and data.get("schema") == "hpedge-package/1":
        raise HpedgeError(f"{root} was written by an older hpedge (hpedge-package/1: one fp32 text graph); export it again",
                          HpedgeError.CHECK_FAILED)
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise HpedgeError(f"{mf}: unknown package schema {data.get('schema') if isinstance(data, dict) else None!r}",
                          HpedgeError.CHECK_FAILED)
    return data


def verify_files(root: Path, manifest: dict[str, Any]) -> None:
    """Every file listed must exist with its sha256; the manifest's own digest must match its content."""
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise HpedgeError(f"{root / MANIFEST} lists no files", HpedgeError.CHECK_FAILED)
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    if manifest.get("manifest_sha256") != digest:
        raise HpedgeError(f"{root / MANIFEST} was modified after packaging (digest mismatch)", HpedgeError.CHECK_FAILED)
    for rel, expected in sorted(files.items()):
        p = root / rel
        if not p.is_file():
            raise HpedgeError(f"package file {rel} is missing", HpedgeError.CHECK_FAILED)
        if sha256(p) != expected:
            raise HpedgeError(f"package file {rel} does not match its sha256 (tampered or corrupt)", HpedgeError.CHECK_FAILED)


def _shift(cfg: dict[str, Any], s: np.ndarray, mu: float | None) -> np.ndarray:
    """The scheduler's static or resolution-dependent (dynamic) shift of sigmas ``s``."""
    if cfg.get("use_dynamic_shifting"):
        if cfg.get("time_shift_type", "exponential") == "exponential":
            return math.exp(mu) / (math.exp(mu) + (1 / s - 1))  # type: ignore[arg-type, no-any-return]
        return mu / (mu + (1 / s - 1))  # type: ignore[no-any-return, operator]
    shift = float(cfg.get("shift", 1.0))
    return shift * s / (1 + (shift - 1) * s)  # type: ignore[no-any-return]


def calculate_shift(cfg: dict[str, Any], image_seq_len: int, default_max_shift: float = 1.15) -> float:
    """mu of dynamic shifting, linear in the image token count (the pipelines' ``calculate_shift``)."""
    base_len, max_len = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
    base_shift, max_shift = cfg.get("base_shift", 0.5), cfg.get("max_shift", default_max_shift)
    m = (max_shift - base_shift) / (max_len - base_len)
    return float(image_seq_len * m + base_shift - m * base_len)


def sigmas(family: str, steps: int, scheduler: dict[str, Any] | None = None, image_seq_len: int = 0) -> np.ndarray:
    """The noise levels of the stock pipeline's flow-matching Euler schedule, final 0 appended (float32).

    The same arithmetic as diffusers' ``FlowMatchEulerDiscreteScheduler.set_timesteps`` as the
    pipelines call it: SD3 spaces timesteps between the scheduler's own (shifted) extremes and shifts
    again; FLUX passes ``linspace(1, 1/steps)`` and a ``mu`` from the image token count. ``scheduler`` is
    the package's scheduler config (shift 1, no dynamic shifting when omitted).
    """
    if steps < 1:
        raise HpedgeError("--steps must be at least 1")
    cfg = scheduler or {}
    n_train = int(cfg.get("num_train_timesteps", 1000))
    dynamic = bool(cfg.get("use_dynamic_shifting"))
    mu = None
    if family == "sd3":
        train = np.linspace(1, n_train, n_train, dtype=np.float32)[::-1] / np.float32(n_train)
        if not dynamic:
            train = _shift(cfg, train, None).astype(np.float32)
        else:
            mu = calculate_shift(cfg, image_seq_len, default_max_shift=1.16)
        t = np.linspace(float(train[0]) * n_train, float(train[-1]) * n_train, steps)
        s = t / n_train
    else:
        s = np.linspace(1.0, 1 / steps, steps).astype(np.float32)
        mu = calculate_shift(cfg, image_seq_len)
    s = _shift(cfg, s, mu)
    if cfg.get("shift_terminal"):
        one_minus = 1 - s
        s = 1 - one_minus / (one_minus[-1] / (1 - cfg["shift_terminal"]))
    return np.append(np.asarray(s, dtype=np.float32), np.float32(0.0))


def combine_text(family: str, outs: dict[str, np.ndarray], t5_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(prompt_embeds, pooled) from the encoders' outputs, as ``encode_prompt`` builds them; ``t5_shape``
    (tokens, width) gives the zeros that stand for a dropped T5."""
    clip = outs.get("clip_embeds")
    batch = next(iter(outs.values())).shape[0]
    t5 = outs["t5_embeds"] if "t5_embeds" in outs else np.zeros((batch, *t5_shape), np.float32)
    if family == "sd3":
        if clip is None:
            raise HpedgeError("the package's SD3 text encoders give no clip_embeds (manifest components.text)",
                              HpedgeError.CHECK_FAILED)
        clip = np.pad(clip, ((0, 0), (0, 0), (0, t5.shape[-1] - clip.shape[-1])))
        return np.concatenate([clip, t5], axis=1).astype(np.float32), outs["pooled"]
    return t5, outs["pooled"]


def pack(x: np.ndarray) -> np.ndarray:
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x: np.ndarray, h: int, w: int) -> np.ndarray:
    b, n, c4 = x.shape
    return x.reshape(b, h // 2, w // 2, c4 // 4, 2, 2).transpose(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


def img_ids(h: int, w: int) -> np.ndarray:
    ids = np.zeros((h // 2, w // 2, 3), np.float32)
    ids[..., 1] = np.arange(h // 2)[:, None]
    ids[..., 2] = np.arange(w // 2)[None, :]
    return ids.reshape(-1, 3)


@dataclass
class _Tok:
    tok: Any
    length: int


class Package:
    """An opened, verified package."""

    def __init__(self, root: str | Path, variant: str = "auto", device: str = "auto", verify: bool = True) -> None:
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        if verify:
            verify_files(self.root, self.manifest)
        gen = self.manifest["generation"]
        self.family: str = gen["family"]
        self.variants: dict[str, str] = self.manifest["components"]["transformer"]["variants"]
        self.engines: dict[str, Any] = self.manifest.get("engines") or {}
        if variant == "auto":
            variant = self._auto_variant(device)
        if variant == "engine":
            self._check_engines()
        elif variant not in self.variants:
            raise HpedgeError(f"package has no transformer variant {variant!r} (has: {', '.join(self.variants)}"
                              f"{', engine' if self.engines.get('status') == 'built' else ''})")
        self.variant = variant
        self.device = device
        self._sessions: dict[str, Any] = {}
        self._runners: dict[str, Any] = {}
        self._toks: dict[str, _Tok] = {}

    def _auto_variant(self, device: str) -> str:
        if device != "cpu" and self.engines.get("status") == "built":
            from hpedge.backends import engines

            if engines.can_run(self.engines).ok:
                return "engine"
        return "int4_cpu" if "int4_cpu" in self.variants and device != "cuda" else "int4"

    def _check_engines(self) -> None:
        if self.engines.get("status") != "built":
            raise HpedgeError(f"this package's engines are {self.engines.get('status', 'absent')}: "
                              f"{self.engines.get('reason', 'exported without engines')}")
        from hpedge.backends import engines

        av = engines.can_run(self.engines)
        if not av.ok:
            raise HpedgeError(f"cannot run this package's {self.engines['library']} engines here: {av.reason}")

    # -- parts -----------------------------------------------------------------
    def _run(self, component: str, onnx_rel: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """One component on its engine (variant "engine") or on ONNX Runtime."""
        if self.variant == "engine":
            if component not in self._runners:
                from hpedge.backends import engines

                self._runners[component] = engines.open_runner(self.root, self.engines, component)
            runner = self._runners[component]
            out = runner.run({k: v for k, v in feeds.items() if k in runner.inputs})
            runner.save_cache()
            return out  # type: ignore[no-any-return]
        from hpedge.backends import ort

        return ort.run(self._session(onnx_rel), feeds)  # type: ignore[no-any-return]

    def _session(self, rel: str) -> Any:
        if rel not in self._sessions:
            from hpedge.backends import ort

            self._sessions[rel] = ort.session(self.root / rel, self.device)
        return self._sessions[rel]

    def tokenize(self, prompts: list[str]) -> dict[str, np.ndarray]:
        from tokenizers import Tokenizer

        out = {}
        for name, spec in self.manifest["generation"]["tokenizers"].items():
            if name not in self._toks:
                tok = Tokenizer.from_file(str(self.root / spec["file"]))
                tok.enable_truncation(spec["length"])
                tok.enable_padding(length=spec["length"], pad_id=spec["pad_id"], pad_token=spec["pad_token"])
                self._toks[name] = _Tok(tok, spec["length"])
            enc = self._toks[name].tok.encode_batch(prompts)
            cut = [p for p, e in zip(prompts, enc) if e.overflowing]
            if cut:  # as diffusers does: say so, and go on with the truncated prompt
                log.warning("part of %d prompt(s) was truncated to the %s limit of %d tokens: %r", len(cut), name,
                            spec["length"], cut[0][:80] + ("..." if len(cut[0]) > 80 else ""))
            out[name] = np.array([e.ids for e in enc], dtype=np.int64)
        return out

    def encode(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(prompt_embeds, pooled) as the pipeline's ``encode_prompt`` returns them."""
        return self.encode_ids(self.tokenize(prompts))

    def encode_ids(self, ids: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Prompt embeddings from token ids: each text encoder, then the pipeline's combination (see
        :class:`hpedge.export.onnx_export.TextEncoders`; a dropped T5 is zeros, as in diffusers)."""
        text = self.manifest["components"]["text"]
        outs: dict[str, np.ndarray] = {}
        for name, e in text["encoders"].items():
            rel = self._file(e)
            res = self._run(f"text_{name}", rel, {k: ids[k] for k in e["inputs"]})
            outs.update(zip(e["outputs"], res))
            self._done(f"text_{name}", rel)
        return combine_text(self.family, outs, tuple(text["t5_shape"]))

    @property
    def residency(self) -> str:
        """``resident`` (every component stays loaded) or ``sequential`` (each is released after its phase),
        as the package was sized for its target (manifest ``memory``)."""
        return str((self.manifest.get("memory") or {}).get("residency", "resident"))

    def _done(self, component: str, onnx_rel: str) -> None:
        """End of a component's phase: under sequential residency its session or engine is released."""
        if self.residency != "sequential":
            return
        self._sessions.pop(onnx_rel, None)
        self._runners.pop(component, None)

    def transformer_feeds(self, latents: np.ndarray, sigma: np.ndarray, pe: np.ndarray,
                          pooled: np.ndarray, guidance: float | None = None) -> dict[str, np.ndarray]:
        """The transformer model's inputs for unpacked latents (B, C, h, w) at noise levels ``sigma`` (B,);
        ``guidance`` is the distilled guidance scale of a FLUX.1-dev package (its default if None)."""
        t = (sigma * np.float32(self.manifest["generation"]["timestep_scale"])).astype(np.float32)
        b, c, h, w = latents.shape
        if self.family == "sd3":
            return {"hidden_states": latents, "encoder_hidden_states": pe, "pooled_projections": pooled, "timestep": t}
        feeds = {"hidden_states": pack(latents), "encoder_hidden_states": pe, "pooled_projections": pooled,
                 "timestep": t, "img_ids": img_ids(h, w), "txt_ids": np.zeros((pe.shape[1], 3), np.float32)}
        if self.guidance_kind == "distilled":
            g = self.default_guidance if guidance is None else guidance
            feeds["guidance"] = np.full(b, g, np.float32)
        return feeds

    @property
    def guidance_kind(self) -> str:
        g = self.manifest["generation"].get("guidance") or {}
        return str(g.get("kind", "cfg" if self.family == "sd3" else "true_cfg"))

    @property
    def default_guidance(self) -> float:
        return float((self.manifest["generation"].get("guidance") or {}).get("default", 1.0))

    def transformer(self, latents: np.ndarray, sigma: np.ndarray, pe: np.ndarray, pooled: np.ndarray,
                    guidance: float | None = None) -> np.ndarray:
        """Velocity for unpacked latents (B, C, h, w) at noise levels ``sigma`` (B,)."""
        h, w = latents.shape[2:]
        feeds = self.transformer_feeds(latents, sigma, pe, pooled, guidance)
        out = self._run("transformer", self.variants.get(self.variant, ""), feeds)[0]
        return out if self.family == "sd3" else unpack(out, h, w)

    def release(self) -> None:
        """Close every open session and engine (the next call opens them again)."""
        self._sessions.clear()
        self._runners.clear()

    def save_step(self, out: str | Path, prompt: str, seed: int = 0, sigma: float = 1.0,
                  overwrite: bool = False) -> Path:
        """Write one transformer step's inputs and this runtime's output for the C++ samples.

        ``out/step.txt`` names the model (relative to the package) and every tensor as
        ``input|output NAME float32 NDIM DIMS... FILE``; the tensors are raw little-endian float32.
        """
        from hpedge.backends import ort
        from hpedge.io import atomic_dir

        if self.variant == "engine":
            raise HpedgeError("save_step writes an ONNX transformer step; open the package with variant int4, int4_cpu or fp32")
        pe, pooled = self.encode([prompt])
        feeds = self.transformer_feeds(self.initial_latents(1, seed), np.full(1, sigma, np.float32), pe, pooled)
        rel = self.variants[self.variant]
        sess = self._session(rel)
        feeds = {k: np.ascontiguousarray(v, np.float32) for k, v in feeds.items() if k in ort.input_names(sess)}
        outputs = dict(zip(ort.output_names(sess), ort.run(sess, feeds)))
        lines = [f"# hpedge transformer step: prompt {prompt!r}, seed {seed}, sigma {sigma}, variant {self.variant}",
                 f"model {rel}"]
        with atomic_dir(out, overwrite=overwrite) as tmp:
            for kind, tensors in (("input", feeds), ("output", outputs)):
                for i, (name, arr) in enumerate(tensors.items()):
                    arr = np.ascontiguousarray(arr, dtype="<f4")
                    fname = f"{kind}_{i}.bin"
                    arr.tofile(tmp / fname)
                    lines.append(f"{kind} {name} float32 {arr.ndim} {' '.join(map(str, arr.shape))} {fname}")
            (tmp / "step.txt").write_text("\n".join(lines) + "\n")
        return Path(out)

    def _file(self, component: dict[str, Any]) -> str:
        """A component's graph: the shipped one, or its fp32 reference graph under the fp32 variant."""
        return str(component["fp32_file"] if self.variant == "fp32" and "fp32_file" in component else component["file"])

    def decode(self, latents: np.ndarray) -> np.ndarray:
        rel = self._file(self.manifest["components"]["vae_decoder"])
        img = self._run("vae_decoder", rel, {"latents": latents})[0]
        self._done("vae_decoder", rel)
        return img

    # -- generation --------------------------------------------------------------
    def size(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """(height, width) in pixels: the package's default unless given; checked against what it covers."""
        gen = self.manifest["generation"]
        h = height or gen.get("height", gen["resolution"])
        w = width or gen.get("width", gen["resolution"])
        lo, _, hi = gen.get("resolution_range", [h, h, h])
        m = gen.get("size_multiple", gen["vae_scale_factor"] * 2)
        for name, v in (("height", h), ("width", w)):
            if v % m or not lo <= v <= hi:
                raise HpedgeError(f"{name} {v} is outside what this package covers: multiples of {m} from {lo} to {hi}")
        return int(h), int(w)

    def initial_latents(self, n: int, seed: int, resolution: int | None = None, height: int | None = None,
                        width: int | None = None) -> np.ndarray:
        gen = self.manifest["generation"]
        h, w = self.size(height or resolution, width or resolution)
        vs = gen["vae_scale_factor"]
        return initial_latents(n, seed, gen["latent_channels"], h // vs, w // vs)

    def generate(self, prompts: list[str], seed: int = 0, steps: int | None = None, latents: np.ndarray | None = None,
                 guidance: float | None = None, negative_prompt: str | list[str] | None = None,
                 height: int | None = None, width: int | None = None) -> np.ndarray:
        """Images in [0, 1], shape (B, H, W) for one channel or (B, H, W, 3).

        The stock pipeline's sampling: the package's scheduler config (shift, dynamic shifting by image
        token count), classifier-free guidance over a [negative, positive] batch for CFG models (SD3;
        guidance > 1), the distilled guidance input for FLUX.1-dev, none for FLUX.1-schnell.
        """
        if not prompts:
            raise HpedgeError("no prompt given")
        gen = self.manifest["generation"]
        steps = steps or gen["default_steps"]
        g = self.default_guidance if guidance is None else float(guidance)
        kind = self.guidance_kind
        n = len(prompts)
        negs = [negative_prompt] * n if isinstance(negative_prompt, str) else negative_prompt
        if negs is not None and len(negs) != n:
            raise HpedgeError(f"{len(negs)} negative prompts for {n} prompts")
        if kind in ("distilled", "none") and negs is not None:
            raise HpedgeError("this package samples with " + ("distilled guidance" if kind == "distilled" else "no guidance")
                              + ": it takes no negative prompt")
        if kind == "none" and guidance not in (None, 0.0, 1.0):
            raise HpedgeError("this package samples without guidance (FLUX.1-schnell): --guidance does not apply")
        cfg = kind in ("cfg", "true_cfg") and g > 1
        if latents is None:
            x = self.initial_latents(n, seed, height=height, width=width)
        else:
            x = latents.astype(np.float32)
            vs = gen["vae_scale_factor"]
            self.size(x.shape[2] * vs, x.shape[3] * vs)
        if cfg:
            pe, pooled = self.encode(list(negs or [""] * n) + list(prompts))  # [negative, positive], as diffusers
        else:
            pe, pooled = self.encode(prompts)
        h, w = x.shape[2:]
        sig = sigmas(self.family, steps, gen.get("scheduler"), (h // 2) * (w // 2))
        for i in range(steps):
            xin = np.concatenate([x, x]) if cfg else x
            v = self.transformer(xin, np.full(xin.shape[0], sig[i], np.float32), pe, pooled, g)
            if cfg:
                v = v[:n] + np.float32(g) * (v[n:] - v[:n])
            x = x + (sig[i + 1] - sig[i]) * v
        self._done("transformer", self.variants.get(self.variant, ""))
        img = self.decode(x)
        return img[:, 0] if img.shape[1] == 1 else img.transpose(0, 2, 3, 1)


def open_package(path: str | Path, **kw: Any) -> Package:
    return Package(path, **kw)
