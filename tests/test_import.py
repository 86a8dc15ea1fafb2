import subprocess
import sys


def test_import_hpedge_does_not_import_torch() -> None:
    code = "import sys, hpedge, hpedge.cli, hpedge.targets.profiles, hpedge.errors; print('torch' in sys.modules, 'diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_no_direct_click_import() -> None:
    from pathlib import Path

    import hpedge

    for f in Path(hpedge.__file__).parent.rglob("*.py"):
        text = f.read_text()
        assert "import click" not in text and "from click" not in text, f
