"""Every result the README quotes is in a committed JSON under eval/results/.

The README marks a quoted measurement in bold (``**0.92**``, ``**0.92 ± 0.05**``, ``**44%**``). Each bold
number must be found, at the precision written, among the numbers of the JSON files of the results folder
that the same section links to last before it (``eval/results/<name>/...``; bench JSON under
``eval/results`` too). A percentage may also match a fraction (44% ~ 0.44). A bold number in a section
that links to no results folder fails: it has no source.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
RESULTS = REPO / "eval" / "results"
BOLD = re.compile(r"\*\*([^*]+)\*\*")
NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d+\.\d+|\d+|\.\d+)(?:e[-+]?\d+)?(%?)", re.I)
SOURCE = re.compile(r"eval/results/([A-Za-z0-9_.-]+)")
# Bold text that holds numbers without being a measurement (a command, a setting) is written in code spans.
SETTING = re.compile(r"`[^`]*`")


def json_numbers(folder: Path) -> list[float]:
    """Every number (not bool) anywhere in the JSON files below ``folder``."""
    found: list[float] = []

    def walk(value):
        if isinstance(value, bool):
            return
        if isinstance(value, int | float):
            if math.isfinite(value):
                found.append(float(value))
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    for path in sorted(folder.rglob("*.json")):
        walk(json.loads(path.read_text()))
    return found


def matches(text: str, percent: bool, values: list[float]) -> bool:
    """``text`` (as written) equals some value rounded to the written precision (or as a percentage)."""
    written = float(text)
    decimals = len(text.split(".")[1]) if "." in text and "e" not in text.lower() else 0
    if "e" in text.lower():
        tolerance = abs(written) * 0.05
    else:
        tolerance = 0.5 * 10**-decimals + 1e-12
    candidates = values if not percent else [v * 100 for v in values] + values
    return any(abs(abs(v) - abs(written)) <= tolerance for v in candidates)


def quoted_numbers() -> list[tuple[str, int, str, str | None]]:
    """(number, README line, bold text, the results folder it must come from) for every bold number."""
    quoted, source = [], None
    for number, line in enumerate(README.read_text().splitlines(), 1):
        if line.startswith("## "):
            source = None  # a section's sources are its own
        for bold in BOLD.findall(SETTING.sub("", line)):
            for match in NUMBER.finditer(bold):
                quoted.append((match.group(0), number, bold, source, bool(match.group(1))))
        found = SOURCE.findall(line)
        if found:
            source = found[-1]
    return quoted


def test_every_bold_number_in_the_readme_is_in_its_committed_results():
    numbers_by_folder: dict[str, list[float]] = {}
    missing = []
    quoted = quoted_numbers()
    assert quoted, "the README quotes no measured number in bold"
    for text, line, bold, source, percent in quoted:
        value_text = text.rstrip("%")
        if source is None or not (RESULTS / source).is_dir():
            missing.append(f"README:{line} **{bold}**: no eval/results/<folder> linked before it in its section")
            continue
        if source not in numbers_by_folder:
            numbers_by_folder[source] = json_numbers(RESULTS / source)
        if not matches(value_text, percent, numbers_by_folder[source]):
            missing.append(f"README:{line} {text} (in **{bold}**) not found in eval/results/{source}/*.json")
    assert not missing, "\n".join(missing)


def test_the_matcher_reads_precision_and_percentages():
    values = [0.9173, 0.44, 35.36, 2.2e-4]
    assert matches("0.92", False, values) and not matches("0.93", False, values)
    assert matches("44", True, values) and matches("35.4", False, values) and not matches("35.5", False, values)
    assert matches("2.2e-4", False, values)
