"""Resolving MODEL arguments: a pipeline folder, a ``zoo:`` name, or an architecture name.

Only safetensors weights are read (``use_safetensors=True``), pipelines are instantiated through
their known diffusers class (never ``trust_remote_code``), and nothing is downloaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpedge.errors import HpedgeError
from hpedge.models.architectures import ARCHITECTURES, build_on_meta, transformer_class
from hpedge.models.denoise import family_of
from hpedge.models.families import family as family_facts

ZOO_DIR = Path(__file__).resolve().parent.parent / "zoo" / "models"
ZOO = {"digits-sd3": "digits-sd3", "digits-flux": "digits-flux"}
PIPELINE_CLASSES = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}


@dataclass(frozen=True)
class ModelRef:
    spec: str
    path: Path | None  # pipeline folder, None for an architecture name
    family: str
    architecture: str | None = None


def resolve(spec: str, allow_architecture: bool = False) -> ModelRef:
    if spec.startswith("zoo:"):
        name = spec[4:]
        if name not in ZOO:
            raise HpedgeError(f"unknown zoo model {name!r}; available: {', '.join('zoo:' + z for z in ZOO)}")
        path = ZOO_DIR / ZOO[name]
        if not (path / "model_index.json").exists():
            raise HpedgeError(f"zoo model {spec} is missing from this install ({path}); run python -m hpedge.zoo.train")
        return ModelRef(spec, path, _family_of_folder(path))
    if spec in ARCHITECTURES:
        if not allow_architecture:
            raise HpedgeError(
                f"{spec!r} is an architecture name without weights; this command needs a pipeline folder or a zoo: model"
            )
        return ModelRef(spec, None, ARCHITECTURES[spec][0], spec)
    path = Path(spec)
    if not path.exists():
        hint = f" (architectures: {', '.join(ARCHITECTURES)})" if allow_architecture else ""
        raise HpedgeError(f"model {spec!r} not found: no such folder, zoo: name or architecture{hint}")
    return ModelRef(spec, path, _family_of_folder(path))


def _family_of_folder(path: Path) -> str:
    index = path / "model_index.json"
    if not path.is_dir() or not index.exists():
        raise HpedgeError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
    try:
        cls = json.loads(index.read_text()).get("_class_name")
    except (json.JSONDecodeError, OSError) as e:
        raise HpedgeError(f"{index} is not valid JSON: {e}") from None
    if cls not in PIPELINE_CLASSES:
        raise HpedgeError(
            f"unsupported pipeline class {cls!r} in {index}; hpedge supports {', '.join(PIPELINE_CLASSES)}"
        )
    return PIPELINE_CLASSES[cls]


class _Dtypes(dict):  # mixed-precision name -> torch dtype, resolved lazily (importing hpedge must not import torch)
    def __getitem__(self, key: str) -> Any:
        import torch

        return {"no": torch.float32, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[key]


TORCH_DTYPES = _Dtypes()


def compute_device() -> Any:
    """Where analysis, the sample pool and training run: the first CUDA device unless none is present or
    ``ACCELERATE_USE_CPU`` is set (as Accelerate decides), else the CPU."""
    import os

    import torch

    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in {"1", "true", "yes"} or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def _quiet_loaders() -> None:
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def load_pipeline(ref: ModelRef | str, dtype: str = "float32", transformer_on_meta: bool = False,
                  t5_as_stored: bool = False) -> Any:
    """The pipeline in ``dtype``; with ``transformer_on_meta`` its transformer is built from its config on the meta
    device (no weights read: :func:`read_transformer` brings them as stored when they are needed) and its text
    encoders are read without a memory map (:func:`read_text_encoders`), T5 in its checkpoint's dtype with
    ``t5_as_stored``."""
    import torch

    _quiet_loaders()

    if isinstance(ref, str):
        ref = resolve(ref)
    if ref.path is None:
        raise HpedgeError(f"{ref.spec!r} is an architecture without weights")
    if ref.family == "sd3":
        from diffusers import StableDiffusion3Pipeline as cls
    else:
        from diffusers import FluxPipeline as cls
    try:
        extra = {"transformer": config_transformer(ref)} if transformer_on_meta else {}
        if transformer_on_meta:  # the text encoders read without a memory map
            t5 = (family_facts(ref.family).t5_attribute,) if t5_as_stored else ()
            extra.update(read_text_encoders(ref, getattr(torch, dtype), t5))
        pipe = cls.from_pretrained(ref.path, dtype=getattr(torch, dtype), use_safetensors=True, **extra)
    except (OSError, ValueError, EnvironmentError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HpedgeError(f"could not load pipeline {ref.path}: {first}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


SAFETENSORS_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64", "I64": "int64",
                      "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _weight_files(folder: Path, stem: str = "diffusion_pytorch_model") -> list[Path]:
    index = folder / f"{stem}.safetensors.index.json"
    if index.exists():
        return [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    single = folder / f"{stem}.safetensors"
    if not single.exists():
        raise HpedgeError(f"{folder} has no {stem}.safetensors (nor its .index.json)")
    return [single]


TEXT_ENCODER_ATTRS = ("text_encoder", "text_encoder_2", "text_encoder_3")


def read_text_encoders(ref: ModelRef, dtype: Any, as_stored: tuple[str, ...] = (),
                       only: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The pipeline folder's text encoders (transformers models, by ``model_index.json``), read as
    :func:`read_transformer` reads the transformer (plain reads, no memory map left behind) and cast to ``dtype``
    in place: from_pretrained's memory map of T5-XXL stayed counted beside the float32 copy (measured at T5-XXL
    width, 6 blocks: 3.5 GB of file-backed pages during the text export). Encoders named in ``as_stored`` keep
    the dtype their checkpoint stores (T5-XXL in 16 bits: 9.5 GB, not 19; compute it with
    :func:`hpedge.models.precision.t5_fp32_compute`). ``only``: these encoders alone."""
    import transformers
    from accelerate import init_empty_weights

    assert ref.path is not None
    index = json.loads((ref.path / "model_index.json").read_text())
    out = {}
    for attr in TEXT_ENCODER_ATTRS if only is None else only:
        lib, name = (index.get(attr) or [None, None])[:2]
        if lib != "transformers" or not name or not (ref.path / attr).is_dir():
            continue
        cls = getattr(transformers, name)
        folder = ref.path / attr
        try:
            config = cls.config_class.from_pretrained(folder)
            with init_empty_weights():
                model = cls(config)
            state = read_safetensors(_weight_files(folder, "model"))
            result = model.load_state_dict(state, strict=False, assign=True)
            del state
            model.tie_weights()  # T5's encoder.embed_tokens is its shared embedding, stored once
        except (OSError, ValueError, RuntimeError) as e:
            raise HpedgeError(f"could not load {attr} of {ref.path}: {str(e).splitlines()[0][:200]}") from None
        left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.device.type == "meta"]
        if result.unexpected_keys or left:
            raise HpedgeError(f"{folder}: the checkpoint does not match {name} (unexpected "
                              f"{result.unexpected_keys[:3]}, missing {left[:3]})")
        out[attr] = (model if attr in as_stored else model.to(dtype)).eval()
    return out


