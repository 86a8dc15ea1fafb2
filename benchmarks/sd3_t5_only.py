"""Diagnostic: does an SD3 pipeline's transformer read the prompt from the T5 tokens?

Scores MODEL on the 500-prompt digits benchmark (as ``hpedge eval``) with both CLIPs' conditioning -- their tokens,
which come first in SD3's sequence, and their pooled vectors -- replaced by the empty prompt's, so the prompt reaches
the transformer through the T5 tokens alone. Usage: ``python benchmarks/sd3_t5_only.py MODEL`` (a digits-sd3 folder
or zoo name); prints one JSON line.
"""

import json
import sys

import torch

from hpedge.zoo.evaluate import evaluate
from hpedge.models.denoise import Conditioning
from hpedge.models.loading import load_pipeline
from hpedge.zoo.train import without_clip


def main(model: str) -> None:
    pipe = load_pipeline(model)
    encode_prompt = pipe.encode_prompt

    def t5_only(**kw):  # the pipeline's own encoding, then the training code's without_clip on every sample
        embeds, neg, pooled, neg_pooled = encode_prompt(**kw)
        e_embeds, _, e_pooled, _ = encode_prompt(**{**kw, "prompt": [""], "prompt_2": [""], "prompt_3": [""]})
        every = torch.ones(embeds.shape[0], dtype=torch.bool, device=embeds.device)
        cond = without_clip(pipe, Conditioning(embeds, pooled), Conditioning(e_embeds, e_pooled), every)
        return cond.prompt_embeds, neg, cond.pooled, neg_pooled

    pipe.encode_prompt = t5_only
    r, _, _ = evaluate(pipe, model)
    print(json.dumps({"model": model, "t5_only": True, "overall": r.overall, "seen_phrasings": r.seen_phrasings,
                      "heldout_phrasings": r.heldout_phrasings, **r.categories}))


if __name__ == "__main__":
    main(sys.argv[1])
