"""Tokenizers for the digits pipelines, built from the grammar's closed vocabulary.

They are real transformers tokenizers of the classes the stock pipelines use (``CLIPTokenizer``:
byte-level BPE with ``</w>`` word ends; ``T5Tokenizer``: unigram with ``▁`` word starts), only with a
vocabulary of a few dozen entries instead of 49k/32k, so the text encoders' embedding tables stay tiny.
"""

from __future__ import annotations

from hpedge.zoo.digits import VOCABULARY

MAX_LENGTH = 16
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"


def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    vocab: dict[str, int] = {}
    chars = sorted({c for w in VOCABULARY for c in w})
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for w in VOCABULARY:
        cur = w[0]
        for i, ch in enumerate(w[1:], 1):
            nxt = ch + ("</w>" if i == len(w) - 1 else "")
            merge = (cur, nxt)
            if merge not in merges:
                merges.append(merge)
            cur += nxt
            vocab.setdefault(cur, len(vocab))
    vocab.setdefault(CLIP_BOS, len(vocab))
    vocab.setdefault(CLIP_EOS, len(vocab))
    return vocab, merges


def clip_tokenizer():  # -> transformers.CLIPTokenizer
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_LENGTH)


def t5_tokenizer():  # -> transformers.T5Tokenizer
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -5.0)]
    pieces += [("▁" + w, -1.0) for w in VOCABULARY]
    pieces += [(w, -2.0) for w in VOCABULARY if w not in {"▁" + v for v in VOCABULARY}]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=MAX_LENGTH)
