import numpy as np

from hpedge.zoo import digits
from hpedge.zoo.text import clip_tokenizer, t5_tokenizer


def test_prompts_cover_categories_and_heldout() -> None:
    ps = digits.eval_prompts(8, seed=1)
    assert {p.category for p in ps} == set(digits.CATEGORIES)
    assert sum(p.heldout for p in ps) == 5 * 2
    train_texts = {t for ts in digits.TRAIN_TEMPLATES.values() for t in ts}
    held = {t for ts in digits.HELDOUT_TEMPLATES.values() for t in ts}
    assert not train_texts & held


def test_render_places_digits_in_their_slots() -> None:
    rng = np.random.default_rng(0)
    c = digits.render((digits.Item(3, "left", "medium"),), rng)
    assert c.shape == (32, 32) and 0 <= c.min() and c.max() <= 1
    assert c[:, :16].sum() > 10 * c[:, 16:].sum()


def test_two_digit_prompt_is_rendered_left_to_right() -> None:
    rng = np.random.default_rng(1)
    p = digits.sample_prompt(rng, category="two_digits")
    a, b = p.items
    assert (a.slot, b.slot) == ("left", "right") and a.digit != b.digit
    assert f"{a.digit}" in p.text and f"{b.digit}" in p.text


def test_tokenizers_know_the_whole_vocabulary() -> None:
    clip, t5 = clip_tokenizer(), t5_tokenizer()
    for w in digits.VOCABULARY:
        ids = clip(w).input_ids
        assert ids[0] == clip.bos_token_id and ids[-1] == clip.eos_token_id and clip.unk_token_id not in ids[1:-1], w
        assert t5.unk_token_id not in t5(w).input_ids, w
    assert clip.unk_token_id in clip("zebra").input_ids[1:-1]
