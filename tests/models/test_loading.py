"""Every pipeline folder hpedge commits or writes loads and runs with a plain stock ``from_pretrained(path)``."""

import json
from pathlib import Path

import numpy as np
import pytest

from hpedge.models.loading import ZOO_DIR, load_pipeline

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


@pytest.mark.parametrize("arch,shard", [("sd3.5-large", None), ("flux.1-dev", "200KB")])
def test_read_transformer_is_from_pretrained_without_a_memory_map(tmp_path: Path, arch: str, shard: str | None) -> None:
    """Read tensor by tensor (single file or shards with their index): the same tensors, dtypes and buffers as
    diffusers' own loading of the stored dtype, and no tensor left on the meta device."""
    import torch

    from hpedge.models.architectures import transformer_class
    from hpedge.models.loading import read_transformer, resolve
    from hpedge.testing import tiny_pipeline

    torch.manual_seed(0)
    pipe = tiny_pipeline(arch, gain=1.0)
    pipe.transformer.to(torch.bfloat16)
    pipe.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json").exists() == bool(shard)
    ref = resolve(str(tmp_path))
    got = read_transformer(ref)
    stock = transformer_class(ref.family).from_pretrained(tmp_path, subfolder="transformer", dtype=torch.bfloat16)
    a, b = got.state_dict(), stock.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in b)
    assert not any(t.is_meta for t in [*got.parameters(), *got.buffers()])


def test_text_encoders_read_without_a_memory_map_equal_from_pretrained_s(real_pipelines) -> None:
    import torch

    for name in ("sd3.5-medium", "flux.1-dev"):
        stock = load_pipeline(str(real_pipelines[name]))
        ours = load_pipeline(str(real_pipelines[name]), transformer_on_meta=True)
        assert next(ours.transformer.parameters()).device.type == "meta"
        for attr in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            a, b = getattr(stock, attr, None), getattr(ours, attr, None)
            if a is None:
                continue
            assert type(a) is type(b)
            sa, sb = a.state_dict(), b.state_dict()
            assert sa.keys() == sb.keys()
            assert all(torch.equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype for k in sa), (name, attr)
