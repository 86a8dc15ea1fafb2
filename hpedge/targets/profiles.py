"""Device profiles: data files shipped in the wheel (``hpedge/profiles/*.json``) or given by path.

A profile states what a target can run (compute capability, memory, precisions), the shapes an
engine must cover (resolution and batch ranges -> TensorRT optimization profiles), how to build
(optimization level, workspace, on the host or on the device), which engine library builds its
engines for which compute capabilities, and the parity tolerances.

Engine libraries: ``tensorrt_rtx`` (TensorRT for RTX) compiles engines ahead of time on any host, GPU or
not, for one or several RTX compute capabilities (several = a portable engine), and finishes them just in
time on the user's card; ``tensorrt`` (standard TensorRT) builds where the library and a GPU of the
target's architecture are, which for Jetson boards means on the board (``hpedge build``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hpedge.backends import trt_rtx
from hpedge.errors import HpedgeError
from hpedge.targets.precisions import PRECISIONS as TRANSFORMER_PRECISIONS

PROFILE_DIR = Path(__file__).resolve().parent.parent / "profiles"
SCHEMA = "hpedge-profile/2"
ENGINE_LIBRARIES = ("tensorrt_rtx", "tensorrt")
RTX_COMPUTE_CAPABILITIES = trt_rtx.RUNS_ON  # what TensorRT-RTX profiles may list
KNOWN_PRECISIONS = {"fp32", "fp16", "bf16", "int8", "int4", "fp8", "nvfp4"}
# a profile without ``transformer_precisions`` (one a manifest of an earlier hpedge stores) ships INT4 only
DEFAULT_TRANSFORMER_PRECISIONS = ("int4",)


@dataclass(frozen=True)
class Range:
    min: int
    opt: int
    max: int

    @classmethod
    def parse(cls, d: Any, what: str) -> "Range":
        try:
            r = cls(int(d["min"]), int(d["opt"]), int(d["max"]))
        except (KeyError, TypeError, ValueError):
            raise HpedgeError(f"profile field {what!r} must be {{min, opt, max}} integers") from None
        if not (0 < r.min <= r.opt <= r.max):
            raise HpedgeError(f"profile field {what!r} must satisfy 0 < min <= opt <= max, got {r}")
        return r


@dataclass(frozen=True)
class Parity:
    fp32_atol: float
    fp32_rtol: float
    int4_min_cosine: float
    int4_min_psnr_db: float
    e2e_min_psnr_db: float
    text_min_cosine: float = 0.99  # prompt embeddings (CLIP fp16 + T5 INT4) vs PyTorch, held-out prompts
    vae_min_psnr_db: float = 30.0  # the VAE decoder (fp16) vs PyTorch's fp32 decode
    # the runtime's images vs stock diffusers' call over the same graphs (hpedge.export.driver): implementation only
    impl_min_psnr_db: float = 40.0
    # each quantized graph (transformer int4, T5) vs PyTorch running the same dequantized weights (hpedge.export.
    # dequantized), computed in float32: the graphs' implementation only; int4_cpu (int8 kernel) vs PyTorch with its
    # int8 weights and activation quantization emulated, not exactly (61-71 dB on the fixtures, 50.2 on digits-sd3)
    impl_graph_min_psnr_db: float = 60.0
    impl_int4_cpu_min_psnr_db: float = 40.0
    # FP8 / NVFP4 graphs vs PyTorch with the same weights and activation quantization emulated (float32): values on a
    # rounding boundary of the activations' 8- or 4-bit grid may round either way
    impl_activation_quant_min_psnr_db: float = 40.0
    # NVFP4 likewise, on a grid of 8 magnitudes: one value rounding the other way moves it by up to a third, and the
    # flips compound through the blocks (34.0 dB on the tiny SD3.5 Large fixture, its emulated activation quantizer
    # bit-identical to PyTorch's, tests/export/test_float_quant.py); a wrong scale or packing lands far below
    impl_fp4_min_psnr_db: float = 25.0
    impl_fp4_min_cosine: float = 0.99  # (0.9982 there)
    impl_min_cosine: float = 0.999


@dataclass(frozen=True)
class EngineSpec:
    library: str  # "tensorrt_rtx" | "tensorrt"
    compute_capabilities: tuple[str, ...]  # more than one: a portable engine (TensorRT-RTX only)

    @property
    def portable(self) -> bool:
        return len(self.compute_capabilities) > 1


@dataclass(frozen=True)
class Profile:
    name: str
    display_name: str
    kind: str  # "discrete" | "jetson"
    compute_capability: str
    memory_gb: float
    shared_memory: bool
    precisions: tuple[str, ...]
    resolution: Range
    batch: Range
    builder_optimization_level: int
    workspace_gb: float
    build_on: str  # "host" | "device"
    reserve_gb: float  # memory kept free for activations, the runtime and (Jetson) the OS
    parity: Parity
    engine: EngineSpec
    # the transformer precisions --precision auto tries, best first (hpedge.targets.precisions)
    transformer_precisions: tuple[str, ...] = DEFAULT_TRANSFORMER_PRECISIONS

    @property
    def sm(self) -> int:
        major, minor = self.compute_capability.split(".")
        return int(major) * 10 + int(minor)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["schema"] = SCHEMA
        return d


def _parse(data: Any, source: str) -> Profile:
    if not isinstance(data, dict):
        raise HpedgeError(f"{source}: a profile must be a JSON object")
    if data.get("schema") == "hpedge-profile/1":
        raise HpedgeError(f"{source}: schema hpedge-profile/1 has no engine section; set \"schema\": \"{SCHEMA}\" and add "
                          '"engine": {"library": "tensorrt_rtx" (RTX cards) or "tensorrt" (Jetson), '
                          '"compute_capabilities": ["8.9"]}')
    if data.get("schema") != SCHEMA:
        raise HpedgeError(f"{source}: unknown profile schema {data.get('schema')!r} (expected {SCHEMA!r})")
    required = ["name", "display_name", "kind", "compute_capability", "memory_gb", "precisions", "resolution",
                "batch", "builder_optimization_level", "workspace_gb", "build_on", "reserve_gb", "parity", "engine"]
    missing = [k for k in required if k not in data]
    if missing:
        raise HpedgeError(f"{source}: profile is missing {', '.join(missing)}")
    precisions = tuple(data["precisions"])
    unknown = set(precisions) - KNOWN_PRECISIONS
    if unknown:
        raise HpedgeError(f"{source}: unknown precisions {sorted(unknown)}")
    if "int4" not in precisions:
        raise HpedgeError(f"{source}: the target cannot run INT4 weights (precisions: {', '.join(precisions)}); every hpedge "
                          "package carries the INT4 transformer")
    order = tuple(data.get("transformer_precisions", DEFAULT_TRANSFORMER_PRECISIONS))
    bad = [p for p in order if p not in TRANSFORMER_PRECISIONS or p not in precisions]
    if bad or not order or "int4" not in order or len(set(order)) != len(order):
        raise HpedgeError(f"{source}: transformer_precisions must list distinct precisions of {', '.join(TRANSFORMER_PRECISIONS)}"
                          f" that the profile's precisions hold, int4 among them (got {list(order)})")
    if data["kind"] not in ("discrete", "jetson") or data["build_on"] not in ("host", "device"):
        raise HpedgeError(f"{source}: kind must be discrete|jetson and build_on host|device")
    cc = str(data["compute_capability"])
    if not cc.replace(".", "", 1).isdigit() or "." not in cc:
        raise HpedgeError(f"{source}: compute_capability must look like '8.9', got {cc!r}")
    if not 0 <= int(data["builder_optimization_level"]) <= 5:
        raise HpedgeError(f"{source}: builder_optimization_level must be 0..5")
    engine = _parse_engine(data["engine"], source, cc, data["kind"], data["build_on"])
    try:
        parity = Parity(**{k: float(v) for k, v in data["parity"].items()})
    except TypeError as e:
        raise HpedgeError(f"{source}: bad parity section: {e}") from None
    return Profile(
        name=str(data["name"]), display_name=str(data["display_name"]), kind=data["kind"],
        compute_capability=cc, memory_gb=float(data["memory_gb"]), shared_memory=bool(data.get("shared_memory", False)),
        precisions=precisions, resolution=Range.parse(data["resolution"], "resolution"),
        batch=Range.parse(data["batch"], "batch"), builder_optimization_level=int(data["builder_optimization_level"]),
        workspace_gb=float(data["workspace_gb"]), build_on=data["build_on"], reserve_gb=float(data["reserve_gb"]),
        parity=parity, engine=engine, transformer_precisions=order,
    )


def _parse_engine(d: Any, source: str, cc: str, kind: str, build_on: str) -> EngineSpec:
    if not isinstance(d, dict) or set(d) != {"library", "compute_capabilities"}:
        raise HpedgeError(f"{source}: engine must be {{\"library\": ..., \"compute_capabilities\": [...]}}")
    lib, caps = d["library"], d["compute_capabilities"]
    if lib not in ENGINE_LIBRARIES:
        raise HpedgeError(f"{source}: engine.library must be one of {', '.join(ENGINE_LIBRARIES)}, got {lib!r}")
    if not isinstance(caps, list) or not caps or not all(isinstance(c, str) for c in caps) or len(set(caps)) != len(caps):
        raise HpedgeError(f"{source}: engine.compute_capabilities must be a non-empty list of distinct strings like \"8.9\"")
    if cc not in caps:
        raise HpedgeError(f"{source}: engine.compute_capabilities {caps} must include the device's own {cc}")
    if lib == "tensorrt_rtx":
        bad = [c for c in caps if c not in RTX_COMPUTE_CAPABILITIES]
        if bad:
            raise HpedgeError(f"{source}: TensorRT-RTX cannot target compute capability {bad[0]} "
                              f"(it supports {', '.join(RTX_COMPUTE_CAPABILITIES)}); Jetson and datacenter GPUs use \"tensorrt\"")
        if kind != "discrete" or build_on != "host":
            raise HpedgeError(f"{source}: TensorRT-RTX profiles are discrete RTX cards built on the host (kind discrete, build_on host)")
    elif len(caps) != 1:
        raise HpedgeError(f"{source}: standard TensorRT engines are built for one GPU architecture; list only {cc}")
    return EngineSpec(lib, tuple(caps))


def profile_from_dict(data: Any, source: str) -> Profile:
    """A profile as a manifest stores it (:meth:`Profile.to_dict`), validated as a profile file is."""
    return _parse(data, source)


def builtin_names() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.json"))


def load_profile(name_or_path: str) -> Profile:
    """A built-in profile by name, or a user's profile JSON file by path."""
    path = Path(name_or_path)
    if name_or_path.endswith(".json") or path.exists():
        if not path.is_file():
            raise HpedgeError(f"profile file {path} not found")
    else:
        path = PROFILE_DIR / f"{name_or_path}.json"
        if not path.exists():
            raise HpedgeError(f"unknown target {name_or_path!r}; known targets: {', '.join(builtin_names())}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise HpedgeError(f"{path}: not valid JSON ({e})") from None
    return _parse(data, str(path))


def all_profiles() -> list[Profile]:
    return [load_profile(n) for n in builtin_names()]
