"""Sample grids a person can read: one helper for training, evaluation and report grids.

:func:`image_grid` tiles equally sized PIL images row by row, upscales every cell by one integer factor
(nearest neighbour, so a 16-px digit stays sharp) to at least ``min_cell`` pixels, leaves a ``gap`` of
background between cells and around them, and can add a label strip over the columns (skip variants,
classes, prompts), a strip left of the rows (prompts, sampling seeds) and a legend of the settings under
the grid. :func:`grid_layout` computes where everything goes, so tests and callers can find a cell, and
:func:`cut_cells` takes cells back out of a saved grid (the sweep report's sample sheets).

diffusers' ``make_image_grid`` tiles edge to edge without labels and torchvision's ``make_grid`` pads
but is not a dependency worth adding for this; both are what this replaces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

BACKGROUND = 255  # white gaps and label strips
INK = 0  # black text
MAX_LABEL_LINES = 3  # a column label longer than this is cut with an ellipsis


@dataclass(frozen=True)
class GridLayout:
    """Where a grid puts its cells and strips, in pixels of the final image."""

    rows: int
    columns: int
    scale: int  # integer upscaling of every cell
    cell: tuple[int, int]  # (width, height) of one upscaled cell
    gap: int  # background between cells and around the grid
    top: int  # height of the column-label strip (0: none)
    left: int  # width of the row-label strip (0: none)
    bottom: int  # height of the legend strip (0: none)
    size: tuple[int, int]  # (width, height) of the whole image
    font_size: int

    def cell_box(self, row: int, column: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the cell at ``row``, ``column`` (right and bottom exclusive)."""
        if not (0 <= row < self.rows and 0 <= column < self.columns):
            raise ValueError(f"cell ({row}, {column}) is outside a grid of {self.rows} x {self.columns}")
        x = self.left + self.gap + column * (self.cell[0] + self.gap)
        y = self.top + self.gap + row * (self.cell[1] + self.gap)
        return x, y, x + self.cell[0], y + self.cell[1]


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow's bundled scalable font (needs FreeType)
    except (TypeError, ValueError, OSError):  # an old Pillow or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _wrap(text: str, font, width: int, max_lines: int) -> list[str]:
    """``text`` in lines no wider than ``width`` pixels, broken after spaces or commas (skip specs), words
    longer than a line cut where they overflow; more than ``max_lines`` lines end with an ellipsis."""
    tokens, token = [], ""
    for char in str(text):
        token += char
        if char in " ,:":
            tokens.append(token)
            token = ""
    tokens += [token] if token else []
    lines, line = [], ""
    for token in tokens:
        if line and font.getlength(line + token) > width:
            lines.append(line.rstrip())
            line = ""
        while len(token) > 1 and font.getlength(token) > width:  # a word wider than a line: cut it
            cut = max([1] + [i for i in range(1, len(token)) if font.getlength(token[:i]) <= width])
            lines.append(token[:cut])
            token = token[cut:]
        line += token
    lines += [line.rstrip()] if line.strip() else []
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and font.getlength(last + "…") > width:
            last = last[:-1]
        lines = [*lines[: max_lines - 1], last + "…"]
    return lines or [""]


def _line_height(font) -> int:
    left, top, right, bottom = font.getbbox("Hg")
    return bottom + 2


