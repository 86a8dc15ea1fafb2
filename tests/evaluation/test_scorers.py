import json

import numpy as np
import pytest
from typer.testing import CliRunner

from hpedge.cli import app
from hpedge.errors import HpedgeError
from hpedge.evaluation.scorers import load_scorer


@pytest.fixture(scope="module")
def local_clip(tmp_path_factory) -> str:
    """A tiny random CLIPModel saved as a local folder (what a user's downloaded CLIP would be)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from hpedge.testing import clip_tokenizer

    tok = clip_tokenizer(77)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.eos_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    folder = tmp_path_factory.mktemp("clip") / "clip"
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                            crop_size={"height": 32, "width": 32}), tokenizer=tok)
    proc.save_pretrained(folder)
    return str(folder)


def test_clip_scorer_scores_each_image_against_its_prompt(local_clip) -> None:
    s = load_scorer(f"clip={local_clip}")
    imgs = np.random.default_rng(0).random((3, 64, 48, 3)).astype(np.float32)
    a = s.score(imgs, ["a cat", "a dog", "a cube"])
    assert a.shape == (3,) and np.all(np.abs(a) <= 100)
    assert not np.allclose(a, s.score(imgs, ["a boat", "a tree", "a car"]))


def test_scorers_are_never_downloaded_and_unsupported_ones_say_why(tmp_path) -> None:
    with pytest.raises(HpedgeError, match="not found"):
        load_scorer(f"clip={tmp_path / 'missing'}")
    with pytest.raises(HpedgeError, match="hpsv2.*does not install"):
        load_scorer("hpsv2=/somewhere")
    with pytest.raises(HpedgeError, match="unknown scorer"):
        load_scorer("fid=/x")


def test_analysis_adds_the_scorers_drop_to_the_harm(real_pipelines, local_clip, tmp_path) -> None:
    out = tmp_path / "imp.json"
    r = CliRunner().invoke(app, ["analyze", str(real_pipelines["sd3.5-large-turbo"]), "-o", str(out), "--num-prompts",
                                 "2", "--resolution", "64", "--no-components", "--scorer", f"clip={local_clip}"])
    assert r.exit_code == 0, r.output
    imp = json.loads(out.read_text())
    assert "clip score drop" in imp["metric"] and imp["settings"]["scorer"]["name"] == "clip"
    entries = imp["entries"]
    assert all("score_drop" in e["details"] for e in entries)
    assert all(e["harm"] == pytest.approx(e["details"]["distortion"] + e["details"]["score_drop"]) for e in entries)
