"""Re-rank a committed sweep's per-seed results with the report's statistics, without its run folders.

Sweeps run before the report compared against a named reference (paired by training seed, Holm-corrected)
left their per-seed values in ``eval/results/<sweep>/summary.json``; their run folders are not committed.
This script applies ``skipdiff.report.ranking.compare`` to those values and writes ``ranking.json`` and
``ranking.md`` next to them (the old ``report.md`` stays as it was written). Floors per sampling seed and
KID need the run folders, so they are not part of a re-ranking.

    python eval/rerank.py eval/results/markov eval/results/cpu_digits
"""

from __future__ import annotations

import argparse
from pathlib import Path

from skipdiff.report.ranking import compare
from skipdiff.runfolder import read_json, write_json_atomic

METRICS = {"fid": "FID", "denoise": "denoising MSE"}


def rerank(folder: Path, reference: str = "skips=full") -> dict:
    """Rankings of every metric in ``METRICS`` for every dataset of ``folder``/summary.json."""
    summary = read_json(folder / "summary.json", "sweep summary")
    out = {"source": str(folder / "summary.json"), "reference": reference, "datasets": {}}
    for dataset, entry in summary["datasets"].items():
        table = entry["configurations"]
        inference = [name for name in table if name.endswith("(inference)")]
        out["datasets"][dataset] = {
            metric: compare({name: dict(zip(row["seeds"], row["values"][metric], strict=True)) for name, row in table.items()},
                            reference, True, inference)  # fmt: skip
            for metric in METRICS
            if any(v is not None for row in table.values() for v in row["values"].get(metric, []))
        }
    return out


def markdown(ranking: dict) -> str:
    """A table per dataset and metric: Δ vs the reference with its CI, test, raw and Holm p, verdict."""
    lines = [f"# Re-ranked from `{ranking['source']}` against `{ranking['reference']}`", "",
             "Paired t-tests on shared training seeds (a one-seed row against the pooled sd of paired differences; "
             "MAP/inference rows never pooled), Holm's correction over each table. Regenerate with "
             "`python eval/rerank.py " + str(Path(ranking["source"]).parent) + "`.", ""]  # fmt: skip
    for dataset, metrics in ranking["datasets"].items():
        for metric, result in metrics.items():
            lines += [f"## {dataset}: {METRICS[metric]}", "",
                      "| configuration | seeds | mean | Δ vs reference (95% CI) | test | p | Holm p | verdict |",
                      "|---|---|---|---|---|---|---|---|"]  # fmt: skip
            for row in result["rows"]:
                ci = row.get("ci") or (None, None)
                interval = "–" if ci[0] is None else f"{row['delta']:+.3g} ({ci[0]:+.3g}, {ci[1]:+.3g})"
                p = "–" if row["p"] is None else f"{row['p']:.2g}"
                holm = "–" if row["p_holm"] is None else f"{row['p_holm']:.2g}"
                lines.append(f"| {row['configuration']} | {row['seeds']} | {row['mean']:.4g} | {interval} | "
                             f"{row['test'] or '–'} | {p} | {holm} | {row['verdict']} |")  # fmt: skip
            detect = result["detectable"]
            notes = [f"paired on {d['n']} seeds: {d['delta']:.3g}" for d in [detect.get("paired")] if d]
            notes += [f"one seed (pooled): {d['delta']:.3g}" for d in [detect.get("one_seed")] if d]
            if notes:
                lines += ["", "Smallest difference detectable at α 0.05 with power 0.8: " + "; ".join(notes) + "."]
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", help="eval/results/<sweep> folders holding summary.json")
    parser.add_argument("--reference", default="skips=full")
    args = parser.parse_args()
    for folder in map(Path, args.folders):
        ranking = rerank(folder, args.reference)
        write_json_atomic(folder / "ranking.json", ranking)
        (folder / "ranking.md").write_text(markdown(ranking))
        print(f"wrote {folder / 'ranking.json'} and ranking.md")


if __name__ == "__main__":
    main()
