"""Denoising trajectories: recording, per-position history, terminal rendering and replay, files by suffix.

A planted trajectory (block size 4, two blocks, two rows, one retraction) with a fake tokenizer; no model needed.
"""

from __future__ import annotations

import io
import json

import pytest
import torch

from llm2diff.sampling.trajectory import Trajectory
from llm2diff.sampling.trajectory_render import render_terminal, replay_terminal, save_trajectory

M = 99  # mask id
WORDS = {10: "The", 11: " cat", 12: " sat", 7: " <b>", 8: "\n", 15: "on", 16: " the", 17: " mat"}


class FakeTokenizer:
    def decode(self, ids):
        return "".join(WORDS.get(i, f"t{i}") for i in ids)


def planted() -> Trajectory:
    """Row 0, block 0: step 0 commits pos 1; step 1 pos 0 and 3; step 2 retracts pos 3 and commits pos 2;
    step 3 commits pos 3 again (a different token). Block 1: step 4 commits pos 4, 5; step 5 pos 6, 7.
    Row 1 commits a whole block at steps 0 and 4 and rides along otherwise."""
    t = Trajectory(block_size=4, mask_token_id=M, prompt_width=6)
    steps = [  # block, row 0 canvas, row 0 confidence, row 0 committed, row 0 remasked, row 1 committed
        (0, [M, 11, M, M], [0.1, 0.5, 0.2, 0.3], [0, 1, 0, 0], None, [1, 1, 1, 1]),
        (0, [10, 11, M, 13], [0.75, 0.5, 0.2, 0.25], [1, 0, 0, 1], None, [0, 0, 0, 0]),
        (0, [10, 11, 12, M], [0.75, 0.5, 0.875, 0.1], [0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]),
        (0, [10, 11, 12, 7], [0.75, 0.5, 0.875, 0.625], [0, 0, 0, 1], None, [0, 0, 0, 0]),
        (1, [8, 15, M, M], [1.0, 0.5, 0.1, 0.1], [1, 1, 0, 0], None, [1, 1, 1, 1]),
        (1, [8, 15, 16, 17], [1.0, 0.5, 0.25, 0.125], [0, 0, 1, 1], None, [0, 0, 0, 0]),
    ]
    for block, canvas, confidence, committed, remasked, committed_1 in steps:
        canvas_1 = [20 + 4 * block + i for i in range(4)]
        t.record(
            block=block,
            canvas=torch.tensor([canvas, canvas_1]),
            confidence=torch.tensor([confidence, [0.5] * 4]),
            committed=torch.tensor([committed, committed_1], dtype=torch.bool),
            remasked=None if remasked is None else torch.tensor([remasked, [0] * 4], dtype=torch.bool),
        )
    return t


def test_record_stores_cpu_lists_and_infers_rows():
    t = planted()
    assert (t.num_rows, t.num_steps, t.prompt_width) == (2, 6, 6)
    assert t.steps[2].canvas == [[10, 11, 12, M], [20, 21, 22, 23]]
    assert t.steps[2].remasked == [[False, False, False, True], [False] * 4]
    assert t.steps[0].remasked is None
    t.record(block=2, canvas=torch.full((2, 4), M), confidence=torch.full((2, 4), 0.123456),
             committed=torch.zeros(2, 4, dtype=torch.bool), remasked=torch.zeros(2, 4, dtype=torch.bool))
    assert t.steps[-1].confidence == [[0.1235] * 4] * 2  # rounded to 4 decimals
    assert t.steps[-1].remasked is None  # nothing retracted: not stored


