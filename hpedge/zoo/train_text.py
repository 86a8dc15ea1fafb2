"""Pre-training of the digits pipelines' text encoders (``python -m hpedge.zoo.train flux-t5 | sd3-text``).

Each encoder learns to name, slot by slot (left, center, right), the digit and size a prompt asks for: a small
readout on its states is trained with it, so that the states carry what the transformer will need.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from hpedge.models.denoise import encode
from hpedge.zoo.build import FLUX_TRANSFORMER, TEXT_HIDDEN, _t5_config, new_pipeline
from hpedge.zoo.digits import CATEGORIES, SIZES, sample_prompt
from hpedge.zoo.text import MAX_LENGTH as MAX_SEQUENCE_LENGTH
from hpedge.zoo.text import t5_tokenizer

SD3_TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")  # CLIP-L, CLIP-G, T5 stand-ins


SLOTS = ("left", "center", "right")


SLOT_SIZES = ("none", *SIZES)


def slot_labels(items) -> tuple[list[int], list[int]]:
    """Per canvas slot (left, center, right): the digit (10 = empty) and the size index (0 = empty)."""
    digits, sizes = [10] * len(SLOTS), [0] * len(SLOTS)
    for it in items:
        digits[SLOTS.index(it.slot)] = it.digit
        sizes[SLOTS.index(it.slot)] = SLOT_SIZES.index(it.size)
    return digits, sizes


def slot_readout(d_model: int):  # -> torch.nn.Module
    """Reads text-encoder token outputs as an unordered set, as both transformers do (FLUX gives its text tokens
    all position 0, SD3 none): one learned query per canvas slot attends over all tokens (padding included, as the
    pipeline passes them), then predicts the slot's digit (11 classes with "empty") and size (4 classes)."""
    import torch

    class Readout(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.query = torch.nn.Parameter(torch.randn(len(SLOTS), d_model) * d_model**-0.5)
            self.key = torch.nn.Linear(d_model, d_model)
            self.value = torch.nn.Linear(d_model, d_model)
            self.out = torch.nn.Linear(d_model, 11 + len(SLOT_SIZES))

        def forward(self, h):  # (batch, tokens, d) -> (batch, slots, 15)
            att = torch.softmax(torch.einsum("sd,btd->bst", self.query, self.key(h)) / d_model**0.5, -1)
            return self.out(torch.einsum("bst,btd->bsd", att, self.value(h)))

    return Readout()


def _slot_batch(rng, n: int, heldout: bool = False):
    """n grammar prompts (10 % of the training ones empty, as in the diffusion stages) with each slot's digit and
    size as targets: (texts, digits (n, 3), sizes (n, 3), categories)."""
    import torch

    prompts = [sample_prompt(rng, heldout=heldout) for _ in range(n)]
    keep = [heldout or rng.random() > 0.1 for _ in prompts]
    texts = [p.text if k else "" for p, k in zip(prompts, keep)]
    labels = [slot_labels(p.items if k else ()) for p, k in zip(prompts, keep)]
    cats = [p.category if k else "empty" for p, k in zip(prompts, keep)]
    return texts, torch.tensor([lb[0] for lb in labels]), torch.tensor([lb[1] for lb in labels]), cats


def _slot_loss(o, digits, sizes):  # o: (batch, slots, 15) readout logits
    import torch

    loss = torch.nn.functional.cross_entropy(o[..., :11].flatten(0, 1), digits.flatten())
    return loss + torch.nn.functional.cross_entropy(o[..., 11:].flatten(0, 1), sizes.flatten())


def _slot_correct(o, digits, sizes):  # per prompt: every slot's digit and size named
    return ((o[..., :11].argmax(-1) == digits).all(-1) & (o[..., 11:].argmax(-1) == sizes).all(-1)).numpy()


def _slot_accuracy(rng, readouts) -> dict:
    """Fraction of 2000 prompts per split (training / held-out phrasings) and category whose every slot a readout
    names; ``readouts(texts)`` -> {name: logits}. Returns {readout: {split: {category: accuracy}}}."""
    import torch

    accuracy: dict = {}
    with torch.no_grad():
        for split in ("train", "heldout"):
            texts, digits, sizes, cats = _slot_batch(rng, 2000, heldout=split == "heldout")
            cats_a = np.array(cats)
            for name, o in readouts(texts).items():
                ok = _slot_correct(o, digits, sizes)
                accuracy.setdefault(name, {})[split] = {c: round(float(ok[cats_a == c].mean()), 3) for c in CATEGORIES}
    return accuracy


def train_t5(out: Path, steps: int, seed: int, batch_size: int = 128) -> dict:
    """Pre-train FLUX's T5 encoder so that its tokens carry their context (stage ``flux-t5``).

    Stand-in for language pre-training: the real pipelines use a frozen, pre-trained T5-XXL whose tokens know
    their neighbours. A 2-layer T5 trained only through the diffusion loss does not learn that (the same word at
    two places comes out nearly equal, benchmarks/results/binding.md), and FLUX, which gives every text token the
    same position, then reads the prompt as a bag of words and cannot put a digit on its side. The objective:
    from the tokens read as an unordered set (``slot_readout``), name each canvas slot's digit and size. Training
    phrasings only; the held-out phrasings are scored, never trained on. The readout is discarded.
    """
    import torch
    from transformers import T5EncoderModel

    d_model = FLUX_TRANSFORMER["joint_attention_dim"]
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    tok = t5_tokenizer()
    t5 = T5EncoderModel(_t5_config(d_model))
    head = slot_readout(d_model)

    def logits(texts):
        ids = tok(texts, padding="max_length", max_length=MAX_SEQUENCE_LENGTH, truncation=True, return_tensors="pt").input_ids
        return head(t5(ids).last_hidden_state)

    opt = torch.optim.AdamW([*t5.parameters(), *head.parameters()], 1e-3)
    t0 = time.time()
    for step in range(steps):
        texts, digits, sizes, _ = _slot_batch(rng, batch_size)
        loss = _slot_loss(logits(texts), digits, sizes)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 200 == 0 or step == steps - 1:
            print(f"[flux-t5] step {step} loss {float(loss.detach()):.4f} {time.time() - t0:.0f}s", flush=True)
    t5.eval()
    accuracy = _slot_accuracy(rng, lambda texts: {"t5": logits(texts)})["t5"]
    t5.save_pretrained(out / "t5-flux")
    return {"steps": steps, "batch_size": batch_size, "slot_accuracy": accuracy, "seconds": time.time() - t0}


def train_sd3_text(out: Path, steps: int, seed: int, batch_size: int = 128) -> dict:
    """Pre-train digits-sd3's three text encoders (stage ``sd3-text``), as ``train_t5`` does FLUX's T5.

    The real SD3 pipelines condition on pre-trained CLIP-L, CLIP-G and T5-XXL, all frozen. Here each encoder learns
    to carry the prompt in the form the pipeline hands the transformer (``encode``: the CLIPs' penultimate-layer
    tokens, side by side in the channels, then the T5 tokens, and the two CLIPs' pooled vectors): a set readout
    (``slot_readout``) per token block and a linear head per pooled vector each name every canvas slot's digit and
    size; the loss is their sum, so no encoder can leave the prompt to the others. Training phrasings only; the
    held-out phrasings are scored, never trained on. The readouts are discarded; the encoders are saved under
    ``OUT/text-sd3/<pipeline component>``: the recipe takes the T5 (``sd3 --t5-from OUT/text-sd3/text_encoder_3
    --freeze-t5``); ``sd3 --text-from OUT/text-sd3 --freeze-text`` takes all three (an experiment).
    """
    import torch

    pipe = new_pipeline("sd3", None)  # the encoders initialised exactly as a new digits-sd3's
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    n_slot = len(SLOTS) * (11 + len(SLOT_SIZES))
    t5_dim = pipe.text_encoder_3.config.d_model
    heads = torch.nn.ModuleDict({
        "clip_l": slot_readout(TEXT_HIDDEN), "clip_g": slot_readout(TEXT_HIDDEN), "t5": slot_readout(t5_dim),
        "clip_l_pooled": torch.nn.Linear(TEXT_HIDDEN, n_slot), "clip_g_pooled": torch.nn.Linear(TEXT_HIDDEN, n_slot),
    })
    encoders = [getattr(pipe, name) for name in SD3_TEXT_ENCODERS]

    def logits(texts) -> dict:
        cond = encode(pipe, texts, MAX_SEQUENCE_LENGTH)
        clip, t5 = cond.prompt_embeds[:, :-MAX_SEQUENCE_LENGTH], cond.prompt_embeds[:, -MAX_SEQUENCE_LENGTH:]
        b = len(texts)
        return {
            "clip_l": heads["clip_l"](clip[..., :TEXT_HIDDEN]), "clip_g": heads["clip_g"](clip[..., TEXT_HIDDEN:2 * TEXT_HIDDEN]),
            "t5": heads["t5"](t5),
            "clip_l_pooled": heads["clip_l_pooled"](cond.pooled[:, :TEXT_HIDDEN]).view(b, len(SLOTS), -1),
            "clip_g_pooled": heads["clip_g_pooled"](cond.pooled[:, TEXT_HIDDEN:]).view(b, len(SLOTS), -1),
        }

    opt = torch.optim.AdamW([*(p for m in encoders for p in m.parameters()), *heads.parameters()], 1e-3)
    t0 = time.time()
    for step in range(steps):
        texts, digits, sizes, _ = _slot_batch(rng, batch_size)
        losses = {k: _slot_loss(o, digits, sizes) for k, o in logits(texts).items()}
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 200 == 0 or step == steps - 1:
            print(f"[sd3-text] step {step} loss {float(loss.detach()):.4f} "
                  f"({', '.join(f'{k} {float(v.detach()):.3f}' for k, v in losses.items())}) {time.time() - t0:.0f}s", flush=True)
    for m in encoders:
        m.eval()
    accuracy = _slot_accuracy(rng, logits)
    for name, m in zip(SD3_TEXT_ENCODERS, encoders):
        m.save_pretrained(out / "text-sd3" / name)
    return {"steps": steps, "batch_size": batch_size, "slot_accuracy": accuracy, "seconds": time.time() - t0}


