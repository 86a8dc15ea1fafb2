"""Hierarchical Position Pruning: choose the blocks to remove under a budget.

Early blocks build the semantic layout, so the first ``protect_early`` fraction of blocks is never a
candidate. Among the later blocks, the least harmful (by the contribution analysis) are removed
first until the budget holds. A budget is exactly one of: a number of blocks or explicit indices
(``--remove-blocks 3`` / ``25-29,31-35``), a fraction of blocks (``--remove-fraction``), a kept
parameter ratio (``--keep-ratio``), or a target device (``--target``): the package as it ships (the kept
transformer and T5 in INT4, CLIPs and the VAE decoder in fp16), the activations of its phases at the
profile's opt resolution and batch, under the residency chosen (see :mod:`hpedge.targets.footprint`), plus
the profile's reserve, must fit its memory.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from hpedge.compress.importance import Importance
from hpedge.errors import HpedgeError
from hpedge.models import adapters
from hpedge.models.denoise import family_of
from hpedge.models.families import family as family_facts
from hpedge.targets.footprint import Footprint
from hpedge.targets.profiles import Profile


@dataclass
class Budget:
    remove_blocks: str | None = None
    remove_fraction: float | None = None
    keep_ratio: float | None = None
    target: str | None = None
    residency: str = "auto"  # --target only: how the package's components share the device (hpedge.targets.footprint)
    drop_t5: bool = False  # --target only: the package ships no T5 (SD3)
    t5: str = "auto"  # --target only: T5's precision in the package (auto | int4 | int8; hpedge.targets.footprint)

    KINDS = ("remove_blocks", "remove_fraction", "keep_ratio", "target")

    def check(self) -> None:
        given = [k for k in self.KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise HpedgeError(
                "give exactly one budget: --remove-blocks, --remove-fraction, --keep-ratio or --target"
                + (f" (got {', '.join('--' + g.replace('_', '-') for g in given)})" if given else "")
            )
        if self.remove_fraction is not None and not 0 < self.remove_fraction < 1:
            raise HpedgeError(f"--remove-fraction must be between 0 and 1, got {self.remove_fraction}")
        if self.keep_ratio is not None and not 0 < self.keep_ratio < 1:
            raise HpedgeError(f"--keep-ratio must be between 0 and 1, got {self.keep_ratio}")
        if self.target is None and (self.residency != "auto" or self.drop_t5 or self.t5 != "auto"):
            raise HpedgeError("--residency, --drop-t5 and --t5 size the package on a device: they go with --target")

    def given(self) -> bool:
        """Whether a block budget was given (weight sparsity may run without one)."""
        return any(getattr(self, k) is not None for k in self.KINDS)

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.KINDS if getattr(self, k) is not None}
        if self.target is not None:
            d.update(residency=self.residency, drop_t5=self.drop_t5, t5=self.t5)
        return d


def parse_blocks(spec: str) -> int | list[int]:
    """``"3"`` -> 3 (a count); ``"25-29,31-35"`` or ``"7,"`` -> explicit indices."""
    spec = spec.strip()
    if spec.isdigit():
        return int(spec)
    out: list[int] = []
    try:
        for part in filter(None, (p.strip() for p in spec.split(","))):
            if "-" in part:
                a, b = (int(x) for x in part.split("-", 1))
                if b < a:
                    raise ValueError
                out += list(range(a, b + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise HpedgeError(f"bad block list {spec!r}: use a count (3) or indices like 25-29,31-35") from None
    if not out:
        raise HpedgeError(f"bad block list {spec!r}")
    return sorted(set(out))


@dataclass
class Plan:
    family: str
    num_blocks: int
    remove: list[int]
    kept: list[int]
    params_before: int
    params_after: int
    bytes_bf16_before: int
    bytes_bf16_after: int
    bytes_int4_after: int
    budget: dict[str, Any]
    ranking: list[int] = field(default_factory=list)  # candidate order, least harmful first
    first_removable: int = 0
    target_memory_bytes: int | None = None
    package_memory: dict[str, Any] | None = None  # the target's footprint at this removal (--target budgets)
    notes: list[str] = field(default_factory=list)

    @property
    def kept_ratio(self) -> float:
        return self.params_after / self.params_before

    @property
    def first_removed(self) -> int:
        return min(self.remove) if self.remove else self.num_blocks

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kept_ratio"] = self.kept_ratio
        return d


def _block_stats(transformer: Any) -> tuple[list[int], list[int], int, int]:
    refs = adapters.blocks(transformer)
    return ([adapters.numel(r.module) for r in refs], [adapters.int4_bytes(r.module) for r in refs],
            adapters.numel(transformer), adapters.int4_bytes(transformer))


# Over 80 lines on purpose: one search whose closures (summary, fits, need) share the block statistics.
def make_plan(transformer: Any, budget: Budget, importance: Importance | None = None, protect_early: float = 0.5,
              footprint: Footprint | None = None, profile: Profile | None = None) -> Plan:
    """``footprint`` (the :class:`~hpedge.targets.footprint.Footprint` of the whole transformer on the target)
    and ``profile`` (the target's) are required by a ``--target`` budget."""
    budget.check()
    capacity = _capacity(budget, footprint, profile)
    family = family_of(transformer)
    refs = adapters.blocks(transformer)
    n = len(refs)
    if importance is not None:
        importance.check_matches(family, n)
    params, int4, total, total_int4 = _block_stats(transformer)
    if not 0 <= protect_early < 1:
        raise HpedgeError(f"--protect-early must be in [0, 1), got {protect_early}")
    first_removable = math.ceil(protect_early * n)
    fixed = {n - 1} if family_facts(family).final_block_fixed else set()  # the final SD3 block is context_pre_only
    candidates = [i for i in range(first_removable, n) if i not in fixed]
    notes: list[str] = []

    explicit: list[int] | None = None
    count: int | None = None
    if budget.remove_blocks is not None:
        parsed = parse_blocks(budget.remove_blocks)
        if isinstance(parsed, int):
            count = parsed
        else:
            explicit = parsed
    elif budget.remove_fraction is not None:
        count = max(1, round(budget.remove_fraction * n))

    ranking: list[int] = []
    if explicit is None:
        if importance is None:
            raise HpedgeError("this budget needs an importance table: pass --importance FILE (see hpedge analyze) "
                              "or explicit indices with --remove-blocks")
        harm = importance.block_harm()
        ranking = sorted(candidates, key=lambda i: (harm.get(i, math.inf), -i))

    def summary(remove: list[int]) -> Plan:
        adapters.validate_removal(transformer, set(remove))
        removed_params = sum(params[i] for i in remove)
        return Plan(
            family=family, num_blocks=n, remove=sorted(remove), kept=[i for i in range(n) if i not in remove],
            params_before=total, params_after=total - removed_params, bytes_bf16_before=2 * total,
            bytes_bf16_after=2 * (total - removed_params), bytes_int4_after=total_int4 - sum(int4[i] for i in remove),
            budget=budget.to_dict(), ranking=ranking,
            first_removable=first_removable, notes=notes,
        )

    if explicit is not None:
        early = [i for i in explicit if i < first_removable]
        if early:
            notes.append(f"explicit removal of early block(s) {early} (inside the protected first {first_removable})")
        return summary(explicit)
    if count is not None:
        if count > len(ranking):
            raise HpedgeError(
                f"impossible budget: {count} blocks requested but only {len(ranking)} are removable "
                f"(blocks {first_removable}..{n - 1}{', final SD3 block kept' if fixed else ''}); lower --protect-early"
            )
        return summary(ranking[:count])

    def fits(remove: list[int]) -> bool:
        kept_params = total - sum(params[i] for i in remove)
        if budget.keep_ratio is not None:
            return kept_params / total <= budget.keep_ratio
        return need(remove) <= capacity

    def need(remove: list[int]) -> int:
        return int(footprint.need(transformer=kept_int4(remove)))

    def kept_int4(remove: list[int]) -> int:
        return total_int4 - sum(int4[i] for i in remove)

    remove: list[int] = []
    for i in [None, *ranking]:
        if i is not None:
            remove.append(i)
        if fits(remove):
            if not remove:
                notes.append("the budget already holds without removing any block")
            plan = summary(remove)
            if budget.target is not None:
                plan.target_memory_bytes = capacity
                plan.package_memory = footprint.with_transformer(kept_int4(remove)).to_dict()
            return plan
    if budget.keep_ratio is not None:
        raise HpedgeError(f"impossible budget --keep-ratio {budget.keep_ratio}; lower --protect-early")
    raise _impossible_target(budget, footprint, family, need(remove), capacity, len(ranking))


def _capacity(budget: Budget, footprint: Footprint | None, profile: Profile | None) -> int:
    """The bytes a ``--target`` budget may fill (0 for the other budgets)."""
    if budget.target is None:
        return 0
    if profile is None or footprint is None:
        raise HpedgeError("internal: a --target budget needs the target's profile and the package footprint on it")
    if "int4" not in profile.precisions:
        raise HpedgeError(f"target {profile.name} does not support int4 weights")
    return int(footprint.capacity)


def _impossible_target(budget: Budget, footprint: Any, family: str, need: int, capacity: int, removable: int) -> HpedgeError:
    hints = [h for h, ok in (("--residency sequential", footprint.residency == "resident"),
                             ("--drop-t5", family_facts(family).t5_optional and not footprint.drop_t5)) if ok]
    return HpedgeError(
        f"impossible budget --target {budget.target} ({footprint.residency}"
        f"{', T5 dropped' if footprint.drop_t5 else ''}): the package needs {need / 1e9:.2f} GB even after "
        f"removing all {removable} removable blocks, {(need - capacity) / 1e9:.2f} GB more than the {capacity / 1e9:.2f} GB "
        f"available; " + (f"try {' or '.join(hints)}, " if hints else "") + "lower --protect-early or choose a larger target")
