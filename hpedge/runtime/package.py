"""The package reader: an opened, verified package and its generation loop (:class:`Package`).

Needs only numpy, ``tokenizers`` and ONNX Runtime (or a built engine's library, with CuPy); torch, diffusers
and ModelOpt are not imported. The manifest and the sha256 of every file are verified before any compute.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hpedge.backends import engines, ort
from hpedge.errors import HpedgeError
from hpedge.io import atomic_dir
from hpedge.models.families import family as family_facts
from hpedge.runtime.format import read_manifest, verify_files
from hpedge.runtime.sampler import combine_text, img_ids, pack, unpack
from hpedge.runtime.schedule import initial_latents, sigmas

log = logging.getLogger("hpedge.runtime")


@dataclass
class _Tok:
    tok: Any
    length: int


class Package:
    """An opened, verified package."""

    def __init__(self, root: str | Path, variant: str = "auto", device: str = "auto", verify: bool = True,
                 stand_in: dict[str, Path] | None = None) -> None:
        """``stand_in``: variant -> a graph ONNX Runtime runs in its place (the export's parity runs NVFP4 so, as
        emulated: :func:`hpedge.export.float_quant.nvfp4_emulation`)."""
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        if verify:
            verify_files(self.root, self.manifest)
        gen = self.manifest["generation"]
        self.family: str = gen["family"]
        self.facts = family_facts(self.family)
        self.variants: dict[str, str] = {**self.manifest["components"]["transformer"]["variants"],
                                         **{k: str(Path(v).resolve()) for k, v in (stand_in or {}).items()}}
        self.engines: dict[str, Any] = self.manifest.get("engines") or {}
        if variant == "auto":
            variant = self._auto_variant(device)
        if variant == "engine":
            self._check_engines()
        elif variant not in self.variants:
            raise HpedgeError(f"package has no transformer variant {variant!r} (has: {', '.join(self.variants)}"
                              f"{', engine' if self.engines.get('status') == 'built' else ''})")
        engine_only = self.manifest.get("precision", {})
        if variant == engine_only.get("transformer") and not engine_only.get("onnxruntime", True) and variant not in (
                stand_in or {}):
            raise HpedgeError(f"the {variant} transformer runs on its engine only (ONNX Runtime has no kernels for it); "
                              "open the package with variant engine, int4 or int4_cpu")
        self.variant = variant
        self.device = device
        self._sessions: dict[str, Any] = {}
        self._runners: dict[str, Any] = {}
        self._toks: dict[str, _Tok] = {}

    def _auto_variant(self, device: str) -> str:
        if device != "cpu" and self.engines.get("status") == "built":
            if engines.can_run(self.engines).ok:
                return "engine"
        return "int4_cpu" if "int4_cpu" in self.variants and device != "cuda" else "int4"

    def _check_engines(self) -> None:
        if self.engines.get("status") != "built":
            raise HpedgeError(f"this package's engines are {self.engines.get('status', 'absent')}: "
                              f"{self.engines.get('reason', 'exported without engines')}")
        av = engines.can_run(self.engines)
        if not av.ok:
            raise HpedgeError(f"cannot run this package's {self.engines['library']} engines here: {av.reason}")

    # -- parts -----------------------------------------------------------------
    def _run(self, component: str, onnx_rel: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """One component on its engine (variant "engine") or on ONNX Runtime."""
        if self.variant == "engine":
            if component not in self._runners:
                    self._runners[component] = engines.open_runner(self.root, self.engines, component)
            runner = self._runners[component]
            out = runner.run({k: v for k, v in feeds.items() if k in runner.inputs})
            runner.save_cache()
            return out  # type: ignore[no-any-return]
        return ort.run(self._session(onnx_rel), feeds)  # type: ignore[no-any-return]

    def _session(self, rel: str) -> Any:
        if rel not in self._sessions:
            # the VAE decoder runs once per image, with the largest intermediates (attention over every latent
            # pixel): its memory goes back after each run instead of staying in an arena
            vae = rel == self._file(self.manifest["components"]["vae_decoder"])
            self._sessions[rel] = ort.session(self.root / rel, self.device, arena=not vae)
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
        :class:`hpedge.export.encoders.TextEncoders`; a dropped T5 is zeros, as in diffusers)."""
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
        if not self.facts.position_ids:
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
        return str(g.get("kind", self.facts.default_guidance_kind))

    @property
    def default_guidance(self) -> float:
        return float((self.manifest["generation"].get("guidance") or {}).get("default", 1.0))

    def transformer(self, latents: np.ndarray, sigma: np.ndarray, pe: np.ndarray, pooled: np.ndarray,
                    guidance: float | None = None) -> np.ndarray:
        """Velocity for unpacked latents (B, C, h, w) at noise levels ``sigma`` (B,)."""
        h, w = latents.shape[2:]
        feeds = self.transformer_feeds(latents, sigma, pe, pooled, guidance)
        out = self._run("transformer", self.variants.get(self.variant, ""), feeds)[0]
        return unpack(out, h, w) if self.facts.latent_packing > 1 else out

    def run_graph(self, component: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """One component's graph (``transformer`` in this package's variant, or ``vae_decoder``) on exactly the
        ``feeds`` given that it takes: no sampling code of the runtime's around it (the implementation gate's
        reference drives the graphs from stock diffusers: :mod:`hpedge.export.driver`)."""
        if component == "transformer":
            rel = self.variants.get(self.variant, "")
        elif component == "vae_decoder":
            rel = self._file(self.manifest["components"]["vae_decoder"])
        else:
            raise HpedgeError(f"run_graph runs the transformer or the vae_decoder, not {component!r}")
        if self.variant == "engine":
            return self._run(component, rel, feeds)
        names = ort.input_names(self._session(rel))
        missing = [n for n in names if n not in feeds]
        if missing:
            raise HpedgeError(f"the {component} graph needs {', '.join(missing)}")
        return self._run(component, rel, {n: np.ascontiguousarray(feeds[n], np.float32) for n in names})

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
        h = gen.get("height", gen["resolution"]) if height is None else height
        w = gen.get("width", gen["resolution"]) if width is None else width
        lo, _, hi = gen.get("resolution_range", [h, h, h])
        m = gen.get("size_multiple", gen["vae_scale_factor"] * 2)
        for name, v in (("height", h), ("width", w)):
            if v % m or not lo <= v <= hi:
                raise HpedgeError(f"{name} {v} is outside what this package covers: multiples of {m} from {lo} to {hi}")
        return int(h), int(w)

    def initial_latents(self, n: int, seed: int, resolution: int | None = None, height: int | None = None,
                        width: int | None = None) -> np.ndarray:
        gen = self.manifest["generation"]
        h, w = self.size(resolution if height is None else height, resolution if width is None else width)
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
        steps = gen["default_steps"] if steps is None else steps  # 0 is refused by sigmas(), not replaced
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
