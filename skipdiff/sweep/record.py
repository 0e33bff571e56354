"""A cell's record, ``<cell folder>/cell.json``: read by the cell's state machine (:mod:`.cells`), the
runner and the kinds (:mod:`.kinds`, an inference cell's evaluation reads its options from it).

Its own module, below both :mod:`.cells` and :mod:`.kinds`, so that neither imports the other to read it.
"""

from __future__ import annotations

from pathlib import Path

from ..runfolder import read_json

CELL_FILE = "cell.json"


def read_cell(folder: Path) -> dict | None:
    """A cell folder's ``cell.json`` (None when there is none)."""
    path = Path(folder) / CELL_FILE
    return read_json(path, "cell record") if path.is_file() else None
