"""Optional learned scorers for the contribution analysis, from weights already on the user's disk.

Nothing is downloaded: a scorer is named with the folder that holds its weights (``clip=DIR``, a
transformers ``CLIPModel`` folder with its tokenizer and image-processor files, safetensors only). The
reference scores its analysis with HPSv2 (an OpenCLIP ViT-H/14 fine-tune); HPSv2 and ImageReward need
their own packages, which hpedge does not depend on, so they are refused with that reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from hpedge.errors import HpedgeError
from hpedge.models.loading import _quiet_loaders

KNOWN = ("clip", "hpsv2", "imagereward")


class ClipScorer:
    """CLIP score: 100 x cosine(image embedding, text embedding), per image."""

    name = "clip"

    def __init__(self, folder: Path) -> None:
        from transformers import CLIPModel, CLIPProcessor

        _quiet_loaders()
        if not folder.is_dir():
            raise HpedgeError(f"scorer folder {folder} not found (scorers are never downloaded)")
        try:
            self.model = CLIPModel.from_pretrained(folder, local_files_only=True, use_safetensors=True).eval()
            self.processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as e:
            raise HpedgeError(f"could not load the CLIP scorer from {folder}: {str(e).splitlines()[0]}") from None
        self.folder = folder

    def score(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        import torch

        imgs = [(np.clip(im, 0, 1) * 255).round().astype(np.uint8) for im in images]
        imgs = [np.repeat(im, 3, axis=-1) if im.shape[-1] == 1 else im for im in imgs]
        with torch.no_grad():
            inputs = self.processor(text=prompts, images=imgs, return_tensors="pt", padding="max_length",
                                    truncation=True)
            out = self.model(**inputs)
            a = torch.nn.functional.normalize(out.image_embeds, dim=-1)
            b = torch.nn.functional.normalize(out.text_embeds, dim=-1)
        return (100 * (a * b).sum(-1)).numpy().astype(np.float64)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "folder": str(self.folder)}


def load_scorer(spec: str) -> ClipScorer:
    """``clip=DIR``; one line for anything else."""
    name, _, folder = spec.partition("=")
    if name not in KNOWN:
        raise HpedgeError(f"unknown scorer {name!r} (known: {', '.join(KNOWN)}; give it as NAME=FOLDER)")
    if name != "clip":
        raise HpedgeError(f"the {name} scorer needs its own package ({'hpsv2' if name == 'hpsv2' else 'image-reward'}), "
                          "which hpedge does not install; use clip=FOLDER with a local CLIP model")
    if not folder:
        raise HpedgeError("give the scorer's weights folder: --scorer clip=FOLDER (nothing is downloaded)")
    return ClipScorer(Path(folder))
