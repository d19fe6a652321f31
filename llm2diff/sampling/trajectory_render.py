"""Showing a recorded `Trajectory` (`llm2diff.sampling.trajectory`): which token appeared at which step.

    print(render_terminal(trajectory, tokenizer))      # the final text coloured by the step each token appeared at
    replay_terminal(trajectory, tokenizer)             # frame by frame in the terminal (one line a frame if piped)
    save_trajectory(trajectory, tokenizer, "out/trajectory.html")   # or .gif, .png, .json (chosen by suffix)

A row that stopped early (end-of-sequence, stop string) keeps being denoised in the batch: pass the renderers
`final_tokens`, the row's generated tokens that were kept, and they show only those positions.
"""

from __future__ import annotations

import colorsys
import html
import io
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from llm2diff.atomic import write_bytes_atomic, write_text_atomic
from llm2diff.sampling.trajectory import Trajectory

SUPPORTED_SUFFIXES = (".html", ".gif", ".png", ".json")
MASK_GLYPH = "░"
NEWLINE_GLYPH = "⏎"

# states of a position in a frame
MASKED, NEW, KEPT, RETRACTED = "masked", "new", "kept", "retracted"


# -- what the renderers show --------------------------------------------------------------------------------------
@dataclass
class Frame:
    """The shown positions of one row after one step: per position `(token or None, state, confidence at commit)`.

    state is MASKED, NEW (committed this step), KEPT (committed earlier) or RETRACTED (remasked this step; the
    token is the one taken back).
    """

    step: int
    block: int
    cells: list[tuple[int | None, str, float | None]]


def shown_history(trajectory: Trajectory, row: int = 0, final_tokens: list[int] | None = None) -> list[dict]:
    """`trajectory.history(row)` cut to the `len(final_tokens)` positions kept (all when None).

    Raises ValueError when `final_tokens` disagree with the recorded tokens (a row or slice mix-up).
    """
    entries = trajectory.history(row)
    if final_tokens is None:
        return entries
    final_tokens = [int(t) for t in final_tokens]
    if len(final_tokens) > len(entries):
        raise ValueError(f"final_tokens has {len(final_tokens)} tokens but row {row} generated only "
                         f"{len(entries)}: pass the row's generated tokens only (no prompt, no response prefix)")
    for entry, token in zip(entries, final_tokens):
        if entry["token"] != token:
            raise ValueError(f"final_tokens disagree with the trajectory of row {row} at response position "
                             f"{entry['position']} ({token} vs {entry['token']}): pass the row's generated tokens "
                             f"only (no prompt, no response prefix)")
    return entries[: len(final_tokens)]


def frames(trajectory: Trajectory, row: int = 0, final_tokens: list[int] | None = None) -> list[Frame]:
    """One frame per step that changed a shown position of `row`; cells follow `shown_history` order."""
    positions = [entry["position"] for entry in shown_history(trajectory, row, final_tokens)]
    index = {position: j for j, position in enumerate(positions)}
    cells: list[tuple[int | None, str, float | None]] = [(None, MASKED, None)] * len(positions)
    out = []
    size = trajectory.block_size
    for number, step in enumerate(trajectory.steps):
        changes = {}
        for i in range(size):
            j = index.get(step.block * size + i)
            if j is None:
                continue
            if step.committed[row][i]:
                changes[j] = (step.canvas[row][i], NEW, step.confidence[row][i])
            elif step.remasked is not None and step.remasked[row][i]:
                changes[j] = (cells[j][0], RETRACTED, None)
        if not changes:
            continue
        cells = [(token, KEPT if state == NEW else MASKED if state == RETRACTED else state, confidence)
                 for token, state, confidence in cells]
        for j, cell in changes.items():
            cells[j] = cell
        out.append(Frame(number, step.block, cells))
    return out


