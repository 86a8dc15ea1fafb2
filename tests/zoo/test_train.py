"""The training script is seeded end to end: two short runs give bit-identical weights."""

from pathlib import Path

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