def read_safetensors(files: list[Path]) -> dict[str, Any]:
    """Every tensor of ``files``, read with plain file reads into memory the process owns, one tensor at a time
    (no memory map stays behind: :func:`read_transformer` says why)."""
    import ctypes
    import struct

    import torch

    out: dict[str, Any] = {}
    for f in files:
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
            base = 8 + n
            for name, e in header.items():
                if name == "__metadata__":
                    continue
                if e["dtype"] not in SAFETENSORS_DTYPES:
                    raise HpedgeError(f"{f}: tensor {name} has dtype {e['dtype']}, which hpedge does not read")
                t = torch.empty(e["shape"], dtype=getattr(torch, SAFETENSORS_DTYPES[e["dtype"]]))
                a, b = e["data_offsets"]
                if t.numel() * t.element_size() != b - a:
                    raise HpedgeError(f"{f}: tensor {name} holds {b - a} bytes, its shape and dtype say otherwise")
                fh.seek(base + a)
                if b > a and fh.readinto((ctypes.c_char * (b - a)).from_address(t.data_ptr())) != b - a:
                    raise HpedgeError(f"{f} is truncated (tensor {name})")
                out[name] = t
    return out


def config_transformer(ref: ModelRef) -> Any:
    """The transformer of pipeline folder ``ref`` from its config alone, on the meta device (buffers too)."""
    import torch

    assert ref.path is not None
    cls = transformer_class(ref.family)
    try:
        with torch.device("meta"):
            return cls.from_config(cls.load_config(ref.path / "transformer")).eval()
    except (OSError, ValueError) as e:
        raise HpedgeError(f"could not read the transformer config of {ref.path}: {str(e).splitlines()[0][:200]}") from None