def grid_layout(
    count: int,
    columns: int = 8,
    image_size: tuple[int, int] = (64, 64),
    *,
    min_cell: int = 64,
    scale: int | None = None,
    gap: int | None = None,
    column_labels=None,
    row_labels=None,
    legend: str | None = None,
) -> tuple[GridLayout, dict]:
    """The layout of :func:`image_grid` and the wrapped text of its strips (``{"columns", "rows", "legend"}``).

    Raises ``ValueError`` on an empty grid, a column count below 1, a scale or gap below its minimum, or a
    label list whose length is not the number of columns (rows).
    """
    if count < 1:
        raise ValueError("image_grid needs at least one image")
    if columns < 1:
        raise ValueError(f"columns must be at least 1, got {columns}")
    width, height = image_size
    rows = -(-count // columns)
    if scale is None:
        scale = max(1, math.ceil(min_cell / max(width, height)))
    if scale < 1 or int(scale) != scale:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    cell = (width * scale, height * scale)
    gap = max(2, min(cell) // 16) if gap is None else gap
    if gap < 0:
        raise ValueError(f"gap must be >= 0, got {gap}")
    for name, labels, expected in (("column_labels", column_labels, columns), ("row_labels", row_labels, rows)):
        if labels is not None and len(labels) != expected:
            raise ValueError(
                f"{name} has {len(labels)} entries for a grid of {rows} rows x {columns} columns (expected {expected})"
            )
    font_size = min(24, max(11, cell[0] // 6))
    font = _font(font_size)
    line = _line_height(font)
    text: dict = {"columns": None, "rows": None, "legend": None}
    top = left = bottom = 0
    if column_labels is not None:
        text["columns"] = [_wrap(label, font, cell[0], MAX_LABEL_LINES) for label in column_labels]
        top = gap + line * max(len(lines) for lines in text["columns"])
    if row_labels is not None:
        strip = max(96, min(2 * cell[0], 240))  # wide enough for a short prompt, never wider than two cells
        widest = max(font.getlength(str(label)) for label in row_labels)
        strip = int(min(strip, widest + 1))
        fits = max(1, (cell[1] // line))
        text["rows"] = [_wrap(label, font, strip, fits) for label in row_labels]
        left = gap + strip
    grid_width = left + gap + columns * (cell[0] + gap)
    if legend:
        text["legend"] = [
            piece for part in str(legend).split("\n") for piece in _wrap(part, font, grid_width - 2 * gap, 8)
        ]
        bottom = line * len(text["legend"]) + gap
    size = (grid_width, top + gap + rows * (cell[1] + gap) + bottom)
    layout = GridLayout(
        rows=rows,
        columns=columns,
        scale=int(scale),
        cell=cell,
        gap=gap,
        top=top,
        left=left,
        bottom=bottom,
        size=size,
        font_size=font_size,
    )
    return layout, text


def image_grid(
    images: list[Image.Image],
    columns: int = 8,
    *,
    min_cell: int = 64,
    scale: int | None = None,
    gap: int | None = None,
    column_labels: list[str] | None = None,
    row_labels: list[str] | None = None,
    legend: str | None = None,
) -> Image.Image:
    """Tile ``images`` (filled row by row) into one readable grid.

    Args:
        images: PIL images of one size (grey "L" stays grey; anything else is drawn as RGB).
        columns: cells per row.
        min_cell: the smallest side of an upscaled cell, in pixels; ``scale`` is the smallest integer
            factor that reaches it (images already that large are not scaled).
        scale: an explicit integer upscaling factor instead of ``min_cell``.
        gap: background pixels between cells and around the grid (default: a sixteenth of a cell, >= 2).
        column_labels: one label per column, drawn in a strip above the cells (wrapped, at most 3 lines).
        row_labels: one label per row, drawn in a strip left of the cells (prompts, seeds).
        legend: the settings behind the grid, drawn under it (``\\n`` separates lines).

    Returns:
        The grid (mode "L" for grey images, else "RGB") on a white background, black text.
    """
    if not images:
        raise ValueError("image_grid needs at least one image")
    sizes = sorted({image.size for image in images})
    if len(sizes) != 1:
        raise ValueError(f"image_grid needs images of one size, got {sizes}")
    layout, text = grid_layout(
        len(images),
        columns,
        sizes[0],
        min_cell=min_cell,
        scale=scale,
        gap=gap,
        column_labels=column_labels,
        row_labels=row_labels,
        legend=legend,
    )
    mode = "L" if all(image.mode in ("L", "1") for image in images) else "RGB"
    background = BACKGROUND if mode == "L" else (BACKGROUND,) * 3
    ink = INK if mode == "L" else (INK,) * 3
    grid = Image.new(mode, layout.size, background)
    for i, image in enumerate(images):
        box = layout.cell_box(i // columns, i % columns)
        cell = image.convert(mode)
        if layout.scale != 1:
            cell = cell.resize(layout.cell, Image.NEAREST)
        grid.paste(cell, box[:2])
    draw, font = ImageDraw.Draw(grid), _font(layout.font_size)
    line = _line_height(font)
    for column, lines in enumerate(text["columns"] or []):  # centred over its column, bottom-aligned
        x0, y0, x1, _ = layout.cell_box(0, column)
        for k, words in enumerate(lines):
            y = y0 - layout.gap - line * (len(lines) - k)
            draw.text(((x0 + x1) / 2 - font.getlength(words) / 2, y), words, fill=ink, font=font)
    for row, lines in enumerate(text["rows"] or []):  # right-aligned against its row, centred vertically
        x0, y0, _, y1 = layout.cell_box(row, 0)
        start = (y0 + y1) / 2 - line * len(lines) / 2
        for k, words in enumerate(lines):
            draw.text((x0 - layout.gap - font.getlength(words), start + line * k), words, fill=ink, font=font)
    for k, words in enumerate(text["legend"] or []):
        draw.text((layout.gap, layout.size[1] - layout.bottom + line * k), words, fill=ink, font=font)
    return grid


def cut_cells(grid: Image.Image, layout: GridLayout | dict, column: int, rows: int | None = None) -> list[Image.Image]:
    """The cells of one ``column`` of a grid image made by :func:`image_grid` (``layout`` as returned by
    :func:`grid_layout`, or its ``dataclasses.asdict``), top to bottom, at their size before upscaling;
    the first ``rows`` only when given. Raises ``ValueError`` when the image is not that layout's size."""
    if isinstance(layout, dict):
        layout = GridLayout(**{k: tuple(v) if isinstance(v, list) else v for k, v in layout.items()})
    if tuple(grid.size) != tuple(layout.size):
        raise ValueError(
            f"grid image is {grid.size[0]}x{grid.size[1]} px, its layout says {layout.size[0]}x{layout.size[1]}"
        )
    count = layout.rows if rows is None else min(rows, layout.rows)
    native = (layout.cell[0] // layout.scale, layout.cell[1] // layout.scale)
    return [grid.crop(layout.cell_box(row, column)).resize(native, Image.NEAREST) for row in range(count)]
