"""Diagnostic: does an SD3 pipeline's transformer read the prompt from the T5 tokens?

Scores MODEL on the 500-prompt digits benchmark (as ``hpedge eval``) with both CLIPs' conditioning -- their tokens,
which come first in SD3's sequence, and their pooled vectors -- replaced by the empty prompt's, so the prompt reaches
the transformer through the T5 tokens alone. Usage: ``python benchmarks/sd3_t5_only.py MODEL`` (a digits-sd3 folder
or zoo name); prints one JSON line.
"""

import json
import sys

import torch

from hpedge.evaluation.evaluate import evaluate
from hpedge.models.loading import load_pipeline


def main(model: str) -> None:
    pipe = load_pipeline(model)
    encode_prompt, n_clip = pipe.encode_prompt, pipe.tokenizer_max_length

    def t5_only(**kw):
        embeds, neg, _, neg_pooled = encode_prompt(**kw)
        empty = {**kw, "prompt": [""], "prompt_2": [""], "prompt_3": [""]}
        e_embeds, _, e_pooled, _ = encode_prompt(**empty)
        b = embeds.shape[0]
        embeds = torch.cat([e_embeds[:, :n_clip].expand(b, -1, -1), embeds[:, n_clip:]], dim=1)
        return embeds, neg, e_pooled.expand(b, -1), neg_pooled

    pipe.encode_prompt = t5_only
    r, _, _ = evaluate(pipe, model)
    print(json.dumps({"model": model, "t5_only": True, "overall": r.overall, "seen_phrasings": r.seen_phrasings,
                      "heldout_phrasings": r.heldout_phrasings, **r.categories}))


if __name__ == "__main__":
    main(sys.argv[1])
