import json

import pytest
import torch

from hpedge.compress.distill import DistillSettings, distill, latest_checkpoint
from hpedge.compress.pwp import resolve_pwp, update_weights
from hpedge.errors import HpedgeError
from hpedge.models import adapters
from hpedge.models.loading import load_pipeline
from hpedge.models.sampling import Defaults


def test_pwp_freezes_blocks_before_first_removed_position() -> None:
    kept = [0, 1, 2, 3, 5, 6, 9, 11]
    w = update_weights(kept, first_removed=4, harm=None, s=DistillSettings(sgd="off", pwp=True))
    assert [w[b] for b in (0, 1, 2, 3)] == [0.0] * 4
    assert all(w[b] == 1.0 for b in (5, 6, 9, 11))


def test_pwp_refuses_a_cut_that_leaves_no_kept_block_after_it() -> None:
    with pytest.raises(HpedgeError, match="PWP would freeze every kept block.*--no-pwp"):
        resolve_pwp([11, 9, 10], 12, DistillSettings(pwp=True))
    assert resolve_pwp([8, 9, 11], 12, DistillSettings(pwp=True))[0]  # block 10 is kept after the first removed one
    assert not resolve_pwp([9, 10, 11], 12, DistillSettings(pwp=False))[0]
    assert not resolve_pwp([9, 10, 11], 12, DistillSettings())[0]  # hpedge's default turns PWP off here (below)
    assert resolve_pwp([9, 10, 11], 12, DistillSettings(steps=0, pwp=True))[0]  # nothing is distilled


def test_pwp_default_is_on_unless_the_cut_leaves_no_kept_block_after_it() -> None:
    default = DistillSettings()  # pwp None: hpedge's default
    on, why = resolve_pwp([4, 6, 7, 9, 10], 12, default)  # the digits-sd3 curve's 40 % cut: blocks 5, 8, 11 train
    assert on and why == ("PWP on (hpedge's default): freezes kept blocks 0-3; 3 kept block(s) after the first removed "
                          "block 4 train for 5 removed")
    # the 50 % cut: on, with what the compression curve measured when fewer than one block trains per two removed
    on, why = resolve_pwp([4, 5, 6, 7, 9, 10], 12, default)
    assert on and "2 kept block(s) after the first removed block 4 train for 6 removed; fewer than one per two" in why
    assert "--no-pwp" in why
    off, why = resolve_pwp([9, 10, 11], 12, default)  # a suffix cut: PWP would freeze every kept block
    assert not off and why.startswith("PWP off (hpedge's default for this cut): it would freeze every kept block (0-8)")
    assert resolve_pwp([0, 5], 12, default) == (
        True, "PWP on (hpedge's default): freezes no kept block; 10 kept block(s) after the first removed block 0 train for 2 removed")
    # given explicitly, as given (an explicit --pwp on a suffix cut is refused, above, unless nothing is distilled)
    assert resolve_pwp([9, 10, 11], 12, DistillSettings(pwp=True, steps=0))[0] is True
    assert resolve_pwp([4, 6, 7, 9, 10], 12, DistillSettings(pwp=False)) == (False, "PWP off (--no-pwp)")
    with pytest.raises(ValueError, match="resolve"):
        update_weights([0, 1, 2], 1, None, default)


def test_sgdistill_weight_decreases_with_sensitivity() -> None:
    kept = [0, 1, 5, 6, 9, 11]
    harm = {0: 2.0, 1: 1.0, 5: 0.1, 6: 0.4, 9: 0.2, 11: 0.9, 3: -0.05}
    w = update_weights(kept, 2, harm, DistillSettings(sgd="continuous", sgd_min_weight=0.1, pwp=True))
    assert w[0] == w[1] == 0.0
    order = sorted((5, 6, 9, 11), key=harm.get)
    assert [w[b] for b in order] == sorted([w[b] for b in order], reverse=True)
    # s = harm / the model's largest harm (2.0): w = 0.1 + 0.9 * (1 - s)
    assert w[5] == pytest.approx(0.1 + 0.9 * 0.95) and w[11] == pytest.approx(0.1 + 0.9 * 0.55)
    # a block's weight is its own: it does not move when other blocks join or leave the trainable set
    w2 = update_weights([0, 1, 6, 11], 2, harm, DistillSettings(sgd="continuous", sgd_min_weight=0.1, pwp=True))
    assert w2[6] == pytest.approx(w[6]) and w2[11] == pytest.approx(w[11])
    # the most harmful block of the model gets the floor; a harmless (negative-harm) block gets 1
    w3 = update_weights([0, 3], 0, harm, DistillSettings(sgd="continuous", sgd_min_weight=0.1, pwp=False))
    assert w3[0] == pytest.approx(0.1) and w3[3] == pytest.approx(1.0)
    wb = update_weights(kept, 2, harm, DistillSettings(sgd="binary", pwp=True))
    assert wb[11] == wb[6] == 0.0 and wb[5] == wb[9] == 1.0


