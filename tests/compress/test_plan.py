from pathlib import Path

import pytest

from hpedge.compress.importance import load
from hpedge.compress.plan import Budget, make_plan, parse_blocks
from hpedge.errors import HpedgeError
from hpedge.models.architectures import build_on_meta
from hpedge.targets.profiles import load_profile

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "sd35-large-turbo-contribution-hpsv2.json"  # Apache-2.0, see tests/data


@pytest.fixture(scope="module")
def large():
    return build_on_meta("sd3.5-large")


def test_parse_blocks() -> None:
    assert parse_blocks("3") == 3
    assert parse_blocks("25-29,31-35") == [25, 26, 27, 28, 29, 31, 32, 33, 34, 35]
    with pytest.raises(HpedgeError):
        parse_blocks("5-2")


def test_reference_cut_arithmetic(large) -> None:
    p = make_plan(large, Budget(remove_blocks="25-29,31-35"))
    assert round(p.kept_ratio, 3) == 0.736
    assert round(p.bytes_int4_after / 1e9, 2) == 3.06
    assert round(1 - p.bytes_int4_after / p.bytes_bf16_before, 3) == 0.810
    assert p.kept == list(range(25)) + [30, 36, 37]


def test_reference_table_drives_position_aware_selection(large) -> None:
    imp = load(REFERENCE)
    assert imp.family == "sd3" and imp.num_blocks == 38 and len(imp.entries) == 190
    p = make_plan(large, Budget(remove_blocks="10"), imp, protect_early=0.6)
    assert len(p.remove) == 10 and min(p.remove) >= 23 and 37 not in p.remove
    harm = imp.block_harm()
    kept_late = [b for b in p.kept if b >= p.first_removable and b != 37]
    assert max(harm[b] for b in p.remove) <= min(harm[b] for b in kept_late)
    p2 = make_plan(large, Budget(keep_ratio=0.75), imp, protect_early=0.6)
    assert p2.kept_ratio <= 0.75


def test_impossible_budgets(large) -> None:
    with pytest.raises(HpedgeError, match="exactly one budget"):
        make_plan(large, Budget(remove_blocks="3", keep_ratio=0.5))
    with pytest.raises(HpedgeError, match="importance"):
        make_plan(large, Budget(remove_blocks="3"))
    with pytest.raises(HpedgeError, match=r"\(resident\): the package needs 9\.\d\d GB even after removing all 18 "
                                          r"removable blocks, 3\.\d\d GB more than the 5\.50 GB available; "
                                          r"try --residency sequential or --drop-t5"):
        make_plan(large, Budget(target="jetson-orin-nano-8gb"), _uniform(38), footprint=_footprint("jetson-orin-nano-8gb", 7e9),
                  profile=load_profile("jetson-orin-nano-8gb"))
    with pytest.raises(HpedgeError, match="only 18 are removable"):
        make_plan(large, Budget(remove_blocks="30"), _uniform(38))


def test_target_budget_fits_memory(large) -> None:
    p = make_plan(large, Budget(target="rtx4090"), _uniform(38), footprint=_footprint("rtx4090", 17e9),
                  profile=load_profile("rtx4090"))
    assert p.target_memory_bytes == 21e9 and p.remove
    assert p.package_memory["weights"]["transformer"] == p.bytes_int4_after
    assert p.package_memory["need"] == p.bytes_int4_after + 17e9 + 1e8 <= p.target_memory_bytes
    # one block fewer would not fit
    from hpedge.models.adapters import int4_bytes

    last = p.ranking[len(p.remove) - 1]  # the planner removes in ranking order until the package fits
    one_less = p.bytes_int4_after + int4_bytes(large.transformer_blocks[last])
    assert one_less + 17e9 + 1e8 > p.target_memory_bytes


def test_residency_and_drop_t5_need_a_target() -> None:
    with pytest.raises(HpedgeError, match="they go with --target"):
        Budget(remove_blocks="3", drop_t5=True).check()


def _footprint(target: str, others: float):
    """A resident footprint whose non-transformer weights sum to ``others`` bytes, 0.1 GB of activations."""
    from hpedge.targets.footprint import Footprint

    prof = load_profile(target)
    return Footprint(target, "resident", 1024, 1, False, int((prof.memory_gb - prof.reserve_gb) * 1e9),
                     weights={"transformer": 0, "t5": int(others)}, activations={"transformer": int(1e8)})


def test_importance_for_other_architecture_is_refused(large) -> None:
    with pytest.raises(HpedgeError, match="38 blocks"):
        make_plan(build_on_meta("sd3.5-medium"), Budget(remove_blocks="3"), _uniform(38))


def _uniform(n: int):
    from hpedge.compress.importance import Entry, Importance

    return Importance("sd3", n, "test", [Entry(i, None, float(i % 7)) for i in range(n)])