def test_record_rejects_wrong_shapes():
    t = planted()
    with pytest.raises(ValueError, match=r"confidence has shape \(2, 3\), expected \(rows, block_size\) = \(2, 4\)"):
        t.record(block=2, canvas=torch.full((2, 4), M), confidence=torch.zeros(2, 3),
                 committed=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(IndexError, match="row 2 is out of range"):
        t.history(2)


def test_history_exact():
    assert planted().history(0) == [
        {"position": 0, "token": 10, "step": 1, "confidence": 0.75, "remasks": 0},
        {"position": 1, "token": 11, "step": 0, "confidence": 0.5, "remasks": 0},
        {"position": 2, "token": 12, "step": 2, "confidence": 0.875, "remasks": 0},
        {"position": 3, "token": 7, "step": 3, "confidence": 0.625, "remasks": 1},
        {"position": 4, "token": 8, "step": 4, "confidence": 1.0, "remasks": 0},
        {"position": 5, "token": 15, "step": 4, "confidence": 0.5, "remasks": 0},
        {"position": 6, "token": 16, "step": 5, "confidence": 0.25, "remasks": 0},
        {"position": 7, "token": 17, "step": 5, "confidence": 0.125, "remasks": 0},
    ]
    row_1 = planted().history(1)
    assert [(e["token"], e["step"]) for e in row_1] == [(20, 0), (21, 0), (22, 0), (23, 0),
                                                        (24, 4), (25, 4), (26, 4), (27, 4)]


def test_render_terminal_plain_and_coloured():
    t, tok = planted(), FakeTokenizer()
    assert render_terminal(t, tok, color=False) == "The[1] cat[0] sat[2] <b>[3*]⏎[4]on[4] the[5] mat[5]"
    assert render_terminal(t, tok, row=1, color=False) == "t20[0]t21[0]t22[0]t23[0]t24[4]t25[4]t26[4]t27[4]"
    assert render_terminal(t, tok, color=False, final_tokens=[10, 11, 12]) == "The[1] cat[0] sat[2]"
    text, legend = render_terminal(t, tok).split("\n")
    # steps 0..5 spread over the 21-colour ramp: step 0 blue (21), step 1 at 4/20 (45), step 5 red (196)
    assert text.startswith("\x1b[38;5;45mThe\x1b[0m\x1b[38;5;21m cat\x1b[0m")
    assert text.endswith("\x1b[38;5;196m mat\x1b[0m")
    assert "\x1b[4;38;5;" in text  # the retracted token is underlined
    assert legend.startswith("colour = step the token was committed at: 0 ") and "underlined" in legend


def test_final_tokens_must_match_the_recording():
    with pytest.raises(ValueError, match="at response position 2 \\(5 vs 12\\)"):
        render_terminal(planted(), FakeTokenizer(), final_tokens=[10, 11, 5])
    with pytest.raises(ValueError, match="has 9 tokens but row 0 generated only 8"):
        render_terminal(planted(), FakeTokenizer(), final_tokens=[0] * 9)


def test_replay_one_line_per_frame_when_not_a_terminal():
    out = io.StringIO()
    replay_terminal(planted(), FakeTokenizer(), stream=out, delay=0)
    assert out.getvalue().splitlines() == [
        "step 0: _[ cat]__",
        "step 1: [The] cat_[t13]",
        "step 2: The cat[ sat]~t13~",
        "step 3: The cat sat[ <b>]",
        "step 4: The cat sat <b>[⏎][on]__",
        "step 5: The cat sat <b>⏎on[ the][ mat]",
    ]
    out = io.StringIO()  # row 1 changes at two steps only; only its kept tokens are shown
    replay_terminal(planted(), FakeTokenizer(), row=1, stream=out, delay=0, final_tokens=[20, 21, 22, 23, 24])
    assert out.getvalue().splitlines() == ["step 0: [t20][t21][t22][t23]", "step 4: t20t21t22t23[t24]"]


def test_replay_overwrites_frames_on_a_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # every frame fits on one line

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    out = Terminal()
    replay_terminal(planted(), FakeTokenizer(), stream=out, delay=0)
    written = out.getvalue()
    assert written.count("\r\x1b[J") == 5  # every frame after the first clears the one before
    assert written.count("\n") == 1 and written.endswith("\n")
    assert "\x1b[30;102m cat\x1b[0m" in written and "\x1b[9;31mt13\x1b[0m" in written  # new, retracted


def test_json_round_trip(tmp_path):
    t = planted()
    path = save_trajectory(t, FakeTokenizer(), tmp_path / "deep" / "run.json")
    assert Trajectory.load_json(path) == t
    assert json.loads(path.read_text())["format"] == "llm2diff.trajectory"
    assert [p.name for p in path.parent.iterdir()] == ["run.json"]  # no temporary file left behind
    with pytest.raises(ValueError, match="not a llm2diff.trajectory version 1"):
        Trajectory.from_dict({"format": "something else"})


def test_html_is_self_contained_and_escaped(tmp_path):
    path = save_trajectory(planted(), FakeTokenizer(), tmp_path / "views" / "run.html")
    page = path.read_text()
    for word in ("The", "cat", "sat", "on", "the", "mat", "t13"):
        assert word in page
    assert "&lt;b&gt;" in page and "<b>" not in page  # escaped in the final view, \\u003c in the script data
    assert "http" not in page and "src=" not in page and "<link" not in page
    assert 'title="step 3, confidence 0.625, retracted 1x"' in page
    assert 'max="5"' in page  # six frames on the slider
    assert [p.name for p in path.parent.iterdir()] == ["run.html"]


def test_gif_has_one_frame_per_step_and_png_opens(tmp_path):
    from PIL import Image

    gif = save_trajectory(planted(), FakeTokenizer(), tmp_path / "run.gif")
    with Image.open(gif) as image:
        assert image.n_frames == 6
    gif = save_trajectory(planted(), FakeTokenizer(), tmp_path / "row1.gif", row=1)
    with Image.open(gif) as image:
        assert image.n_frames == 2  # the steps that changed row 1
    png = save_trajectory(planted(), FakeTokenizer(), tmp_path / "run.png", final_tokens=[10, 11, 12, 7, 8])
    assert png.stat().st_size > 0
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width > 0 and image.height > 0


def test_unknown_suffix_names_the_supported_ones(tmp_path):
    with pytest.raises(ValueError, match=r"'\.txt'.*supported suffixes are \.html, \.gif, \.png, \.json"):
        save_trajectory(planted(), FakeTokenizer(), tmp_path / "run.txt")
    assert not any(tmp_path.iterdir())
