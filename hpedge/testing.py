"""Test fixtures (``hpedge.testing``, not used by any command): tiny random-weight pipelines that keep every property of a real architecture except width and depth.

Built in code from the records in ``hpedge/models/configs`` (no downloads): the real scheduler config,
VAE factors and 16 latent channels (RGB, 8x), tokenizer lengths (CLIP 77, T5 512), default steps and
guidance, qk_norm, pos_embed_max_size, patch size, SD3.5 Medium's dual-attention layers (the same share
of the blocks), FLUX.1-dev's guidance embedding and the final context_pre_only SD3 block. Only the widths
and depths below are smaller. The weights are random, scaled by ``gain`` so that a prompt, the shift, the
guidance and the T5 length each visibly change the image (see tests/test_testing.py); plain
default initialisation is too quiet for a test of the sampler to fail on a wrong schedule.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

from hpedge.models.architectures import ARCHITECTURES, architecture, text_encoder, transformer_class, vae_config
from hpedge.models.loading import make_stock_loadable

NAMES = tuple(ARCHITECTURES)
# width/depth of the fixtures; every other field comes from the architecture record
TINY_SD3 = dict(num_layers=4, attention_head_dim=32, num_attention_heads=2, caption_projection_dim=64)
TINY_FLUX = dict(num_layers=2, num_single_layers=3, attention_head_dim=32, num_attention_heads=2)
TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=32)
TINY_CLIP_G = dict(TINY_CLIP, hidden_size=64, intermediate_size=128, projection_dim=64)
TINY_T5 = dict(d_model=128, d_kv=32, d_ff=128, num_layers=2, num_heads=2)
TINY_VAE = dict(block_out_channels=[8, 16, 16, 16], layers_per_block=1, norm_num_groups=8)
GAIN = 2.0
TIME_GAIN = 3.0  # extra gain on the timestep and guidance embedders: the schedule must matter
CHARS = string.ascii_lowercase + string.digits + ".,!?'-:;()"


def clip_tokenizer(model_max_length: int):  # -> transformers.CLIPTokenizer
    """A CLIP BPE tokenizer over single characters (no merges): every prompt maps to distinct ids."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for c in CHARS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def t5_tokenizer(model_max_length: int):  # -> transformers.T5TokenizerFast
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    pieces += [("▁" + c, -2.0) for c in CHARS] + [(c, -2.5) for c in CHARS]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def _tokenizer(spec: dict[str, Any]) -> Any:
    if spec["class"] == "CLIPTokenizer":
        return clip_tokenizer(spec["model_max_length"])
    return t5_tokenizer(spec["model_max_length"])


def _tiny_text_encoder(spec: dict[str, Any], tok: Any, width: dict[str, Any]) -> Any:
    spec = {**spec, **width, "vocab_size": len(tok)}
    if spec["class"].startswith("T5"):
        spec.update(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                    decoder_start_token_id=tok.pad_token_id, dropout_rate=0.0)
    else:
        spec.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    return text_encoder(spec)


def tiny_transformer_config(name: str) -> dict[str, Any]:
    a = architecture(name)
    cfg = dict(a["transformer"])
    if a["family"] == "sd3":
        real_layers = cfg["num_layers"]
        cfg.update(TINY_SD3)
        dual = cfg.get("dual_attention_layers") or []
        if dual:  # the same share of the blocks, from the first block on
            cfg["dual_attention_layers"] = list(range(max(1, round(len(dual) * cfg["num_layers"] / real_layers))))
        text_width = TINY_T5["d_model"]
        cfg.update(joint_attention_dim=text_width,
                   pooled_projection_dim=TINY_CLIP["projection_dim"] + TINY_CLIP_G["projection_dim"])
    else:
        cfg.update(TINY_FLUX)
        real = a["transformer"]["axes_dims_rope"]
        head = TINY_FLUX["attention_head_dim"]
        axes = [max(2, 2 * round(d * head / sum(real) / 2)) for d in real]
        axes[0] += head - sum(axes)
        cfg.update(axes_dims_rope=axes, joint_attention_dim=TINY_T5["d_model"],
                   pooled_projection_dim=TINY_CLIP["hidden_size"])
    return cfg


def real_width_transformer_config(name: str, num_layers: int | None = None,
                                  num_single_layers: int | None = None) -> dict[str, Any]:
    """The transformer of architecture ``name`` at its real width (heads x head size), with ``num_layers``
    (and FLUX's ``num_single_layers``) blocks, default: the real depth. Its text and pooled inputs take the
    fixture text encoders' widths (a real-width transformer beside tiny text encoders and VAE: what a
    benchmark of the transformer's size needs)."""
    a = architecture(name)
    cfg = dict(a["transformer"])
    tiny = tiny_transformer_config(name)
    cfg.update(joint_attention_dim=tiny["joint_attention_dim"], pooled_projection_dim=tiny["pooled_projection_dim"])
    if num_layers is not None:
        real = cfg["num_layers"]
        cfg["num_layers"] = num_layers
        dual = cfg.get("dual_attention_layers") or []
        if dual:  # the same share of the blocks, from the first block on
            cfg["dual_attention_layers"] = list(range(max(1, round(len(dual) * num_layers / real))))
    if num_single_layers is not None:
        cfg["num_single_layers"] = num_single_layers
    return cfg


