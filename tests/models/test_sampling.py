import json
import shutil

import pytest

from hpedge.models.architectures import ARCHITECTURES, architecture, match
from hpedge.models.loading import load_pipeline
from hpedge.models.sampling import defaults


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_architecture_records_match_their_own_structure(name) -> None:
    a = architecture(name)
    assert match(a["family"], a["transformer"], hint=f"/models/{name}") == name
    assert a["defaults"]["guidance_kind"] in ("cfg", "distilled", "none")


def test_large_and_turbo_share_a_structure_the_folder_name_decides() -> None:
    cfg = ARCHITECTURES["sd3.5-large"][1]
    assert match("sd3", cfg, "/ckpt/stable-diffusion-3.5-large") == "sd3.5-large"
    assert match("sd3", cfg, "/ckpt/stable-diffusion-3.5-large-turbo") == "sd3.5-large-turbo"
    assert match("sd3", {**cfg, "pos_embed_max_size": 96}) is None


def test_defaults_come_from_the_architecture_or_the_zoo_marker(real_pipelines, random_sd3) -> None:
    d = defaults(load_pipeline(str(real_pipelines["flux.1-dev"])), real_pipelines["flux.1-dev"])
    assert (d.height, d.steps, d.guidance, d.guidance_kind, d.max_sequence_length) == (1024, 28, 3.5, "distilled", 512)
    d = defaults(load_pipeline(str(real_pipelines["sd3.5-large-turbo"])), real_pipelines["sd3.5-large-turbo"])
    assert (d.steps, d.guidance) == (4, 0.0)
    z = defaults(load_pipeline(str(random_sd3)), random_sd3)
    assert (z.height, z.max_sequence_length, z.source) == (32, 16, "hpedge_zoo.json")


def _one_line_error(result) -> str:
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


def test_an_unknown_scheduler_or_wrong_latent_channels_is_one_clear_line(real_pipelines, tmp_path) -> None:
    from typer.testing import CliRunner

    from hpedge.cli import app

    bad = shutil.copytree(real_pipelines["sd3.5-large"], tmp_path / "bad-scheduler")
    cfg = json.loads((bad / "scheduler" / "scheduler_config.json").read_text())
    (bad / "scheduler" / "scheduler_config.json").write_text(json.dumps({**cfg, "_class_name": "EulerDiscreteScheduler"}))
    index = json.loads((bad / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "EulerDiscreteScheduler"]
    (bad / "model_index.json").write_text(json.dumps(index))
    r = CliRunner().invoke(app, ["generate", str(bad), "a cat", "-o", str(tmp_path / "x.png"), "--steps", "1",
                                 "--height", "64", "--width", "64"])
    assert "unsupported scheduler EulerDiscreteScheduler" in _one_line_error(r)

    from diffusers import AutoencoderKL

    pipe = load_pipeline(str(real_pipelines["flux.1-schnell"]))
    pipe.vae = AutoencoderKL(latent_channels=4, block_out_channels=(8, 16, 16, 16), norm_num_groups=8,
                             down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    pipe.save_pretrained(tmp_path / "bad-vae")
    r = CliRunner().invoke(app, ["generate", str(tmp_path / "bad-vae"), "a cat", "-o", str(tmp_path / "y.png"),
                                 "--steps", "1", "--height", "64", "--width", "64"])
    assert "latent channels" in _one_line_error(r)


@pytest.mark.parametrize("name,negative", [("sd3.5-medium", None), ("sd3.5-medium", "blurry"), ("flux.1-dev", None),
                                           ("flux.1-schnell", None)])
def test_precomputed_prompt_embeddings_give_the_stock_call_s_images(name, negative) -> None:
    import torch

    from hpedge.models.sampling import prompt_embeddings, sample, with_overrides
    from hpedge.testing import tiny_pipeline

    pipe = tiny_pipeline(name)
    pipe.set_progress_bar_config(disable=True)
    d = with_overrides(defaults(pipe), height=64, width=64, steps=2)
    prompts = ["a red cube", "two blue spheres"]
    ref = sample(pipe, prompts, d, seeds=[1, 2], negative_prompt=negative)
    emb = prompt_embeddings(pipe, prompts, d, negative_prompt=negative)
    if d.guidance_kind == "cfg":
        assert "negative_prompt_embeds" in emb
    for attr in ("text_encoder", "text_encoder_2", "text_encoder_3"):  # the call must not need them
        if getattr(pipe, attr, None) is not None:
            getattr(pipe, attr).to("meta")
    got = sample(pipe, prompts, d, seeds=[1, 2], negative_prompt=negative, embeds=emb)
    assert torch.equal(torch.from_numpy(got), torch.from_numpy(ref))
    changed = dict(emb, prompt_embeds=emb["prompt_embeds"] * 1.5)  # and the embeddings are what it used
    assert not torch.equal(torch.from_numpy(sample(pipe, prompts, d, seeds=[1, 2], negative_prompt=negative,
                                                   embeds=changed)), torch.from_numpy(ref))