def _run(pipe, work, steps, resume=False):
    student, kept = adapters.prune(pipe.transformer, {8, 9})
    s = DistillSettings(steps=steps, batch_size=2, pool_size=4, pool_steps=2, checkpoint_every=2, sgd="off")
    prompts = ["a 1", "a 2 on the left", "two 3s", "a big 4"]
    gen = Defaults(32, 32, 2, 1.0, "cfg", 16, None, "test")
    return distill(pipe, student, kept, None, prompts, work, s, gen, resume=resume)


def test_resume_continues_exactly_where_the_run_stopped(random_sd3, tmp_path) -> None:
    pipe = load_pipeline(str(random_sd3))
    full, state_full, _ = _run(pipe, tmp_path / "a", 4)
    (tmp_path / "b").mkdir()
    (tmp_path / "a").mkdir(exist_ok=True)
    _run(pipe, tmp_path / "b", 2)  # "interrupted" after 2 steps (a checkpoint exists)
    assert latest_checkpoint(tmp_path / "b" / "checkpoints").name == "step-0000002"
    resumed, state, _ = _run(pipe, tmp_path / "b", 4, resume=True)
    assert state.step == 4
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), k
    assert state.losses[-1][1] == pytest.approx(state_full.losses[-1][1], rel=1e-4)


def test_distillation_reduces_the_loss(random_sd3, tmp_path) -> None:
    pipe = load_pipeline(str(random_sd3))
    (tmp_path / "w").mkdir()
    _, state, _ = _run(pipe, tmp_path / "w", 30)
    first, last = state.losses[0][1], state.losses[-1][1]
    assert last < first


def test_corrupt_checkpoint_is_a_clear_error(random_sd3, tmp_path) -> None:
    pipe = load_pipeline(str(random_sd3))
    work = tmp_path / "w"
    work.mkdir()
    _run(pipe, work, 2)
    ck = latest_checkpoint(work / "checkpoints")
    (ck / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(HpedgeError, match="cannot be resumed"):
        _run(pipe, work, 4, resume=True)
    json.loads((ck / "state.json").read_text())


def test_replaying_the_frozen_prefix_gives_the_same_losses_as_recomputing_it(random_sd3, tmp_path) -> None:
    """Under PWP the student's frozen prefix equals the teacher's blocks: feeding it the teacher's outputs instead of
    recomputing it must not change a step's losses (output and feature KD), only skip the work."""
    pipe = load_pipeline(str(random_sd3))
    gen = Defaults(32, 32, 2, 1.0, "cfg", 16, None, "test")
    prompts = ["a 1", "a 2 on the left", "two 3s", "a big 4"]
    losses, calls = {}, {}
    for replay in (True, False):
        student, kept = adapters.prune(pipe.transformer, {8, 9})
        n = calls[replay] = [0]
        student.transformer_blocks[7].register_forward_hook(lambda *_a, n=n: n.__setitem__(0, n[0] + 1))
        s = DistillSettings(steps=2, batch_size=2, pool_size=4, pool_steps=2, checkpoint_every=100, sgd="off",
                            pwp=True, replay_frozen_prefix=replay)
        _, state, weights = distill(pipe, student, kept, None, prompts, tmp_path / f"w{replay}", s, gen, resume=False)
        losses[replay] = state.losses
        assert [b for b, w in weights.items() if w == 0] == list(range(8))  # the prefix PWP freezes
    assert calls == {True: [0], False: [2]}  # the last frozen block ran only when recomputed (2 steps)
    assert len(losses[True]) == 1 and losses[True][0][0] == 2
    assert losses[True][0] == pytest.approx(losses[False][0], rel=1e-5, abs=1e-7)
