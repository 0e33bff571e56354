"""eval/rerank.py: re-ranking a committed summary, as a whole or within each value of a grid axis."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location("rerank", Path(__file__).resolve().parents[1] / "eval" / "rerank.py")
rerank = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(rerank)


def summary(tmp_path: Path, fids: dict[str, list[float]]) -> Path:
    """A summary.json with one dataset whose configurations have these FIDs on seeds 0, 1, 2."""
    rows = {
        name: {"seeds": [0, 1, 2], "values": {"fid": values, "denoise": [None] * 3}} for name, values in fids.items()
    }
    (tmp_path / "summary.json").write_text(json.dumps({"datasets": {"d": {"configurations": rows}}}))
    return tmp_path


def test_within_an_axis_each_group_is_ranked_against_its_own_reference(tmp_path):
    folder = summary(
        tmp_path,
        {
            "skips=full, prediction_type=epsilon": [1.0, 1.1, 1.2],
            "skips=none, prediction_type=epsilon": [9.0, 9.5, 10.1],
            "skips=full, prediction_type=sample": [3.0, 3.2, 3.1],
            "skips=none, prediction_type=sample": [3.1, 3.3, 3.15],
        },
    )
    ranking = rerank.rerank(folder, "skips=full", within="prediction_type")
    assert set(ranking["datasets"]) == {"d · prediction_type=epsilon", "d · prediction_type=sample"}
    epsilon = ranking["datasets"]["d · prediction_type=epsilon"]["fid"]
    assert epsilon["reference"] == "skips=full, prediction_type=epsilon"
    none = next(r for r in epsilon["rows"] if r["configuration"].startswith("skips=none"))
    # issue 26: the verdicts are better / worse / equivalent within ±m / undecided
    assert none["delta"] == pytest.approx(25.3 / 3) and none["verdict"] == "worse"
    sample = ranking["datasets"]["d · prediction_type=sample"]["fid"]
    assert [r["configuration"] for r in sample["rows"]] == [
        "skips=full, prediction_type=sample",
        "skips=none, prediction_type=sample",
    ]
    assert "denoise" not in ranking["datasets"]["d · prediction_type=sample"]  # no values: no table
    # without an axis, one table against the named reference
    whole = rerank.rerank(folder, "skips=full, prediction_type=epsilon")["datasets"]["d"]["fid"]
    assert len(whole["rows"]) == 4 and whole["reference"] == "skips=full, prediction_type=epsilon"


def test_a_group_without_exactly_one_reference_is_named(tmp_path):
    folder = summary(
        tmp_path,
        {
            "skips=full, prediction_type=epsilon": [1.0, 1.1, 1.2],
            "skips=none, prediction_type=sample": [3.1, 3.3, 3.15],
        },
    )
    with pytest.raises(ValueError, match=r"prediction_type=sample: 0 configurations match the reference 'skips=full'"):
        rerank.rerank(folder, "skips=full", within="prediction_type")
