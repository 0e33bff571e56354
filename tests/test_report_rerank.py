"""The committed re-rankings (eval/results/<sweep>/ranking.json and ranking.md) are what eval/rerank.py
computes today from the committed summary.json with the options each ranking.json records (reference,
within, margins, family, test, interaction): a change to the statistics fails here until they are
regenerated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.eval_scripts import eval_script

REPO = Path(__file__).resolve().parents[1]
RANKINGS = sorted((REPO / "eval" / "results").glob("*/ranking*.json"))  # ranking.json and named ones (--name)


def rerank_module():
    return eval_script("rerank")


@pytest.mark.parametrize("path", RANKINGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_committed_ranking_is_regenerated_from_its_recorded_options(path, monkeypatch):
    rerank = rerank_module()
    committed = json.loads(path.read_text())
    monkeypatch.chdir(REPO)  # the recorded source path is relative to the repository
    folder = path.parent.relative_to(REPO)
    fresh = rerank.rerank(
        folder,
        committed["reference"],
        committed["within"],
        committed["margins"],
        committed["family"],
        committed["test"],
        committed["interaction"],
    )
    if "name" in committed:  # a second ranking of the folder, written with --name
        fresh["name"] = committed["name"]
    assert json.loads(json.dumps(fresh)) == committed
    assert rerank.markdown(fresh) == path.with_suffix(".md").read_text()


def test_interaction_contrasts_the_effect_across_objectives(tmp_path):
    rerank = rerank_module()
    table = {}
    for objective, penalty in (("eps", 20.0), ("v", 1.0)):
        table[f"skips=full, p={objective}"] = {"seeds": [0, 1, 2], "values": {"fid": [5.0, 6.0, 5.5]}}
        table[f"skips=none, p={objective}"] = {
            "seeds": [0, 1, 2],
            "values": {"fid": [5.0 + penalty, 6.1 + penalty, 5.4 + penalty]},
        }
    (tmp_path / "summary.json").write_text(json.dumps({"datasets": {"d": {"configurations": table}}}))
    out = rerank.rerank(tmp_path, within="p", interaction="eps")
    (row,) = [r for r in out["interactions"]["d"]["fid"]["rows"] if r["configuration"] != "no interaction"]
    assert row["configuration"] == "skips=none: effect under eps − under v"
    assert row["values_by_seed"] == pytest.approx({"0": 19.0, "1": 19.0, "2": 19.0}) and row["p"] is None  # sd 0
    with pytest.raises(ValueError, match="needs --within"):
        rerank.rerank(tmp_path, interaction="eps")
