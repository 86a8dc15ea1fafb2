"""The training script is seeded end to end: two short runs give bit-identical weights."""

from pathlib import Path

import pytest
from safetensors.torch import load_file

from hpedge.zoo import train


def _weights(folder: Path) -> dict:
    return {f.relative_to(folder).as_posix() + ":" + k: v for f in folder.rglob("*.safetensors") for k, v in load_file(str(f)).items()}


def test_short_training_runs_are_reproducible(tmp_path) -> None:
    for run in ("a", "b"):
        out = tmp_path / run
        train.main(["vae", "--steps", "2", "--out", str(out)])
        train.main(["flux", "--steps", "2", "--batch-size", "4", "--out", str(out)])
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys() and len(a) > 50
    assert all((a[k] == b[k]).all() for k in a)
    assert (tmp_path / "a" / "digits-flux" / "hpedge_zoo.json").exists()


def _plain_and(tmp_path, name: str, extra: list[str]):
    """Two 2-step FLUX trainings with the same seed, without and with ``extra``; their weights."""
    for run, args in (("plain", []), (name, extra)):
        out = tmp_path / run
        train.main(["vae", "--steps", "2", "--out", str(out)])
        train.main(["flux", "--steps", "2", "--batch-size", "4", "--out", str(out), *args])
    plain, other = _weights(tmp_path / "plain" / "digits-flux"), _weights(tmp_path / name / "digits-flux")
    assert plain.keys() == other.keys()
    return plain, other


def test_model_guidance_changes_the_target_and_is_recorded(tmp_path) -> None:
    import json


    plain, guided = _plain_and(tmp_path, "guided", ["--model-guidance", "0.5"])
    assert any(not (plain[k] == guided[k]).all() for k in plain)  # same seed and data, different target
    record = json.loads((tmp_path / "guided" / "train_record.json").read_text())
    assert record["flux"]["model_guidance"] == 0.5 and "--model-guidance 0.5" in record["flux"]["command"]
    with pytest.raises(SystemExit, match="model-guidance"):
        train.main(["flux", "--steps", "1", "--out", str(tmp_path / "plain"), "--model-guidance", "1.0"])


def test_category_weights_skew_the_prompt_draw_and_bad_weights_are_refused() -> None:
    import numpy as np

    prompts, canvases = train._canvases(np.random.default_rng(0), 200, category_weights=train.parse_category_weights("two_digits=8"))
    share = sum(p.category == "two_digits" for p in prompts) / len(prompts)
    assert 0.55 < share < 0.85 and canvases.shape == (200, 32, 32)  # 8 / 12 expected, uniform would give 0.2
    uniform, _ = train._canvases(np.random.default_rng(0), 200)
    assert sum(p.category == "two_digits" for p in uniform) / 200 < 0.35
    for bad in ("colour=2", "size", "size=abc", "size=0"):
        with pytest.raises(SystemExit, match="category-weights"):
            train.parse_category_weights(bad)


def test_drop_pooled_changes_only_the_pooled_input_and_is_recorded(tmp_path) -> None:
    import json


    plain, dropped = _plain_and(tmp_path, "dropped", ["--drop-pooled", "0.5"])
    assert any(not (plain[k] == dropped[k]).all() for k in plain)  # same prompts and noise, some pooled vectors replaced
    record = json.loads((tmp_path / "dropped" / "train_record.json").read_text())
    assert record["flux"]["drop_pooled"] == 0.5 and "--drop-pooled 0.5" in record["flux"]["command"]
    with pytest.raises(SystemExit, match="drop-pooled"):
        train.main(["flux", "--steps", "1", "--out", str(tmp_path / "plain"), "--drop-pooled", "1.0"])


def test_random_draws_match_the_committed_recipe_on_any_device() -> None:
    """The committed models drew latent samples with ``latent_dist.sample()`` and the flow noise with
    ``randn_like`` of the latent, on the CPU. Training now draws both on the CPU explicitly and moves them to
    ``--device``: the same numbers, so a GPU replay of the recorded commands sees the committed models' data."""
    import numpy as np
    import torch

    from hpedge.zoo.build import new_vae

    torch.manual_seed(0)
    vae = new_vae()
    _, c = train._canvases(np.random.default_rng(0), 3)
    x = torch.from_numpy(c)[:, None] * 2 - 1
    with torch.no_grad():
        post = vae.encode(x).latent_dist
        torch.manual_seed(1)
        old = post.sample()
        old_noise = torch.randn_like(old)
        torch.manual_seed(1)
        new = train.latent_sample(post)
        new_noise = train.flow_noise(new)
    assert old.shape == new_noise.shape and torch.equal(old, new) and torch.equal(old_noise, new_noise)