class _Texts:
    """Token text as shown: each id decoded on its own, newlines as a visible glyph (memoised)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, token: int | None) -> str:
        if token is None:
            return MASK_GLYPH
        if token not in self.cache:
            text = self.tokenizer.decode([token])
            self.cache[token] = text.replace("\r\n", NEWLINE_GLYPH).replace("\n", NEWLINE_GLYPH).replace("\r", "")
        return self.cache[token]


# -- terminal ------------------------------------------------------------------------------------------------------
STEP_PALETTE = (21, 27, 33, 39, 45, 51, 50, 49, 48, 47, 46, 82, 118, 154, 190, 226, 220, 214, 208, 202, 196)
RESET = "\x1b[0m"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _step_colour(step: int, first: int, last: int) -> int:
    """ANSI 256-colour code: blue for the first step shown, through green and yellow, to red for the last."""
    fraction = (step - first) / (last - first) if last > first else 0.0
    return STEP_PALETTE[round(fraction * (len(STEP_PALETTE) - 1))]


def render_terminal(trajectory: Trajectory, tokenizer, row: int = 0, color: bool = True,
                    final_tokens: list[int] | None = None) -> str:
    """The final text of `row`, each token coloured by the step it was committed at, and a legend line.

    With `color=False`: plain text with the step after each token, `The[0] cat[1]`; a `*` marks a token that was
    retracted and committed again (`cat[4*]`). A position left masked shows as `_[-]`.
    """
    text = _Texts(tokenizer)
    entries = shown_history(trajectory, row, final_tokens)
    if not color:
        return "".join("_[-]" if entry["step"] is None else
                       f"{text(entry['token'])}[{entry['step']}{'*' if entry['remasks'] else ''}]" for entry in entries)
    steps = [entry["step"] for entry in entries if entry["step"] is not None]
    if not steps:
        return ""
    first, last = min(steps), max(steps)
    pieces = []
    for entry in entries:
        if entry["step"] is None:
            pieces.append(MASK_GLYPH)
            continue
        style = "4;" if entry["remasks"] else ""
        pieces.append(f"\x1b[{style}38;5;{_step_colour(entry['step'], first, last)}m{text(entry['token'])}{RESET}")
    swatches = "".join(f"\x1b[38;5;{code}m█" for code in STEP_PALETTE) + RESET
    legend = f"colour = step the token was committed at: {first} {swatches} {last}"
    if any(entry["remasks"] for entry in entries):
        legend += "; underlined = retracted, then committed again"
    return "".join(pieces) + "\n" + legend


def _frame_line(frame: Frame, text: _Texts, positions: list[int], block_size: int, color: bool) -> str:
    """The response up to the frame's block: masks `░` (`_`), new tokens highlighted (`[tok]`), retracted
    ones struck through in red (`~tok~`)."""
    end = (frame.block + 1) * block_size
    pieces = []
    for position, (token, state, _) in zip(positions, frame.cells):
        if position >= end:
            break
        if state == MASKED:
            pieces.append(f"\x1b[2m{MASK_GLYPH}{RESET}" if color else "_")
        elif state == NEW:
            pieces.append(f"\x1b[30;102m{text(token)}{RESET}" if color else f"[{text(token)}]")
        elif state == RETRACTED:
            pieces.append(f"\x1b[9;31m{text(token)}{RESET}" if color else f"~{text(token)}~")
        else:
            pieces.append(text(token))
    return "".join(pieces)


def replay_terminal(trajectory: Trajectory, tokenizer, row: int = 0, stream: TextIO | None = None,
                    delay: float = 0.05, final_tokens: list[int] | None = None, color: bool | None = None) -> None:
    """Animate how `row` was denoised, one frame per step that changed it: `step t: <response so far>`.

    On a terminal (`stream.isatty()`) each frame overwrites the last and waits `delay` seconds; otherwise (a file,
    a pipe) every frame is one line, written without waiting. `color` defaults to whether `stream` is a terminal;
    without colour masks are `_`, new tokens `[tok]`, retracted ones `~tok~`.
    """
    stream = sys.stdout if stream is None else stream
    tty = bool(getattr(stream, "isatty", lambda: False)())
    color = tty if color is None else color
    text = _Texts(tokenizer)
    positions = [entry["position"] for entry in shown_history(trajectory, row, final_tokens)]
    shown = frames(trajectory, row, final_tokens)
    width = len(str(shown[-1].step)) if shown else 1
    used_lines = 0
    for frame in shown:
        line = f"step {frame.step:>{width}}: " + _frame_line(frame, text, positions, trajectory.block_size, color)
        if not tty:
            stream.write(line + "\n")
            continue
        if used_lines:  # back to the start of the previous frame, clear it
            stream.write("\r" + (f"\x1b[{used_lines - 1}F" if used_lines > 1 else "") + "\x1b[J")
        stream.write(line)
        stream.flush()
        columns = shutil.get_terminal_size().columns
        used_lines = max(1, math.ceil(len(_ANSI.sub("", line)) / columns))
        if delay > 0:
            time.sleep(delay)
    if tty and shown:
        stream.write("\n")
    stream.flush()


# -- files ---------------------------------------------------------------------------------------------------------
def save_trajectory(trajectory: Trajectory, tokenizer, path: str | os.PathLike, row: int = 0,
                    final_tokens: list[int] | None = None) -> Path:
    """Save `row`'s trajectory by the suffix of `path`; parent directories are created, the file written atomically.

    .html  a self-contained page: the final tokens coloured by confidence at commit (hover: step), and a slider
           through the steps
    .gif   an animation, one frame per step that changed the row (grey = masked, colour = confidence)
    .png   the final canvas, each box coloured by confidence with the step it was committed at
    .json  the whole trajectory, all rows (`Trajectory.save_json`; `row` and `final_tokens` do not apply)
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise ValueError(f"cannot save a trajectory as {suffix or 'a file without suffix'!r} ({path}): "
                         f"supported suffixes are {', '.join(SUPPORTED_SUFFIXES)}")
    if suffix == ".json":
        trajectory.save_json(path)
    elif suffix == ".html":
        write_text_atomic(path, _html_page(trajectory, tokenizer, row, final_tokens))
    else:
        write_bytes_atomic(path, _image_bytes(trajectory, tokenizer, row, final_tokens, animated=suffix == ".gif"))
    return path


