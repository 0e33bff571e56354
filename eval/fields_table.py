"""One table across fields: the default job (full skips) against no skips on every field set.

Reads the fields sweep's committed report (``eval/results/fields/summary.json``, from
``python -m skipdiff.report runs/sweeps/fields --out eval/results/fields``) and tests, per field, no skips
against full on the shared training seeds (paired t-test) by the held-out denoising MSE, which every field
has, and by FID minus its floor where the field's extractor is usable for FID (docs/datasets.md: hubble,
moon, textures). One Holm family per metric over the fields. Writes ``fields_table.json`` and
``fields_table.md`` next to the summary.

    python eval/fields_table.py                              # eval/results/fields/fields_table.{json,md}
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from skipdiff.report.ranking import adjust_family, compare
from skipdiff.runfolder import write_json_atomic, write_text_atomic

FID_USABLE = ("hubble", "moon", "textures")  # docs/datasets.md: the extractors that tell real from degraded
REFERENCE, ROW = "skips=full", "skips=none"
METRICS = ("denoise_mse", "fid_minus_floor")


def by_seed(config: dict, key: str) -> dict[int, float]:
    """``{training seed: value}`` of one configuration's metric (None values left out)."""
    return {seed: v for seed, v in zip(config["seeds"], config["values"][key], strict=True) if v is not None}


def field_values(summary: dict) -> dict[str, dict[str, dict]]:
    """field -> metric -> configuration -> {seed: value}: the denoising MSE everywhere, FID minus its floor
    (per seed) where the field's extractor is usable."""
    values: dict[str, dict[str, dict]] = {}
    for name, dataset in sorted(summary["datasets"].items()):
        field = name.split(",")[0]
        configs = {label: dataset["configurations"][label] for label in (REFERENCE, ROW)}
        values[field] = {"denoise_mse": {label: by_seed(c, "denoise") for label, c in configs.items()}}
        if field in FID_USABLE:
            minus = {}
            for label, config in configs.items():
                fid, floor = by_seed(config, "fid"), by_seed(config, "fid_floor")
                minus[label] = {s: fid[s] - floor[s] for s in fid if s in floor}
            values[field]["fid_minus_floor"] = minus
    return values


def rank_fields(values: dict[str, dict[str, dict]]) -> dict[str, dict[str, dict]]:
    """metric -> field -> ranking (:func:`skipdiff.report.ranking.compare`: no skips paired against full on
    the shared seeds), Holm over the fields of each metric as one family (scope "fields")."""
    rankings: dict[str, dict[str, dict]] = {}
    for metric in METRICS:
        results = {
            f: compare(v[metric], REFERENCE, lower_is_better=True, family=None)
            for f, v in values.items()
            if metric in v
        }
        adjust_family(list(results.values()), scope="fields")
        rankings[metric] = results
    return rankings


def _none_row(ranking: dict) -> dict:
    return next(row for row in ranking["rows"] if row["configuration"] == ROW)


def _g(value: float | None) -> str:
    return "–" if value is None else f"{value:.3g}"


def markdown(rankings: dict[str, dict[str, dict]]) -> str:
    lines = [
        "| field | seeds | denoise MSE full | no skips | Δ | detectable | p (Holm over fields) | verdict "
        "| FID−floor Δ | detectable | p (Holm) | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for field, ranking in rankings["denoise_mse"].items():
        full = next(row for row in ranking["rows"] if row["is_reference"])
        m = _none_row(ranking)
        fid = rankings["fid_minus_floor"].get(field)
        f = _none_row(fid) if fid else None
        fid_cells = (
            f"{f['delta']:+.3g} | {_g(f['detectable'])} | {f['p_holm']:.2g} | {f['verdict']}"
            if f
            else "– (extractor not usable) | – | – | –"
        )
        lines.append(
            f"| {field} | {m['shared_seeds']} | {full['mean']:.4g} | {m['mean']:.4g} | {m['delta']:+.4g} | "
            f"{_g(m['detectable'])} | {m['p_holm']:.2g} | {m['verdict']} | {fid_cells} |"
        )
    lines += [
        "",
        "Δ = no skips minus full, mean over the shared training seeds (paired); p: paired t-test, Holm over the "
        "fields per metric; detectable = the smallest true Δ the paired test finds with power 0.8 at Holm's "
        "first-step level (0.05 / fields). FID minus floor only where the field's extractor tells real from "
        "degraded images.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default="eval/results/fields")
    args = parser.parse_args()
    folder = Path(args.results)
    rankings = rank_fields(field_values(json.loads((folder / "summary.json").read_text())))
    write_json_atomic(folder / "fields_table.json", {"command": "python eval/fields_table.py", "rankings": rankings})
    write_text_atomic(folder / "fields_table.md", markdown(rankings))
    print(markdown(rankings))


if __name__ == "__main__":
    main()
