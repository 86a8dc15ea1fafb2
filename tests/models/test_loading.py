"""Every pipeline folder hpedge commits or writes loads and runs with a plain stock ``from_pretrained(path)``."""

import json

import numpy as np
import pytest

from hpedge.models.loading import ZOO_DIR

from ..conftest import zoo_available


def stock_call(folder) -> np.ndarray:
    """Exactly what a diffusers user types: no dtype argument, then a pipeline call."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    cls = {"StableDiffusion3Pipeline": StableDiffusion3Pipeline, "FluxPipeline": FluxPipeline}[
        json.loads((folder / "model_index.json").read_text())["_class_name"]]
    pipe = cls.from_pretrained(folder)
    marker = json.loads((folder / "hpedge_zoo.json").read_text())
    kw = {"guidance_scale": 1.0} if cls is StableDiffusion3Pipeline else {}
    res = int(marker["resolution"])
    out = pipe("a 3 on the left", num_inference_steps=2, height=res, width=res, output_type="np",
               max_sequence_length=int(marker["max_sequence_length"]), **kw)
    return np.asarray(out.images)


@pytest.mark.parametrize("name", ["digits-sd3", "digits-flux"])
def test_zoo_pipelines_load_and_generate_with_a_plain_from_pretrained(name) -> None:
    if not zoo_available(name):
        pytest.skip(f"zoo:{name} is not in this checkout")
    img = stock_call(ZOO_DIR / name)
    assert img.ndim == 4 and np.isfinite(img).all()