def _confidence_hue(confidence: float) -> int:
    """0 (red) for confidence 0 to 120 (green) for confidence 1."""
    return round(120 * min(max(confidence, 0.0), 1.0))


_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }
.grid { display: flex; flex-wrap: wrap; gap: 3px; margin: .5em 0 1.5em; }
.tok { font: 13px ui-monospace, monospace; white-space: pre; padding: 2px 4px; min-width: 1ch;
       border: 2px solid transparent; border-radius: 3px; }
.masked { background: #ddd; color: #999; }
.new { border-color: #000; }
.retracted { background: #fff; color: #c00; text-decoration: line-through; border-color: #c00; }
.remasked { border-style: dashed; border-color: #555; }
</style></head><body>
<h1>__TITLE__</h1>
<p>__SUMMARY__</p>
<h2>Final tokens</h2>
<p>Colour = confidence when committed (red 0 &rarr; green 1); hover a token for the step that committed it.
Dashed border = retracted, then committed again.</p>
<div class="grid">__FINAL__</div>
<h2>Step by step</h2>
<p>Black border = committed at this step; red, struck through = retracted at this step.</p>
<div><button id="prev">&#9664;</button> <input type="range" id="frame" min="0" max="__LAST__" value="0">
<button id="next">&#9654;</button> <span id="label"></span></div>
<div class="grid" id="cells"></div>
<script>
const FRAMES = __FRAMES__;  // [step, block, [[text, state, confidence], ...]] per frame
const slider = document.getElementById("frame"), label = document.getElementById("label");
function show(i) {
  slider.value = i = Math.max(0, Math.min(FRAMES.length - 1, i));
  const [step, block, cells] = FRAMES[i];
  label.textContent = `step ${step}, block ${block} (frame ${i + 1} of ${FRAMES.length})`;
  document.getElementById("cells").replaceChildren(...cells.map(([text, state, c]) => {
    const box = document.createElement("span");
    box.className = "tok " + state;
    box.textContent = text;
    if (c !== null) box.style.background = `hsl(${Math.round(120 * c)}, 60%, 75%)`;
    return box;
  }));
}
slider.oninput = () => show(+slider.value);
document.getElementById("prev").onclick = () => show(+slider.value - 1);
document.getElementById("next").onclick = () => show(+slider.value + 1);
if (FRAMES.length) show(0);
</script>
</body></html>
"""


def _html_page(trajectory: Trajectory, tokenizer, row: int, final_tokens: list[int] | None) -> str:
    text = _Texts(tokenizer)
    entries = shown_history(trajectory, row, final_tokens)
    boxes = []
    for entry in entries:
        if entry["step"] is None:
            boxes.append(f'<span class="tok masked" title="never committed again">{MASK_GLYPH}</span>')
            continue
        title = f"step {entry['step']}, confidence {entry['confidence']}"
        if entry["remasks"]:
            title += f", retracted {entry['remasks']}x"
        style = "" if entry["confidence"] is None else f' style="background: hsl({_confidence_hue(entry["confidence"])}, 60%, 75%)"'
        remasked = " remasked" if entry["remasks"] else ""
        boxes.append(f'<span class="tok{remasked}" title="{html.escape(title)}"{style}>'
                     f"{html.escape(text(entry['token']))}</span>")
    data = [[frame.step, frame.block,
             [[text(token) if state != MASKED else MASK_GLYPH, state, confidence if state in (NEW, KEPT) else None]
              for token, state, confidence in frame.cells]]
            for frame in frames(trajectory, row, final_tokens)]
    # inside <script>: no "<", ">" or "&" may appear raw (JSON's \\u escapes keep the strings intact)
    script_data = json.dumps(data, ensure_ascii=False).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    summary = (f"Row {row}: {len(entries)} tokens, {len(data)} of {trajectory.num_steps} steps change this row, "
               f"block size {trajectory.block_size}.")
    page = _HTML
    for key, value in {"__TITLE__": f"Denoising trajectory, row {row}", "__SUMMARY__": html.escape(summary),
                       "__FINAL__": "".join(boxes), "__LAST__": str(max(len(data) - 1, 0)),
                       "__FRAMES__": script_data}.items():
        page = page.replace(key, value)
    return page


# -- images (Pillow) ------------------------------------------------------------------------------------------------
CELL_W, CELL_H, GAP, MARGIN, HEADER = 64, 36, 3, 8, 20
MASKED_FILL, BACKGROUND, INK = (205, 205, 205), (255, 255, 255), (20, 20, 20)


def _image_bytes(trajectory: Trajectory, tokenizer, row: int, final_tokens: list[int] | None, animated: bool) -> bytes:
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError as err:
        raise ImportError("saving a trajectory as .gif or .png needs Pillow: pip install Pillow") from err
    try:
        font = ImageFont.truetype("DejaVuSans.ttf", 11)
    except OSError:
        font = ImageFont.load_default()
    text = _Texts(tokenizer)
    entries = shown_history(trajectory, row, final_tokens)
    if not entries:
        raise ValueError(f"row {row} of the trajectory has no committed tokens: nothing to draw")
    columns = min(trajectory.block_size, 16)
    if animated:
        shown = frames(trajectory, row, final_tokens)
        pictures = [(f"row {row}  step {frame.step}  block {frame.block}  (colour = confidence)", frame.cells,
                     [str(frame.step) if state == NEW else "" for _, state, _ in frame.cells]) for frame in shown]
    else:
        cells = [(entry["token"], MASKED if entry["step"] is None else KEPT, entry["confidence"]) for entry in entries]
        steps = ["" if entry["step"] is None else f"step {entry['step']}{'*' * bool(entry['remasks'])}"
                 for entry in entries]
        pictures = [(f"row {row}: colour = confidence when committed, number = step (* = retracted before)",
                     cells, steps)]
    grid_width = columns * (CELL_W + GAP) - GAP
    header_width = max(math.ceil(font.getlength(header)) for header, _, _ in pictures)
    size = (2 * MARGIN + max(grid_width, header_width),
            2 * MARGIN + HEADER + math.ceil(len(entries) / columns) * (CELL_H + GAP) - GAP)

    def draw_grid(header: str, cells: list[tuple[int | None, str, float | None]], steps: list[str]) -> Image.Image:
        image = Image.new("RGB", size, BACKGROUND)
        draw = ImageDraw.Draw(image)
        draw.text((MARGIN, MARGIN), header, fill=INK, font=font)
        for j, ((token, state, confidence), step) in enumerate(zip(cells, steps)):
            x = MARGIN + (j % columns) * (CELL_W + GAP)
            y = MARGIN + HEADER + (j // columns) * (CELL_H + GAP)
            if state in (NEW, KEPT) and confidence is not None:
                r, g, b = colorsys.hls_to_rgb(_confidence_hue(confidence) / 360, 0.75, 0.6)
                fill = (round(255 * r), round(255 * g), round(255 * b))
            else:
                fill = BACKGROUND if state == RETRACTED else MASKED_FILL
            outline = {NEW: INK, RETRACTED: (200, 0, 0)}.get(state)
            draw.rectangle((x, y, x + CELL_W - 1, y + CELL_H - 1), fill=fill, outline=outline, width=2 if outline else 0)
            if token is not None and state != MASKED:
                ink = (200, 0, 0) if state == RETRACTED else INK
                draw.text((x + 4, y + 4), _fit(draw, text(token).replace(NEWLINE_GLYPH, "\\n"), font, CELL_W - 8),
                          fill=ink, font=font)
                if state == RETRACTED:
                    draw.line((x + 3, y + 11, x + CELL_W - 4, y + 11), fill=ink, width=1)
            if step:
                draw.text((x + 4, y + CELL_H - 16), step, fill=(70, 70, 70), font=font)
        return image

    images = [draw_grid(*picture) for picture in pictures]
    buffer = io.BytesIO()
    if animated:
        durations = [400] * (len(images) - 1) + [2000]
        images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=durations, loop=0)
    else:
        images[0].save(buffer, format="PNG")
    return buffer.getvalue()


def _fit(draw, label: str, font, width: int) -> str:
    """`label`, cut short with an ellipsis so that it fits in `width` pixels."""
    if draw.textlength(label, font=font) <= width:
        return label
    while label and draw.textlength(label + "…", font=font) > width:
        label = label[:-1]
    return label + "…"
