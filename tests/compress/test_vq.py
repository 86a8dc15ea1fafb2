"""Vector quantization (VQDM / AQLM-style additive codebooks): bits as configured, weights equal to the codebook sum
times scales, the fit, fine-tuning and its resume, storage beside a stock pipeline, bad presets."""
from __future__ import annotations

import json

import pytest
import torch

from hpedge.compress.pipeline import work_dir
from hpedge.compress.sparsity import pruned_layers
from hpedge.compress.vq import (
    FILE,
    VQSpec,
    beam_search,
    dequantize,
    fit_layer,
    load_quantized,
    output_error,
    read,
    vq_layers,
)
from hpedge.errors import HpedgeError
from tests.compress.cli_helpers import assert_refused
from tests.compress.cli_helpers import compress as _compress


def test_presets_and_explicit_formats_give_their_bits() -> None:
    assert [VQSpec.parse(p).code_bits for p in ("2bit", "3bit", "4bit")] == [2.0, 3.0, 4.0]
    s = VQSpec.parse("1x16g8")
    assert (s.codebooks, s.bits, s.group, s.code_bits, s.name) == (1, 16, 8, 2.0, "1x16g8")


@pytest.mark.parametrize("text, message", [("3 bits", "give a preset"), ("2x17g8", "give 1 to 16"),
                                           ("0x8g8", "give 1 to 8"), ("2x8g0", "give 1 to 64")])
def test_bad_formats_are_refused(text: str, message: str) -> None:
    with pytest.raises(HpedgeError, match=message):
        VQSpec.parse(text).check()


@pytest.mark.parametrize("bits", [1, 3, 4, 8, 11, 16])
def test_codes_pack_to_their_bits_and_back(bits: int) -> None:
    from hpedge.models.codebooks import pack, unpack

    codes = torch.randint(0, 2 ** bits, (5, 7, 3), generator=torch.Generator().manual_seed(bits))
    data = pack(codes, bits)
    assert data.dtype == torch.uint8 and data.numel() == -(-codes.numel() * bits // 8)
    assert torch.equal(unpack(data, bits, (5, 7, 3)).long(), codes)


def test_dequantized_weight_is_the_codebook_sum_times_the_row_scales() -> None:
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (3, 5, 2), generator=g).to(torch.uint8)
    books, scales = torch.randn(2, 16, 4, generator=g), torch.rand(3, 1, generator=g) + 0.5
    w = dequantize(codes, books, scales)
    assert w.shape == (3, 20)
    for o in range(3):
        for j in range(5):
            want = (books[0][codes[o, j, 0].long()] + books[1][codes[o, j, 1].long()]) * scales[o]
            assert torch.equal(w[o, 4 * j:4 * j + 4], want)


def test_beam_search_finds_the_exact_codes_of_a_weight_made_of_codewords_and_never_worsens() -> None:
    g = torch.Generator().manual_seed(1)
    books = torch.randn(2, 16, 4, generator=g)
    true = torch.randint(0, 16, (200, 2), generator=g)
    v = books[0][true[:, 0]] + books[1][true[:, 1]]
    d = torch.ones_like(v)
    start = torch.randint(0, 16, (200, 2), generator=g)
    found = beam_search(v, d, books, start, beam=16)
    recon = books[0][found[:, 0]] + books[1][found[:, 1]]
    assert torch.allclose(recon, v, atol=1e-5)
    narrow = beam_search(v, d, books, start, beam=1)
    err = lambda c: ((books[0][c[:, 0]] + books[1][c[:, 1]] - v) ** 2).sum(1)  # noqa: E731
    assert (err(narrow) <= err(start) + 1e-6).all()


def test_fitting_a_layer_lowers_its_output_error_with_more_bits() -> None:
    g = torch.Generator().manual_seed(2)
    w = torch.randn(32, 64, generator=g) * 0.05
    x = torch.randn(500, 64, generator=g) * torch.linspace(0.2, 2.0, 64)
    h = x.T @ x / 500
    errs = []
    for text in ("1x4g4", "2x4g4", "3x4g4"):
        f = fit_layer(w, h, VQSpec.parse(text))
        assert f.codes.dtype == torch.uint8 and f.codes.shape == (32, 16, int(text[0]))
        assert f.error <= f.error_start + 1e-9
        assert abs(output_error(w, dequantize(f.codes, f.codebooks, f.scales), h) - f.error) < 1e-6
        errs.append(f.error)
    assert errs[0] > errs[1] > errs[2]


