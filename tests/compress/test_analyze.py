import json

import numpy as np
import torch

from hpedge.compress.analyze import AnalysisSettings, ablated, analyze, heatmap
from hpedge.compress.importance import load
from hpedge.models.denoise import encode, predict
from hpedge.models.loading import load_pipeline


def test_ablation_changes_output_and_restores(random_pipeline) -> None:
    pipe = load_pipeline(str(random_pipeline))
    tr = pipe.transformer
    x = torch.randn(1, 4, 16, 16)
    sigma = torch.tensor([0.5])
    with torch.no_grad():
        cond = encode(pipe, ["a 3"], 16)
        base = predict(tr, x, sigma, cond)
        with ablated(tr, 1):
            skipped = predict(tr, x, sigma, cond)
        with ablated(tr, 1, "attn"):
            no_attn = predict(tr, x, sigma, cond)
        again = predict(tr, x, sigma, cond)
    assert not torch.allclose(base, skipped) and not torch.allclose(base, no_attn)
    assert torch.equal(base, again)


def test_analysis_scores_every_block_and_resumes(random_sd3, tmp_path) -> None:
    pipe = load_pipeline(str(random_sd3))
    out = tmp_path / "imp.json"
    s = AnalysisSettings(prompts=5, steps=2, components=False)
    calls = []
    imp = analyze(pipe, random_sd3, out, s, progress=lambda w, k, n: calls.append(k))
    assert sorted(imp.block_harm()) == list(range(12))
    assert all(v >= 0 for v in imp.block_harm().values())
    assert load(out).block_harm() == imp.block_harm()
    # a partial file from an interrupted run is picked up: fake one with half the entries
    data = json.loads(out.read_text())
    out.unlink()
    partial = {"fingerprint": data["fingerprint"],
               "entries": {f"{e['block']}\t": {"harm": 123.0, "distortion": 0.0, "accuracy": 0.0}
                           for e in data["entries"][:6]}}
    (tmp_path / "imp.json.partial").write_text(json.dumps(partial))
    imp2 = analyze(pipe, random_sd3, out, s)
    harms = imp2.block_harm()
    assert sum(1 for v in harms.values() if v == 123.0) == 6 and len(harms) == 12
    heatmap(imp2, tmp_path / "h.png")
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"
    assert np.isfinite(list(harms.values())).all()