def tiny_pipeline(name: str, seed: int = 0, gain: float = GAIN, transformer: dict[str, Any] | None = None,
                  t5: dict[str, Any] | None = None) -> Any:
    """A random-weight diffusers pipeline of architecture ``name`` at fixture width and depth; ``transformer``
    replaces the transformer's config (e.g. :func:`real_width_transformer_config`), ``t5`` updates the T5
    encoder's width and depth (the transformer's text input follows its ``d_model``)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

    a = architecture(name)
    torch.manual_seed(seed)
    parts: dict[str, Any] = {}
    for key, spec in a["tokenizers"].items():
        parts[key] = _tokenizer(spec)
    for key, spec in a["text_encoders"].items():
        tok = parts[key.replace("text_encoder", "tokenizer")]
        width = {**TINY_T5, **(t5 or {})} if spec["class"].startswith("T5") else (
            TINY_CLIP_G if spec["hidden_size"] == 1280 else TINY_CLIP)
        parts[key] = _tiny_text_encoder(spec, tok, width)
    parts["vae"] = AutoencoderKL(**vae_config({**a["vae"], **TINY_VAE}))
    tcfg = dict(transformer or tiny_transformer_config(name))
    if t5:
        tcfg["joint_attention_dim"] = int(t5.get("d_model", TINY_T5["d_model"]))
    parts["transformer"] = transformer_class(a["family"])(**tcfg)
    parts["scheduler"] = FlowMatchEulerDiscreteScheduler.from_config(
        {k: v for k, v in a["scheduler"].items() if not k.startswith("_")})
    if gain != 1.0:
        with torch.no_grad():
            for key in ("transformer", *a["text_encoders"]):
                for pname, p in parts[key].named_parameters():
                    if p.ndim >= 2 and "embed" not in pname:
                        p.mul_(gain)
                    if "timestep_embedder" in pname or "guidance_embedder" in pname:
                        p.mul_(TIME_GAIN)
    if a["family"] == "sd3":
        from diffusers import StableDiffusion3Pipeline as cls
    else:
        from diffusers import FluxPipeline as cls
    pipe = cls(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_pipeline(name: str, folder: str | Path, seed: int = 0, gain: float = GAIN,
                       transformer: dict[str, Any] | None = None) -> Path:
    """Write the fixture as a stock pipeline folder (safetensors) named after its architecture."""

    folder = Path(folder)
    tiny_pipeline(name, seed, gain, transformer).save_pretrained(folder, safe_serialization=True)
    make_stock_loadable(folder)
    return folder


# -- bugs of an exporter or quantizer inside a package's INT4 graph (not of quantization): the component-level
# implementation gate must fail each (tests/export/test_dequantized.py; benchmarks/gates.py measures them) ---------
def initializer(model: Any, name: str) -> Any:
    """An initializer's values (numpy) of an in-memory ONNX model."""
    from onnx import numpy_helper

    return numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == name))


def set_initializer(model: Any, name: str, arr: Any) -> None:
    """Replace an initializer's values, keeping its type (INT4 packed two per byte)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    init = next(i for i in model.graph.initializer if i.name == name)
    if init.data_type == TensorProto.INT4:  # ONNX's layout: two values a byte, the first in the low nibble
        u = (np.asarray(arr).reshape(-1) & 0x0F).astype(np.uint8)
        u = np.append(u, np.uint8(0)) if u.size % 2 else u
        new = helper.make_tensor(name, TensorProto.INT4, list(arr.shape), (u[0::2] | (u[1::2] << 4)).tobytes(), raw=True)
    else:
        new = numpy_helper.from_array(arr.astype(numpy_helper.to_array(init).dtype), name)
    init.CopyFrom(new)


def _first_quantized(model: Any) -> tuple[str, str]:
    node = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("_i4"))
    return node.input[0], node.input[1]


def _nibbles_swapped(model: Any) -> None:  # packing: high nibble first
    w, _ = _first_quantized(model)
    q = initializer(model, w)
    flat = q.reshape(-1).copy()
    flat[0::2], flat[1::2] = q.reshape(-1)[1::2], q.reshape(-1)[0::2]
    set_initializer(model, w, flat.reshape(q.shape))


def _channels_shifted(model: Any) -> None:  # scales read one output channel off
    import numpy as np

    _, s = _first_quantized(model)
    set_initializer(model, s, np.roll(initializer(model, s), 1, axis=1))


def _stale_scale(model: Any) -> None:  # scales of another clip ratio (x 1.1)
    _, s = _first_quantized(model)
    set_initializer(model, s, initializer(model, s) * 1.1)


def _sign_flipped(model: Any) -> None:  # a signed / unsigned slip in a few rows
    import numpy as np

    w, _ = _first_quantized(model)
    q = initializer(model, w).copy()
    q[: max(1, q.shape[0] // 16)] *= -1
    set_initializer(model, w, np.clip(q, -8, 7))


INT4_GRAPH_BUGS = {"nibbles swapped": _nibbles_swapped, "scales one channel off": _channels_shifted,
                   "scales x1.1": _stale_scale, "sign of 1/16 of the rows": _sign_flipped}


def mutated_int4_graph(package: Path, bug: str, out: Path) -> Path:
    """The package's INT4 transformer graph with ``bug`` applied to its first quantized weight, written to ``out``
    (the caller converts its int4_cpu variant)."""
    import onnx

    model = onnx.load(str(package / "transformer" / "int4" / "model.onnx"))
    INT4_GRAPH_BUGS[bug](model)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out))
    return out