def test_compress_with_vq_fine_tunes_codebooks_keeps_codes_and_writes_both_forms(real_pipelines, tmp_path) -> None:
    """SD3.5-medium's real configuration (tiny): blocks removed, every block layer quantized at 3x4g4, fine-tuned;
    OUT loads in stock diffusers with weights equal to the VQ file's dequantized ones; the fine-tuning moved the
    codebooks, not the codes; the bits per weight are what the format says."""
    from diffusers import DiffusionPipeline

    src, out = real_pipelines["sd3.5-medium"], tmp_path / "out"
    r = _compress(src, out, "--remove-blocks", "2,", "--sgd", "off", "--no-pwp", "--steps", "3", "--lr", "1e-2",
                  "--vq", "3x4g4", "--vq-tune-steps", "5")
    assert r.exit_code == 0, r.output
    report = json.loads((out / "hpedge_compress.json").read_text())
    vq = report["vq"]
    assert vq["name"] == "3x4g4" and vq["code_bits_per_weight"] == 3.0 and vq["file"] == FILE
    assert vq["bits_per_weight"]["codes"] == 3.0  # 3 codes of 4 bits per group of 4 weights, bit-packed
    # + 3 codebooks of 16 x 4 float32 and a float32 scale per row (a large share at these tiny widths), as in the file
    bpw = vq["bits_per_weight"]
    header = 8 + int.from_bytes((out / FILE).read_bytes()[:8], "little")  # safetensors: u64 length + JSON header
    payload = vq["file_bytes"] - header  # each layer's packed codes round up to a whole byte
    assert 3.0 < bpw["total"] < 5.0 and -1e-6 <= payload - bpw["total"] * bpw["weights"] / 8 < len(vq["layers"])
    assert all(v["error"] <= v["error_start"] + 1e-9 for v in vq["layers"].values())
    assert "vector quantization 3x4g4" in r.output
    student = DiffusionPipeline.from_pretrained(out)  # stock diffusers, dense weights
    layers = pruned_layers(student.transformer)
    assert set(layers) == set(vq["layers"])
    spec, t = read(out / FILE)
    assert spec.name == "3x4g4"
    for name, m in layers.items():
        assert torch.equal(m.weight, dequantize(t[f"{name}.codes"], t[f"{name}.codebooks"], t[f"{name}.scales"]))
    assert not work_dir(out).exists()  # the fitted codes of the work folder go with it
    loaded = DiffusionPipeline.from_pretrained(out).transformer
    load_quantized(loaded, out / FILE)
    assert set(vq_layers(loaded)) == set(vq["layers"])


def test_vq_fine_tuning_resumes_from_its_checkpoint_with_the_fitted_codes(real_pipelines, tmp_path, monkeypatch) -> None:
    """A run killed after its step-2 checkpoint resumes with the codes fitted before (not fitted again) and ends where
    an uninterrupted run ends."""
    import hpedge.compress.distill as dist
    import hpedge.compress.vq as vqmod

    src = real_pipelines["flux.1-schnell"]
    args = ("--steps", "4", "--lr", "1e-2", "--checkpoint-every", "2", "--vq", "2x4g4", "--vq-tune-steps", "5")
    full, part = tmp_path / "full", tmp_path / "part"
    assert _compress(src, full, *args).exit_code == 0
    real_save = dist._save_checkpoint

    def save_then_die(procs, ckdir, state, keep):
        real_save(procs, ckdir, state, keep)
        raise KeyboardInterrupt

    monkeypatch.setattr(dist, "_save_checkpoint", save_then_die)
    assert _compress(src, part, *args).exit_code != 0
    assert not part.exists() and (work_dir(part) / "vq-start.safetensors").exists()
    monkeypatch.setattr(dist, "_save_checkpoint", real_save)

    def no_refit(*a, **k):
        raise AssertionError("a resumed run fits its codes again")

    monkeypatch.setattr(vqmod, "fit_layer", no_refit)
    r = _compress(src, part, *args, "--resume")
    assert r.exit_code == 0, r.output
    assert json.loads((part / "hpedge_compress.json").read_text())["resumed_from_step"] == 2
    _, a = read(full / FILE)
    _, b = read(part / FILE)
    assert set(a) == set(b)
    for k in a:
        if k.endswith(".codes"):
            assert torch.equal(a[k], b[k])
        else:
            assert torch.allclose(a[k], b[k], atol=1e-5), k


@pytest.mark.parametrize("args, message", [
    (["--vq", "3x8g7"], "not a multiple of the group size 7"),
    (["--vq", "2x17g8"], "give 1 to 16"),
    (["--vq", "3bit", "--sparsity", "transformer=0.3"], "give one of them"),
])
def test_bad_vq_input_is_one_line_and_writes_nothing(real_pipelines, tmp_path, args, message) -> None:
    out = tmp_path / "out"
    assert_refused(_compress(real_pipelines["sd3.5-large"], out, "--steps", "1", *args), out, message)
