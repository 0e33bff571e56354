"""Re-rank a committed sweep's per-seed results with the report's statistics, without its run folders.

Sweeps run before the report compared against a named reference (paired by training seed, Holm-corrected)
left their per-seed values in ``eval/results/<sweep>/summary.json``; their run folders are not committed.
This script applies ``skipdiff.report.ranking.compare`` to those values and writes ``ranking.json`` and
``ranking.md`` next to them (the old ``report.md`` stays as it was written). Floors per sampling seed and
KID need the run folders, so they are not part of a re-ranking.

    python eval/rerank.py eval/results/markov eval/results/cpu_digits
    python eval/rerank.py eval/results/confounds --within prediction_type   # full vs none/removed per objective
"""

from __future__ import annotations

import argparse
from pathlib import Path

from skipdiff.report.markdown import detectable_note, ranking_table
from skipdiff.report.ranking import compare
from skipdiff.runfolder import read_json, write_json_atomic

METRICS = {"fid": "FID", "denoise": "denoising MSE"}


def _parts(configuration: str) -> dict[str, str]:
    """``"skips=full, prediction_type=epsilon"`` -> ``{"skips": "full", "prediction_type": "epsilon"}``."""
    return dict(part.split("=", 1) for part in configuration.split(" · ")[0].split(", ") if "=" in part)


def _groups(table: dict, reference: str, within: str | None) -> dict[str, tuple[str, dict]]:
    """Label -> (reference configuration, rows) for each group: the whole table, or one group per value of
    the axis ``within``, each with the configuration that matches ``reference`` at that value."""
    if within is None:
        return {"": (reference, table)}
    groups: dict[str, tuple[str, dict]] = {}
    wanted = _parts(reference)
    for value in sorted({_parts(name).get(within) for name in table} - {None}):
        rows = {name: row for name, row in table.items() if _parts(name).get(within) == value}
        matches = [name for name in rows if wanted.items() <= _parts(name).items() and " · " not in name]
        if len(matches) != 1:
            raise ValueError(f"{within}={value}: {len(matches)} configurations match the reference {reference!r}")
        groups[f" · {within}={value}"] = (matches[0], rows)
    return groups


def rerank(folder: Path, reference: str = "skips=full", within: str | None = None) -> dict:
    """Rankings of every metric in ``METRICS`` for every dataset of ``folder``/summary.json; with ``within``
    (an axis of the grid), one ranking per value of that axis against the reference at the same value
    (e.g. no skips against full under the same prediction type)."""
    summary = read_json(folder / "summary.json", "sweep summary")
    out = {"source": str(folder / "summary.json"), "reference": reference, "within": within, "datasets": {}}
    for dataset, entry in summary["datasets"].items():
        for label, (group_reference, table) in _groups(entry["configurations"], reference, within).items():
            inference = [name for name in table if name.endswith("(inference)")]
            out["datasets"][dataset + label] = {
                metric: compare({name: dict(zip(row["seeds"], row["values"][metric], strict=True))
                                 for name, row in table.items()}, group_reference, True, inference)  # fmt: skip
                for metric in METRICS
                if any(v is not None for row in table.values() for v in row["values"].get(metric, []))
            }
    return out


def markdown(ranking: dict) -> str:
    """A table per dataset and metric: Δ vs the reference with its CI, test, raw and Holm p, verdict."""
    within = f" within each {ranking['within']}" if ranking.get("within") else ""
    lines = [f"# Re-ranked from `{ranking['source']}` against `{ranking['reference']}`{within}", "",
             "Paired t-tests on shared training seeds (a one-seed row against the pooled sd of paired differences; "
             "MAP/inference rows never pooled), Holm's correction over each table. Regenerate with "
             "`python eval/rerank.py " + str(Path(ranking["source"]).parent)
             + (f" --reference {ranking['reference']}" if ranking["reference"] != "skips=full" else "")
             + (f" --within {ranking['within']}" if ranking.get("within") else "") + "`.", ""]  # fmt: skip
    for dataset, metrics in ranking["datasets"].items():
        for metric, result in metrics.items():
            lines += [f"## {dataset}: {METRICS[metric]}", "", *ranking_table(result, METRICS[metric]), "",
                      detectable_note(result, METRICS[metric]), ""]  # fmt: skip
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", help="eval/results/<sweep> folders holding summary.json")
    parser.add_argument("--reference", default="skips=full")
    parser.add_argument("--within", help="rank separately for each value of this grid axis (e.g. prediction_type)")
    args = parser.parse_args()
    for folder in map(Path, args.folders):
        ranking = rerank(folder, args.reference, args.within)
        write_json_atomic(folder / "ranking.json", ranking)
        (folder / "ranking.md").write_text(markdown(ranking))
        print(f"wrote {folder / 'ranking.json'} and ranking.md")


if __name__ == "__main__":
    main()
