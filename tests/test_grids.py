"""skipdiff.grids: gaps between cells, integer upscaling, label strips and a legend, cells cut back out of a
saved grid, and the sweep report's sample sheet built from evaluation grids."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image

from skipdiff.grids import BACKGROUND, cut_cells, grid_layout, image_grid
from skipdiff.report.figures import sample_sheet
from skipdiff.report.read import Result


def solid_cells(count: int, size=(4, 4)) -> list[Image.Image]:
    """Grey images, each with one mid grey level and a darker top-left pixel (to see the upscaling)."""
    cells = []
    for k in range(count):
        pixels = np.full(size[::-1], 40 + 20 * k, np.uint8)
        pixels[0, 0] = 10
        cells.append(Image.fromarray(pixels, mode="L"))
    return cells


def dark(region: np.ndarray) -> int:
    return int((region < 128).sum())


def test_cells_are_upscaled_by_an_integer_and_separated_by_background():
    images = solid_cells(6)
    grid = image_grid(images, columns=3, min_cell=16, gap=3)
    layout, _ = grid_layout(6, 3, (4, 4), min_cell=16, gap=3)
    pixels = np.asarray(grid)
    assert grid.mode == "L" and layout.scale == 4 and layout.cell == (16, 16)
    assert (layout.top, layout.left, layout.bottom) == (0, 0, 0)  # no labels: no strips
    assert grid.size == layout.size == (3 + 3 * (16 + 3), 3 + 2 * (16 + 3))
    covered = np.zeros(pixels.shape, bool)
    for k in range(len(images)):
        x0, y0, x1, y1 = layout.cell_box(k // 3, k % 3)
        cell = pixels[y0:y1, x0:x1]
        assert (cell[:4, :4] == 10).all() and (cell[4:, :] == 40 + 20 * k).all()  # one source pixel = 4 x 4
        covered[y0:y1, x0:x1] = True
    assert (pixels[~covered] == BACKGROUND).all()  # every other pixel is gap, on the border too
    assert (pixels[:3, :] == BACKGROUND).all() and (pixels[:, 19:22] == BACKGROUND).all()


def test_label_strips_and_legend_hold_text_beside_their_cells():
    images = solid_cells(4, size=(8, 8))
    labels = dict(
        column_labels=["original", "skip 11: zero"],
        row_labels=["a red square", "seed 1"],
        legend="runs/x · ddim, 50 steps · sampling seed 0",
    )
    grid = np.asarray(image_grid(images, columns=2, **labels))
    layout, text = grid_layout(4, 2, (8, 8), **labels)
    assert layout.top > layout.gap and layout.left > layout.gap and layout.bottom > 0
    assert grid.shape == (layout.size[1], layout.size[0])
    for column in range(2):  # ink over each column, inside the strip above it
        x0, y0, x1, _ = layout.cell_box(0, column)
        assert dark(grid[: y0 - layout.gap, x0:x1]) > 5
    for row in range(2):  # ink left of each row, within the row's height
        x0, y0, _, y1 = layout.cell_box(row, 0)
        assert dark(grid[y0:y1, : x0 - layout.gap]) > 5
    _, _, _, last = layout.cell_box(1, 1)
    assert dark(grid[last + layout.gap :, :]) > 5  # the legend under the cells
    between = layout.cell_box(1, 0)[1] - layout.gap
    assert (grid[between : between + layout.gap, layout.left :] == BACKGROUND).all()  # the gap stays clear
    assert text["columns"][0] == ["original"] and text["rows"] == [["a red square"], ["seed 1"]]


def test_long_labels_wrap_and_stop_with_an_ellipsis():
    spec = ",".join(["keep"] * 11 + ["zero"])
    _, text = grid_layout(2, 2, (16, 16), column_labels=["original", spec])
    assert text["columns"][0] == ["original"]
    assert len(text["columns"][1]) == 3 and text["columns"][1][-1].endswith("…")


def test_cut_cells_gives_back_the_images_of_one_column():
    images = solid_cells(6)
    layout, _ = grid_layout(6, 2, (4, 4), row_labels=["a", "b", "c"])
    grid = image_grid(images, columns=2, row_labels=["a", "b", "c"])
    saved = dataclasses.asdict(layout)  # as eval.json records it
    cut = cut_cells(grid, saved, column=1)
    assert [np.asarray(c).tolist() for c in cut] == [np.asarray(images[k]).tolist() for k in (1, 3, 5)]
    assert len(cut_cells(grid, saved, column=0, rows=2)) == 2
    with pytest.raises(ValueError, match="layout says"):
        cut_cells(grid.crop((0, 0, 10, 10)), saved, column=0)


def test_bad_grids_are_refused_naming_the_problem():
    with pytest.raises(ValueError, match="one size"):
        image_grid([Image.new("L", (4, 4)), Image.new("L", (8, 8))], columns=2)
    with pytest.raises(ValueError, match="at least one image"):
        image_grid([], columns=2)
    with pytest.raises(ValueError, match=r"column_labels has 1 entries .*\(expected 2\)"):
        image_grid(solid_cells(2), columns=2, column_labels=["only one"])
    with pytest.raises(ValueError, match="row_labels has 3 entries"):
        image_grid(solid_cells(2), columns=2, row_labels=["a", "b", "c"])
    with pytest.raises(ValueError, match="positive integer"):
        image_grid(solid_cells(2), columns=2, scale=0)
    with pytest.raises(ValueError, match="columns must be at least 1"):
        image_grid(solid_cells(2), columns=0)


def test_the_report_sample_sheet_puts_each_configurations_own_samples_in_a_labelled_row(tmp_path):
    configurations = {}
    for k, name in enumerate(["skips=full", "skips=none"]):
        images = solid_cells(4) if k == 0 else solid_cells(4)[::-1]
        style = dict(columns=2, column_labels=["original", "none"], row_labels=["image 0", "image 1"])
        image_grid(images, **style).save(tmp_path / f"{k}.png")
        layout, _ = grid_layout(4, image_size=(4, 4), **style)
        samples = {"path": str(tmp_path / f"{k}.png"), "layout": dataclasses.asdict(layout), "column": k, "seed": 0}
        configurations[name] = [
            Result(cell=f"c{k}", configuration=name, dataset="digits", seed=0, metrics={}, records=[], samples=samples)
        ]
    configurations["skips=old"] = [
        Result(cell="old", configuration="skips=old", dataset="digits", seed=0, metrics={}, records=[])
    ]  # a grid without a layout: left out
    assert sample_sheet(configurations, tmp_path / "sheet.png", "digits, 16px")
    sheet = np.asarray(Image.open(tmp_path / "sheet.png"))
    layout, _ = grid_layout(
        4, 2, (4, 4), row_labels=["skips=full", "skips=none"], column_labels=["image 0", "image 1"]
    )  # the sheet's cells; its legend only adds below
    originals = solid_cells(4)
    expected = {0: [originals[0], originals[2]], 1: [originals[2], originals[0]]}  # full: column 0; none: column 1
    for row, cells in expected.items():
        x0, y0, _, y1 = layout.cell_box(row, 0)
        assert dark(sheet[y0:y1, : x0 - layout.gap]) > 5  # the configuration's name left of its row
        for column, cell in enumerate(cells):
            x0, y0, x1, y1 = layout.cell_box(row, column)
            assert (sheet[y0 : y1 : layout.scale, x0 : x1 : layout.scale] == np.asarray(cell)).all()
    assert sheet.shape[0] > layout.size[1]  # and a legend under it
    assert not sample_sheet({"skips=old": configurations["skips=old"]}, tmp_path / "none.png", "digits")
    assert not (tmp_path / "none.png").exists()
