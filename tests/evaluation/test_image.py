"""Grids people look at: teacher rows directly above student rows, captions wrapped, not cut."""

import numpy as np
from PIL import Image

from hpedge.compress.pipeline import teacher_student_rows
from hpedge.evaluation.image import CHAR_PX, LINE_PX, save_grid


def _cells(path, cols, scale):
    img = np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255
    cell = 32 * scale
    return img, cell


def test_teacher_rows_sit_above_their_student_rows_for_any_prompt_count(tmp_path) -> None:
    cols, scale, n = 8, 1, 11  # 11 prompts: a full row pair and a short one
    teacher = [np.zeros((32, 32))] * n  # black
    student = [np.full((32, 32), 0.5)] * n  # grey
    prompts = [f"p{i}" for i in range(n)]
    tiles, labels = teacher_student_rows(teacher, student, prompts, cols)
    assert len(tiles) == 4 * cols
    save_grid(tiles, labels, tmp_path / "g.png", cols=cols, scale=scale)
    img, cell = _cells(tmp_path / "g.png", cols, scale)
    row_h = img.shape[0] // 4
    for pair in range(2):
        for k in range(cols):
            t = img[2 * pair * row_h + cell // 2, k * cell + cell // 2]
            s = img[(2 * pair + 1) * row_h + cell // 2, k * cell + cell // 2]
            used = pair * cols + k < n
            expect = (0.0, 127 / 255) if used else (1.0, 1.0)  # black teacher over grey student, or both blank
            assert np.allclose((t, s), expect), (pair, k, t, s)
    assert labels[2 * cols : 2 * cols + 3] == ["T: p8", "T: p9", "T: p10"] and labels[3 * cols] == "S: p8"


def test_long_captions_are_wrapped_not_cut(tmp_path) -> None:
    long = "a seven on the left and a small three on the right, both upright"
    save_grid([np.ones((32, 32))], ["short"], tmp_path / "a.png", cols=1, scale=4)
    save_grid([np.ones((32, 32))], [long], tmp_path / "b.png", cols=1, scale=4)
    ha, hb = Image.open(tmp_path / "a.png").height, Image.open(tmp_path / "b.png").height
    lines = -(-len(long) // ((128 - 4) // CHAR_PX))
    assert hb - ha >= (lines - 1) * LINE_PX - LINE_PX  # one line per wrap, the whole caption drawn
