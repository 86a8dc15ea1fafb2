"""A resolved model's modules on the meta device: shapes only, no weight read, no memory (the planners' input)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hpedge.models.architectures import architecture, build_on_meta, text_encoder, transformer_class, vae_config
from hpedge.models.families import family as family_facts


def meta_transformer(ref: Any) -> Any:
    """The transformer of a resolved model on the meta device, from its config alone (no weights read)."""
    import torch

    if ref.architecture is not None:
        return build_on_meta(ref.architecture).to("meta")
    cfg = json.loads((ref.path / "transformer" / "config.json").read_text())
    with torch.device("meta"):
        return transformer_class(ref.family).from_config(cfg)


def text_tokens(family: str, max_sequence_length: int) -> int:
    """The joint sequence's text part: SD3 concatenates CLIP's 77 tokens and T5's; FLUX uses T5's alone."""
    return family_facts(family).clip_tokens + max_sequence_length


def meta_components(ref: Any) -> dict[str, Any]:
    """Text encoders (``clip_l``, ``clip_g``, ``t5``) and the VAE of a resolved model on the meta device."""
    import transformers
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL

    out: dict[str, Any] = {}
    with init_empty_weights():
        if ref.architecture is not None:
            a = architecture(ref.architecture)
            out["vae"] = AutoencoderKL(**vae_config(a["vae"]))
            encoders = [text_encoder(spec) for spec in a["text_encoders"].values()]
        else:
            folder = Path(ref.path)
            index = json.loads((folder / "model_index.json").read_text())
            out["vae"] = AutoencoderKL.from_config(AutoencoderKL.load_config(str(folder / "vae")))
            encoders = []
            for name in sorted(k for k in index if k.startswith("text_encoder")):
                if index[name] is None or index[name][1] is None:
                    continue
                cls = getattr(transformers, index[name][1])
                encoders.append(cls(cls.config_class.from_pretrained(str(folder / name))))
    clips = [e for e in encoders if type(e).__name__.startswith("CLIP")]
    for i, e in enumerate(clips):
        out[f"clip_{i}"] = e
    t5 = [e for e in encoders if type(e).__name__.startswith("T5")]
    if t5:  # the input embedding is T5's ``shared`` table; on the meta device the tie must be made
        t5[0].encoder.embed_tokens = t5[0].shared
        out["t5"] = t5[0]
    return out


def text_encoder_held_bytes(ref: Any, drop_t5: bool = False) -> int:
    """Bytes of the text encoders as an export holds them while it encodes prompts: CLIP in float32 (4 bytes a
    parameter), T5 as its checkpoint stores it (2 bytes for the published 16-bit T5; a folder's float32 T5: 4)."""
    parts = {name: sum(p.numel() for p in m.parameters()) for name, m in meta_components(ref).items()
             if name != "vae" and not (drop_t5 and name == "t5")}
    t5_size = 2
    if "t5" in parts and ref.path is not None:
        t5_size = _stored_element_size(Path(ref.path) / family_facts(ref.family).t5_attribute) or 2
    return sum(n * (t5_size if name == "t5" else 4) for name, n in parts.items())


def _stored_element_size(folder: Path) -> int | None:
    """Bytes per value of the first floating tensor of ``folder``'s safetensors checkpoint (its header alone)."""
    import struct

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    with files[0].open("rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    sizes = {"F32": 4, "F16": 2, "BF16": 2}
    return next((sizes[e["dtype"]] for k, e in header.items() if k != "__metadata__" and e["dtype"] in sizes), None)
