"""The host memory an export needs, from the size benchmark's measured peaks, and what this host has available.

An export's peak resident memory grows with the transformer (measured with random weights at real width, stored in
bfloat16 as the published checkpoints are, benchmarks/results/size-*.md): the transformer is held as stored and
computed in float32, exported once in fp16, checked through a float32 view of that graph, and quantized one
weight at a time. RTN peaked at 4.14 GB at 0.64 B parameters and 7.25 GB at 2.24 B (SD3.5 Medium's width):
0.97x the transformer's fp16 bytes + 2.92 GB passes through both. hpedge's streamed AWQ-clip (the default) adds
one ONNX Runtime run per calibration input over the fp16 weights: 4.13 and 8.82 GB, 1.47x + 2.26 GB. ModelOpt's own AWQ pass
(``awq_clip_modelopt``) measured 17.36 GB at 0.64 B (13.55x). The size benchmark's text encoders are tiny: the text
encoders a model really has are held in float32 (4 bytes a parameter) while the calibration runs encode prompts,
and are added on top. Measured peaks, CPU path, not a formula of the code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hpedge.errors import HpedgeError

# peak RSS of a whole `hpedge export` = factor x the transformer's fp16 bytes + constant bytes, and where measured
MEASURED_PEAK = {
    "rtn": (0.97, 2_920_000_000, "size-sd3.5-medium-2.24B-rtn.md and size-sd3.5-medium-0.64B-rtn.md (2026-12-05)"),
    "awq_clip": (1.47, 2_260_000_000, "size-sd3.5-medium-2.24B-awq-clip.md and size-sd3.5-medium-0.64B-awq-clip.md (2026-12-05)"),
    "awq_clip_modelopt": (13.55, 0, "size-sd3.5-medium-0.64B-awq-clip-modelopt.md (2026-12-02)"),
}
PROCESS_BYTES = 1_000_000_000  # Python, torch and ONNX Runtime before any weight (measured: 0.57 GB at loading)


@dataclass(frozen=True)
class HostNeed:
    method: str
    transformer_fp16_bytes: int
    factor: float
    constant: int
    need: int
    source: str
    text_fp32_bytes: int = 0  # the text encoders, held in float32 while the calibration runs encode prompts

    @property
    def rule(self) -> str:
        """How the need is made, for messages: ``0.98x + 2.9 GB + text encoders 22.3 GB``."""
        return (f"{self.factor}x" + (f" + {self.constant / 1e9:.1f} GB" if self.constant else "")
                + (f" + text encoders {self.text_fp32_bytes / 1e9:.1f} GB" if self.text_fp32_bytes else ""))

    def to_dict(self) -> dict[str, object]:
        return {"method": self.method, "transformer_fp16_bytes": self.transformer_fp16_bytes, "factor": self.factor,
                "constant": self.constant, "text_fp32_bytes": self.text_fp32_bytes, "need": self.need,
                "source": self.source}


def export_need(transformer_params: int, method: str, text_params: int = 0) -> HostNeed:
    """The host memory ``hpedge export --method METHOD`` needs for a transformer of ``transformer_params`` and text
    encoders of ``text_params`` (held in float32, 4 bytes each, beside the transformer; the size benchmark's
    pipelines have tiny text encoders, so the measured line is the transformer's alone)."""
    if method not in MEASURED_PEAK:
        raise HpedgeError(f"--method must be one of {', '.join(MEASURED_PEAK)}, got {method!r}")
    factor, constant, source = MEASURED_PEAK[method]
    fp16, text = 2 * transformer_params, 4 * text_params
    return HostNeed(method, fp16, factor, constant, int(max(PROCESS_BYTES, factor * fp16 + constant + text)), source, text)


def available_bytes() -> int | None:
    """MemAvailable of this host (Linux), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_host(transformer_params: int, method: str, ignore: bool = False, text_params: int = 0) -> dict[str, Any]:
    """:func:`export_need` against this host's available memory: refused up front, in one line, where the host has
    less (unless ``ignore``, ``--ignore-host-memory``). Returns what the manifest records."""
    need = export_need(transformer_params, method, text_params)
    avail = available_bytes()
    short = avail is not None and need.need > avail
    if short and not ignore:
        other = "" if method == "rtn" else f"; --method rtn needs about {export_need(transformer_params, 'rtn', text_params).need / 1e9:.1f} GB"
        raise HpedgeError(f"this export needs about {need.need / 1e9:.1f} GB of host memory ({method}: {need.rule} for the "
                          f"transformer's {need.transformer_fp16_bytes / 1e9:.2f} GB of fp16 weights, measured by the size "
                          f"benchmark) and this host has {avail / 1e9:.1f} GB available{other}; "  # type: ignore[operator]
                          "pass --ignore-host-memory to go ahead")
    return {**need.to_dict(), "available": avail, "ignored": bool(short and ignore)}