def read_transformer(ref: ModelRef) -> Any:
    """The transformer of pipeline folder ``ref`` in the dtype its checkpoint stores (bfloat16 for the published
    SD3.5 and FLUX.1), read tensor by tensor into memory the process owns.

    ``from_pretrained`` memory-maps the checkpoint: its pages count as the process's own (RSS) and are let go
    only when no tensor of the file is left, so casting the model afterwards held both copies. Read here, casting
    in place frees each old tensor as its successor is made. Buffers the checkpoint lacks keep their float32 values."""
    from accelerate import init_empty_weights

    assert ref.path is not None
    cls = transformer_class(ref.family)
    folder = ref.path / "transformer"
    try:
        with init_empty_weights():
            model = cls.from_config(cls.load_config(folder))
        state = read_safetensors(_weight_files(folder))
        model.load_state_dict(state, strict=True, assign=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise HpedgeError(f"could not load the transformer of {ref.path}: {str(e).splitlines()[0][:200]}") from None
    return model.eval()


def load_transformer(ref: ModelRef | str) -> Any:
    """The transformer alone: real weights for folders, meta-device weights for architectures."""
    if isinstance(ref, str):
        ref = resolve(ref, allow_architecture=True)
    if ref.architecture is not None:
        return build_on_meta(ref.architecture)
    import torch

    try:
        return transformer_class(ref.family).from_pretrained(
            ref.path, subfolder="transformer", dtype=torch.float32, use_safetensors=True
        )
    except (OSError, ValueError) as e:
        raise HpedgeError(f"could not load the transformer of {ref.path}: {str(e).splitlines()[0]}") from None


def make_stock_loadable(folder: Path) -> None:
    """Let a plain ``Pipeline.from_pretrained(folder)`` (no dtype argument) run: diffusers loads its own models
    in float32 by default, while transformers keeps the dtype a text encoder's config names (its saved dtype),
    and a stock pipeline call fails on mixed dtypes. Each text encoder's config is set to load in float32 too;
    the weights stay as stored (fp16 weights are upcast on load)."""
    for config in sorted(Path(folder).glob("text_encoder*/config.json")):
        data = json.loads(config.read_text())
        if data.get("dtype") != "float32":
            data["dtype"] = "float32"
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def drop_t5(pipe: Any) -> None:
    """SD3 without its T5 encoder, as diffusers runs it with ``text_encoder_3=None`` (zeros in T5's place)."""

    if family_of(pipe) != "sd3":
        raise HpedgeError("--drop-t5 applies to SD3 pipelines only: FLUX.1 takes its prompt embeddings from T5")
    pipe.text_encoder_3, pipe.tokenizer_3 = None, None
