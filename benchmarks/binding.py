"""Benchmark: binding (run through ``python benchmarks/run.py binding``)."""

from __future__ import annotations

import argparse

from common import header, write, write_json
from quality import SCORES_HEAD, scores_row


# --------------------------------------------------------------------------------------------- binding
BINDING_PROMPTS = {"a": "a 3 on the left and a 7 on the right", "swap": "a 7 on the left and a 3 on the right",
                   "change": "a 3 on the left and a 3 on the right"}


def binding(_args: argparse.Namespace) -> None:
    """How far the text conditioning moves when two digits swap sides vs when one digit changes."""
    import torch

    from hpedge.zoo.text import MAX_LENGTH as MAX_SEQUENCE_LENGTH  # the digits pipelines (benchmark on the zoo)
    from hpedge.models.loading import load_pipeline

    def rel(u, v) -> float:
        return float((u - v).norm() / u.norm())

    text = header("Text conditioning: relative change (|e(x) - e(a)| / |e(a)|) when the digits swap sides or one changes")
    text += "".join(f"- {k}: \"{v}\"\n" for k, v in BINDING_PROMPTS.items())
    text += ("\nLast column: the T5 encoder's output for the same word at two places in prompt a (\"on\", tokens 2 and 8), "
             "relative difference; near 0 means the encoder does not mix context into its tokens, and FLUX, whose text tokens "
             "all share one position (txt_ids = 0), then sees the prompt as a bag of words.\n")
    text += ("\n| model | sequence: swap | sequence: change | pooled: swap | pooled: change | T5: \"on\" at 2 vs 8 |\n"
             "|---|---|---|---|---|---|\n")
    for fam in ("sd3", "flux"):
        pipe = load_pipeline(f"zoo:digits-{fam}")
        emb = {}
        with torch.no_grad():
            for k, x in BINDING_PROMPTS.items():
                if fam == "sd3":  # (prompt_embeds, negative, pooled, negative pooled)
                    e = pipe.encode_prompt(x, x, x, do_classifier_free_guidance=False, max_sequence_length=MAX_SEQUENCE_LENGTH)
                    emb[k] = (e[0], e[2])
                else:  # (prompt_embeds = T5 sequence, pooled = CLIP, text_ids)
                    e = pipe.encode_prompt(x, prompt_2=x, max_sequence_length=MAX_SEQUENCE_LENGTH)
                    emb[k] = (e[0], e[1])
            t5, tok = (pipe.text_encoder_3, pipe.tokenizer_3) if fam == "sd3" else (pipe.text_encoder_2, pipe.tokenizer_2)
            ids = tok(BINDING_PROMPTS["a"], padding="max_length", max_length=MAX_SEQUENCE_LENGTH, return_tensors="pt").input_ids
            words = tok.convert_ids_to_tokens(ids[0].tolist())
            on = [i for i, w in enumerate(words) if w.lstrip("\u2581") == "on"]
            seq = t5(ids)[0][0].float()
        a = emb["a"]
        text += (f"| zoo:digits-{fam} | {rel(a[0], emb['swap'][0]):.3f} | {rel(a[0], emb['change'][0]):.3f} | "
                 f"{rel(a[1], emb['swap'][1]):.3f} | {rel(a[1], emb['change'][1]):.3f} | {rel(seq[on[0]], seq[on[1]]):.4f} |\n")
    write("binding.md", text)


def text_paths(args: argparse.Namespace) -> None:
    """Which text path carries what in a FLUX pipeline: the eval benchmark sampled with the pooled CLIP vector,
    or the T5 sequence, replaced by the empty prompt's (at inference only)."""
    from dataclasses import asdict

    import torch

    from hpedge.zoo.evaluate import EvalSettings, evaluate
    from hpedge.models.denoise import family_of
    from hpedge.zoo.text import MAX_LENGTH as MAX_SEQUENCE_LENGTH
    from hpedge.models.loading import load_pipeline

    es = EvalSettings(per_category=args.per_category)
    text = header(f"FLUX text paths: eval ({es.per_category * 5} prompts, guidance {es.guidance:g}) with one conditioning path "
                  "replaced by the empty prompt's")
    text += ("'empty pooled': the pooled CLIP vector of every prompt replaced by the empty prompt's, so the prompt reaches the "
             "model only through the T5 sequence; 'empty sequence': the T5 sequence replaced instead, so only the pooled vector "
             "carries it. Chance for `single` is about 0.1.\n\n" + SCORES_HEAD)
    out = {}
    for m in args.models:
        pipe = load_pipeline(m)
        if family_of(pipe) != "flux":
            raise SystemExit(f"{m}: text-paths probes FLUX pipelines (pooled CLIP vector + T5 sequence)")
        encode_prompt = pipe.encode_prompt
        with torch.no_grad():
            empty_seq, empty_pooled, _ = encode_prompt("", prompt_2="", max_sequence_length=MAX_SEQUENCE_LENGTH)
        for mode in ("normal", "empty pooled", "empty sequence"):
            def patched(prompt, prompt_2=None, _mode=mode, _enc=encode_prompt, _seq=empty_seq, _pooled=empty_pooled, **kw):
                seq, pooled, ids = _enc(prompt, prompt_2=prompt_2, **kw)
                if _mode == "empty pooled":
                    pooled = _pooled.expand_as(pooled).clone()
                elif _mode == "empty sequence":
                    seq = _seq.expand_as(seq).clone()
                return seq, pooled, ids

            pipe.encode_prompt = patched
            r = asdict(evaluate(pipe, f"{m} ({mode})", es)[0])
            out[r["model"]] = r
            text += scores_row(r["model"], r)
            print(r["model"], r["overall"], flush=True)
    write("text-paths.md", text)
    write_json("text-paths.json", out)
