"""The host memory an export needs, from the size benchmark's measured peaks, and what this host has available.

An export runs in two phases that never overlap (benchmarks/results/size-*.md, random weights at real width):

- Text: the text encoders are read (plain reads; CLIP cast to float32, T5 held as stored, 16 bits for the
  published checkpoints, and computed in float32), every prompt the export samples with is encoded, and the
  encoders are exported, quantized and freed. T5-XXL width with 3 and 6 blocks stored in fp16 (1.16 and 2.32 GB)
  peaked at 2.98 and 4.08 GB: the text line below (0.95x the held bytes + 1.9 GB: one block's float32 copy at a
  time, the shared embedding in float32, the process).
- Transformer: its weights are read as stored (bfloat16 as published), computed in float32, exported once in
  fp16, checked through a float32 view of that graph and quantized one weight at a time. RTN peaked at 4.14 GB at
  0.64 B parameters and 7.25 GB at 2.24 B (SD3.5 Medium's width): 0.97x the transformer's fp16 bytes + 2.92 GB
  passes through both; hpedge's streamed AWQ-clip (the default) at 4.13 and 7.34 GB: 1.01x + 2.84 GB. ModelOpt's
  own AWQ pass (``awq_clip_modelopt``) measured 17.36 GB at 0.64 B (13.55x).

The need is the larger of the two lines. Measured peaks, CPU path, not a formula of the code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hpedge.errors import HpedgeError

# peak RSS of a whole `hpedge export` = factor x the transformer's fp16 bytes + constant bytes, and where measured
MEASURED_PEAK = {
    "rtn": (0.97, 2_920_000_000, "size-sd3.5-medium-2.24B-rtn.md and size-sd3.5-medium-0.64B-rtn.md (2026-12-05)"),
    "awq_clip": (1.01, 2_840_000_000, "size-sd3.5-medium-2.24B-awq-clip.md and size-sd3.5-medium-0.64B-awq-clip.md (2026-12-05)"),
    "awq_clip_modelopt": (13.55, 0, "size-sd3.5-medium-0.64B-awq-clip-modelopt.md (2026-12-02)"),
}
# peak RSS of the text phase = factor x the text encoders' held bytes + constant bytes (T5-XXL width, AWQ-clip INT4)
TEXT_PEAK = (0.95, 1_900_000_000,
             "size-t5-xxl-width-3-blocks-awq-clip.md and size-t5-xxl-width-6-blocks-awq-clip.md (2026-12-05)")
PROCESS_BYTES = 1_000_000_000  # Python, torch and ONNX Runtime before any weight (measured: 0.57 GB at loading)


@dataclass(frozen=True)
class HostNeed:
    method: str
    transformer_fp16_bytes: int
    factor: float
    constant: int
    need: int
    source: str
    text_bytes: int = 0  # the text encoders as held while prompts are encoded (CLIP float32, T5 as stored)
    text_need: int = 0  # the text phase's peak (before the transformer is read)

    @property
    def transformer_need(self) -> int:
        return int(self.factor * self.transformer_fp16_bytes + self.constant)

    @property
    def rule(self) -> str:
        """How the need is made, for messages: ``transformer 0.97x + 2.9 GB = 18.5 GB, text encoders 22.3 GB -> 24.0 GB``."""
        t = (f"transformer {self.factor}x" + (f" + {self.constant / 1e9:.1f} GB" if self.constant else "")
             + f" = {self.transformer_need / 1e9:.1f} GB")
        if not self.text_bytes:
            return t
        return f"{t}; text encoders {self.text_bytes / 1e9:.1f} GB held -> {self.text_need / 1e9:.1f} GB"

    def to_dict(self) -> dict[str, object]:
        return {"method": self.method, "transformer_fp16_bytes": self.transformer_fp16_bytes, "factor": self.factor,
                "constant": self.constant, "text_bytes": self.text_bytes, "text_need": self.text_need,
                "need": self.need, "source": self.source}


def export_need(transformer_params: int, method: str, text_bytes: int = 0) -> HostNeed:
    """The host memory ``hpedge export --method METHOD`` needs for a transformer of ``transformer_params`` and text
    encoders held in ``text_bytes`` (:func:`hpedge.models.meta.text_encoder_held_bytes`): the larger of its two phases (the text encoders are freed before the transformer
    is read; the size benchmark's transformer pipelines have tiny text encoders, its T5 pipelines a tiny
    transformer, so each line is one phase's alone)."""
    if method not in MEASURED_PEAK:
        raise HpedgeError(f"--method must be one of {', '.join(MEASURED_PEAK)}, got {method!r}")
    factor, constant, source = MEASURED_PEAK[method]
    tf, tc, _ = TEXT_PEAK
    fp16, text = 2 * transformer_params, text_bytes
    text_need = int(tf * text + tc) if text else 0
    need = int(max(PROCESS_BYTES, factor * fp16 + constant, text_need))
    return HostNeed(method, fp16, factor, constant, need, source, text, text_need)


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


def check_host(transformer_params: int, method: str, ignore: bool = False, text_bytes: int = 0) -> dict[str, Any]:
    """:func:`export_need` against this host's available memory: refused up front, in one line, where the host has
    less (unless ``ignore``, ``--ignore-host-memory``). Returns what the manifest records."""
    need = export_need(transformer_params, method, text_bytes)
    avail = available_bytes()
    short = avail is not None and need.need > avail
    if short and not ignore:
        other = "" if method == "rtn" else f"; --method rtn needs about {export_need(transformer_params, 'rtn', text_bytes).need / 1e9:.1f} GB"
        raise HpedgeError(f"this export needs about {need.need / 1e9:.1f} GB of host memory ({method}, "
                          f"{need.transformer_fp16_bytes / 1e9:.2f} GB of fp16 transformer weights: {need.rule}; measured by "
                          f"the size benchmark) and this host has {avail / 1e9:.1f} GB available{other}; "  # type: ignore[operator]
                          "pass --ignore-host-memory to go ahead")
    return {**need.to_dict(), "available": avail, "ignored": bool(short and ignore)}
