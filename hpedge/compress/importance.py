"""Importance tables: hpedge's own format and the reference's (SamsungLabs/HierarchicalPrune).

Internally every entry is a *harm*: how much removing a block (component None) or one of its
sub-components damages the model; higher = more important. The reference stores, per
``"<block><tab>component"`` key (the five literal characters ``<tab>``), the HPSv2 score *after*
removal (higher = less harmful); it is converted with harm = max(score) - score.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hpedge.errors import HpedgeError

FORMAT = "hpedge-importance/1"
REF_SEP = "<tab>"
SD3_ONLY = {"attn2"}
FLUX_ONLY = {"w_norm", "proj_mlp_out"}


@dataclass
class Entry:
    block: int
    component: str | None  # None = the whole block
    harm: float
    details: dict[str, float] = field(default_factory=dict)


@dataclass
class Importance:
    family: str
    num_blocks: int
    metric: str
    entries: list[Entry]
    source: str = "hpedge"
    settings: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""

    def block_harm(self) -> dict[int, float]:
        """Per-block harm: the block entry when measured, else the sum of its components' harms."""
        whole = {e.block: e.harm for e in self.entries if e.component is None}
        if whole:
            return whole
        out: dict[int, float] = {}
        for e in self.entries:
            out[e.block] = out.get(e.block, 0.0) + e.harm
        return out

    def component_harm(self) -> dict[tuple[int, str], float]:
        return {(e.block, e.component): e.harm for e in self.entries if e.component is not None}

    def check_matches(self, family: str, num_blocks: int) -> None:
        if self.family != family or self.num_blocks != num_blocks:
            raise HpedgeError(
                f"importance file is for a {self.family} transformer with {self.num_blocks} blocks, "
                f"but the model is {family} with {num_blocks} blocks"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "family": self.family,
            "num_blocks": self.num_blocks,
            "metric": self.metric,
            "source": self.source,
            "settings": self.settings,
            "fingerprint": self.fingerprint,
            "entries": [asdict(e) for e in self.entries],
        }

    def to_reference(self) -> dict[str, float]:
        """The reference's format: quality after removal (here: -harm), component entries only."""
        return {f"{e.block}{REF_SEP}{e.component}": -e.harm for e in self.entries if e.component is not None}


def load(path: str | Path, family_hint: str | None = None) -> Importance:
    path = Path(path)
    if not path.is_file():
        raise HpedgeError(f"importance file {path} not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise HpedgeError(f"importance file {path} is not valid JSON ({e})") from None
    if isinstance(data, dict) and data.get("format") == FORMAT:
        try:
            entries = [Entry(int(e["block"]), e["component"], float(e["harm"]), e.get("details", {})) for e in data["entries"]]
            return Importance(data["family"], int(data["num_blocks"]), data["metric"], entries, data.get("source", "hpedge"),
                              data.get("settings", {}), data.get("fingerprint", ""))
        except (KeyError, TypeError, ValueError) as e:
            raise HpedgeError(f"importance file {path} is malformed: {e}") from None
    if isinstance(data, dict) and data and all(isinstance(k, str) and REF_SEP in k for k in data):
        return _from_reference(data, path, family_hint)
    raise HpedgeError(f"{path} is neither an hpedge importance file nor a reference contribution table")


def _from_reference(data: dict[str, Any], path: Path, family_hint: str | None) -> Importance:
    parsed: list[tuple[int, str, float]] = []
    for k, v in data.items():
        b, _, comp = k.partition(REF_SEP)
        try:
            parsed.append((int(b), comp, float(v)))
        except ValueError:
            raise HpedgeError(f"{path}: bad reference key {k!r}") from None
    comps = {c for _, c, _ in parsed}
    family = "flux" if comps & FLUX_ONLY else (family_hint or "sd3")
    top = max(v for _, _, v in parsed)
    entries = [Entry(b, c, top - v, {"reference_score": v}) for b, c, v in parsed]
    return Importance(family, max(b for b, _, _ in parsed) + 1, "reference score (e.g. HPSv2) after removal",
                      entries, source=f"reference:{path.name}")