def test_a_cuda_device_without_a_gpu_is_refused(tmp_path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible here, so --device cuda is valid")
    with pytest.raises(SystemExit, match="no CUDA GPU"):
        train.main(["flux", "--steps", "1", "--out", str(tmp_path), "--device", "cuda"])


def test_a_pipeline_stage_without_a_vae_in_out_is_refused(tmp_path) -> None:
    with pytest.raises(SystemExit, match="no VAE there.*vae --out"):
        train.main(["sd3", "--steps", "1", "--out", str(tmp_path / "fresh")])
    assert not (tmp_path / "fresh").exists()  # refused before anything is written


@pytest.mark.slow  # a zoo training recipe (the test fixture's, not the product's): about a minute
def test_t5_pretraining_teaches_slot_binding_and_a_frozen_t5_is_kept_exactly(tmp_path) -> None:
    """Stage flux-t5 pre-trains the T5 so that an order-free readout of its tokens names each slot's digit; a
    FLUX stage started from it with --freeze-t5 changes everything but the T5, and records both flags."""
    import json


    out = tmp_path / "t"
    train.main(["flux-t5", "--steps", "1000", "--out", str(out)])
    record = json.loads((out / "train_record.json").read_text())
    acc = record["flux-t5"]["slot_accuracy"]
    # two_digits needs binding: a bag of words names it at most by chance (the two sides are symmetric, 0.18 after
    # 150 steps). Binding appears abruptly, at 500-800 steps depending on the thread count's rounding (600 steps:
    # 1.00 at 2 threads, 0.60 at 1); the stage's default 1000 steps bind the training phrasings at either count
    assert acc["train"]["two_digits"] > 0.9 and acc["train"]["single"] > 0.9
    assert set(acc["heldout"]) == set(acc["train"])  # held-out phrasings are scored, never trained on
    t5 = _weights(out / "t5-flux")
    train.main(["vae", "--steps", "2", "--out", str(out)])
    train.main(["flux", "--steps", "2", "--batch-size", "4", "--out", str(out), "--t5-from", str(out / "t5-flux"), "--freeze-t5"])
    pipe = _weights(out / "digits-flux")
    assert all((pipe["text_encoder_2/" + k].float() == t5[k].half().float()).all() for k in t5)  # saved in fp16
    assert "--t5-from" in json.loads((out / "train_record.json").read_text())["flux"]["command"]
    with pytest.raises(SystemExit, match="t5-from"):  # a continued stage keeps its own pipeline's T5
        train.main(["flux", "--steps", "1", "--out", str(out), "--init-from", str(out / "digits-flux"), "--t5-from", str(out / "t5-flux")])
    with pytest.raises(SystemExit, match="a T5 of width 64, digits-sd3 needs 128"):  # FLUX's T5 is not SD3's
        train.main(["sd3", "--steps", "1", "--out", str(out), "--t5-from", str(out / "t5-flux")])
    with pytest.raises(SystemExit, match="no T5 encoder there"):
        train.main(["flux", "--steps", "1", "--out", str(out), "--t5-from", str(out / "vae" / "missing")])


@pytest.mark.slow  # a zoo training recipe (the test fixture's, not the product's): about a minute
def test_sd3_text_pretraining_teaches_every_encoder_the_prompt_and_frozen_encoders_are_kept_exactly(tmp_path) -> None:
    """Stage sd3-text pre-trains CLIP-L, CLIP-G and T5 so that each one's part of the pipeline's conditioning (token
    block or pooled vector) names every slot; an sd3 stage started from them with --freeze-text changes the
    transformer only, and records both flags."""
    import json

    out = tmp_path / "t"
    train.main(["sd3-text", "--steps", "200", "--out", str(out)])
    acc = json.loads((out / "train_record.json").read_text())["sd3-text"]["slot_accuracy"]
    assert set(acc) == {"clip_l", "clip_g", "t5", "clip_l_pooled", "clip_g_pooled"}
    # after 30 steps no readout names a single prompt's slots (measured: 0.0 everywhere); by 200 each readout names
    # those of the training phrasings of one digit and of a placed digit (measured: 1.0 for all five)
    assert all(acc[r]["train"]["single"] > 0.9 and acc[r]["train"]["position"] > 0.9 for r in acc)
    assert all(set(a["heldout"]) == set(a["train"]) for a in acc.values())  # held-out phrasings scored, never trained on
    text = _weights(out / "text-sd3")
    assert {k.split("/")[0] for k in text} == {"text_encoder", "text_encoder_2", "text_encoder_3"}
    train.main(["vae", "--steps", "2", "--out", str(out)])
    # the recipe: sd3-text's T5, frozen; both CLIPs new (not the pre-trained ones) and trained with the pipeline
    train.main(["sd3", "--steps", "2", "--batch-size", "4", "--out", str(out), "--t5-from", str(out / "text-sd3" / "text_encoder_3"),
                "--freeze-t5"])
    pipe = _weights(out / "digits-sd3")
    t5 = [k for k in text if k.startswith("text_encoder_3/")]
    assert t5 and all((pipe[k].float() == text[k].half().float()).all() for k in t5)
    clip = [k for k in text if not k.startswith("text_encoder_3/") and text[k].dtype.is_floating_point and text[k].numel() > 1000]
    assert clip and not any((pipe[k].float() == text[k].half().float()).all() for k in clip)
    train.main(["sd3", "--steps", "2", "--batch-size", "4", "--out", str(out), "--text-from", str(out / "text-sd3"), "--freeze-text"])
    pipe = _weights(out / "digits-sd3")
    assert all((pipe[k].float() == text[k].half().float()).all() for k in text)  # kept, saved in fp16
    train.main(["sd3", "--steps", "2", "--batch-size", "4", "--out", str(out), "--freeze-text", "--init-from", str(out / "digits-sd3")])
    pipe_c = _weights(out / "digits-sd3")
    moved = {k.split("/")[0] for k in pipe if not (pipe[k] == pipe_c[k]).all()}
    assert moved == {"transformer"}  # a continued stage with --freeze-text trains the transformer alone
    record = json.loads((out / "train_record.json").read_text())
    assert "--text-from" in record["sd3"]["command"] and record["sd3-continued"][0]["command"].count("--freeze-text") == 1
    with pytest.raises(SystemExit, match="text-from"):  # a continued stage keeps its own pipeline's encoders
        train.main(["sd3", "--steps", "1", "--out", str(out), "--init-from", str(out / "digits-sd3"), "--text-from", str(out / "text-sd3")])
    with pytest.raises(SystemExit, match="sd3 stage"):
        train.main(["flux", "--steps", "1", "--out", str(out), "--text-from", str(out / "text-sd3")])
    with pytest.raises(SystemExit, match="no text_encoder_3 there"):
        (out / "partial" / "text_encoder").mkdir(parents=True)
        (out / "partial" / "text_encoder" / "config.json").write_text("{}")
        (out / "partial" / "text_encoder_2").mkdir()
        (out / "partial" / "text_encoder_2" / "config.json").write_text("{}")
        train.main(["sd3", "--steps", "1", "--out", str(out), "--text-from", str(out / "partial")])


def test_drop_clip_replaces_only_the_clip_part_of_the_chosen_samples_and_is_recorded(tmp_path) -> None:
    """--drop-clip (sd3): the chosen samples get the empty prompt's CLIP tokens and pooled vector, keep their own T5
    tokens; the others are untouched. The flag changes training, is recorded, and is refused out of range or on flux."""
    import json

    import torch

    from hpedge.models.denoise import encode
    from hpedge.models.loading import load_pipeline

    pipe = load_pipeline("zoo:digits-sd3")
    prompts = ["a 3 on the left", "two 5s", "a big 7"]
    cond, empty = encode(pipe, prompts, 16), encode(pipe, [""], 16)
    out = train.without_clip(pipe, cond, empty, torch.tensor([True, False, True]))
    n = pipe.tokenizer_max_length
    assert n < cond.prompt_embeds.shape[1]  # CLIP tokens first, then T5 tokens
    for i in (0, 2):
        assert (out.prompt_embeds[i, :n] == empty.prompt_embeds[0, :n]).all() and (out.pooled[i] == empty.pooled[0]).all()
        assert not (out.prompt_embeds[i, :n] == cond.prompt_embeds[i, :n]).all()  # the prompt's CLIP part did differ
    assert (out.prompt_embeds[:, n:] == cond.prompt_embeds[:, n:]).all()  # every sample keeps its T5 tokens
    assert (out.prompt_embeds[1] == cond.prompt_embeds[1]).all() and (out.pooled[1] == cond.pooled[1]).all()

    base = tmp_path / "base"
    train.main(["vae", "--steps", "2", "--out", str(base)])
    for run, extra in (("plain", []), ("dropped", ["--drop-clip", "0.5"])):
        train.main(["sd3", "--steps", "2", "--batch-size", "4", "--out", str(base), *extra])
        (base / "digits-sd3").rename(tmp_path / run)
    plain, dropped = _weights(tmp_path / "plain"), _weights(tmp_path / "dropped")
    assert plain.keys() == dropped.keys() and any(not (plain[k] == dropped[k]).all() for k in plain)
    record = json.loads((base / "train_record.json").read_text())
    assert record["sd3"]["drop_clip"] == 0.5 and "--drop-clip 0.5" in record["sd3"]["command"]
    for bad in (["sd3", "--drop-clip", "1.0"], ["flux", "--drop-clip", "0.3"]):
        with pytest.raises(SystemExit, match="drop-clip"):
            train.main([*bad, "--steps", "1", "--out", str(base)])
