"""The real architectures hpedge knows, as data: ``hpedge/models/configs/NAME.json``.

Each file holds what a checkpoint's own config files publish (transformer, scheduler, VAE, text
encoders, tokenizer lengths) plus the pipeline's recommended sampling defaults. The same data builds
the meta-device models of ``info`` / ``plan`` (exact parameter counts, no memory) and the tiny
random-weight fixtures of ``hpedge.testing``, so the two cannot drift apart.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
# structural transformer fields that identify an architecture (width and depth excluded)
STRUCTURE = ("patch_size", "in_channels", "qk_norm", "pos_embed_max_size", "guidance_embeds")


@lru_cache(maxsize=None)
def _load_all() -> dict[str, dict[str, Any]]:
    out = {}
    for f in sorted(CONFIG_DIR.glob("*.json")):
        data = json.loads(f.read_text())
        out[data["name"]] = data
    return out


def architecture(name: str) -> dict[str, Any]:
    """The full record of architecture ``name`` (a copy: callers may modify it)."""
    return json.loads(json.dumps(_load_all()[name]))


ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    name: (a["family"], a["transformer"]) for name, a in _load_all().items()
}


def match(family: str, transformer_config: dict[str, Any], hint: str = "") -> str | None:
    """The architecture whose structure ``transformer_config`` has (width and depth may differ).

    SD3.5 Large and Large Turbo share one structure; ``hint`` (e.g. the folder name) picks the
    candidate whose name it contains, otherwise the first (the non-distilled) one is taken.
    """
    def dual(cfg: dict[str, Any]) -> bool:
        return bool(cfg.get("dual_attention_layers") or ())

    found = []
    for name, a in _load_all().items():
        t = a["transformer"]
        if a["family"] != family or dual(t) != dual(transformer_config):
            continue
        if all(t.get(k) == transformer_config.get(k) for k in STRUCTURE if k in t):
            found.append(name)
    if not found:
        return None
    hint = hint.lower()
    named = [n for n in found if n.split("-")[-1] in hint and n.count("-") > 1]
    return (named or sorted(found, key=len))[0]


def build_on_meta(name: str):  # -> torch.nn.Module on the meta device
    """The transformer of architecture ``name`` with empty (meta) weights."""
    from accelerate import init_empty_weights

    family, config = ARCHITECTURES[name]
    with init_empty_weights():
        return transformer_class(family).from_config(config)


def transformer_class(family: str):
    if family == "sd3":
        from diffusers import SD3Transformer2DModel

        return SD3Transformer2DModel
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel


def text_encoder(spec: dict[str, Any]):  # -> a transformers model
    """A randomly initialised text encoder from one ``text_encoders`` entry of an architecture record."""
    import transformers

    spec = dict(spec)
    cls = getattr(transformers, spec.pop("class"))
    if cls.__name__.startswith("T5"):
        return cls(transformers.T5Config(**spec))
    return cls(transformers.CLIPTextConfig(**spec))


def vae_config(spec: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()}


def pipeline_extras_on_meta(name: str) -> dict[str, int]:
    """Parameter counts of the other pipeline components (text encoders, VAE) of architecture ``name``,
    built on the meta device from the same records, so the counts are exact and cost no memory."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL

    a = architecture(name)
    labels = {"CLIPTextModelWithProjection": "clip", "CLIPTextModel": "clip", "T5EncoderModel": "t5_xxl"}

    def n(m: object) -> int:
        # T5's input embedding is tied to ``shared``; on the meta device the tie is not made, so skip it
        return sum(p.numel() for k, p in m.named_parameters() if k != "encoder.embed_tokens.weight")  # type: ignore[attr-defined]

    out: dict[str, int] = {}
    with init_empty_weights():
        out["vae"] = n(AutoencoderKL(**vae_config(a["vae"])))
        for spec in a["text_encoders"].values():
            label = labels[spec["class"]]
            if label == "clip":
                label = "clip_l" if spec["hidden_size"] == 768 else "clip_g"
            out[label] = n(text_encoder(spec))
    return out
