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
import statistics
from pathlib import Path

from skipdiff.report.stats import detectable_difference, holm, paired_test
from skipdiff.runfolder import write_json_atomic, write_text_atomic

FID_USABLE = ("hubble", "moon", "textures")  # docs/datasets.md: the extractors that tell real from degraded
REFERENCE, ROW = "skips=full", "skips=none"


def by_seed(config: dict, key: str) -> dict[int, float]:
    """``{training seed: value}`` of one configuration's metric (None values left out)."""
    return {seed: v for seed, v in zip(config["seeds"], config["values"][key], strict=True) if v is not None}


def compare(full: dict[int, float], none: dict[int, float]) -> dict:
    """No skips minus full on the shared seeds: the paired test and its smallest detectable difference."""
    seeds = sorted(set(full) & set(none))
    differences = [none[s] - full[s] for s in seeds]
    test = paired_test([none[s] for s in seeds], [full[s] for s in seeds])
    sd = statistics.stdev(differences) if len(differences) > 1 else None
    return {
        "seeds": seeds,
        "full": statistics.fmean(full[s] for s in seeds),
        "none": statistics.fmean(none[s] for s in seeds),
        "delta": statistics.fmean(differences),
        "differences": differences,
        "p": test.p if test else None,
        "sd_differences": sd,
    }


def field_rows(summary: dict) -> dict[str, dict]:
    """Per field: the denoising-MSE comparison and, where usable, FID minus floor."""
    rows = {}
    for name, dataset in sorted(summary["datasets"].items()):
        field = name.split(",")[0]
        configs = dataset["configurations"]
        full, none = configs[REFERENCE], configs[ROW]
        row = {"denoise_mse": compare(by_seed(full, "denoise"), by_seed(none, "denoise"))}
        if field in FID_USABLE:
            minus = {}
            for label, config in ((REFERENCE, full), (ROW, none)):
                fid, floor = by_seed(config, "fid"), by_seed(config, "fid_floor")
                minus[label] = {s: fid[s] - floor[s] for s in fid if s in floor}
            row["fid_minus_floor"] = compare(minus[REFERENCE], minus[ROW])
        rows[field] = row
    return rows


def add_holm(rows: dict[str, dict]) -> None:
    """One Holm family per metric over the fields that have it; verdict at 0.05."""
    for metric in ("denoise_mse", "fid_minus_floor"):
        fields = [f for f in rows if metric in rows[f]]
        adjusted = holm([rows[f][metric]["p"] for f in fields])
        for field, p in zip(fields, adjusted, strict=True):
            entry = rows[field][metric]
            entry["p_holm"] = p
            n, sd = len(entry["seeds"]), entry["sd_differences"]  # detectable at Holm's first-step level
            entry["detectable_at_holm_first_step"] = (
                detectable_difference(sd, n, n - 1, alpha=0.05 / len(fields)) if sd else None
            )
            entry["family"] = {"metric": metric, "fields": fields}
            if p is not None and p < 0.05:
                entry["verdict"] = "worse without skips" if entry["delta"] > 0 else "better without skips"
            else:
                entry["verdict"] = "undecided at this seed count"


def markdown(rows: dict[str, dict]) -> str:
    lines = [
        "| field | seeds | denoise MSE full | no skips | Δ | detectable | p (Holm over fields) | verdict "
        "| FID−floor Δ | detectable | p (Holm) | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for field, row in rows.items():
        m = row["denoise_mse"]
        fid = row.get("fid_minus_floor")
        fid_cells = (
            f"{fid['delta']:+.3g} | {_g(fid['detectable_at_holm_first_step'])} | {fid['p_holm']:.2g} | {fid['verdict']}"
            if fid
            else "– (extractor not usable) | – | – | –"
        )
        lines.append(
            f"| {field} | {len(m['seeds'])} | {m['full']:.4g} | {m['none']:.4g} | {m['delta']:+.4g} | "
            f"{_g(m['detectable_at_holm_first_step'])} | "
            f"{m['p_holm']:.2g} | {m['verdict']} | {fid_cells} |"
        )
    lines += [
        "",
        "Δ = no skips minus full, mean over the shared training seeds (paired); p: paired t-test, Holm over the "
        "fields per metric; detectable = the smallest true Δ the paired test finds with power 0.8 at Holm's "
        "first-step level (0.05 / fields). FID minus floor only where the field's extractor tells real from "
        "degraded images.",
    ]
    return "\n".join(lines) + "\n"


def _g(value: float | None) -> str:
    return "–" if value is None else f"{value:.3g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default="eval/results/fields")
    args = parser.parse_args()
    folder = Path(args.results)
    rows = field_rows(json.loads((folder / "summary.json").read_text()))
    add_holm(rows)
    write_json_atomic(folder / "fields_table.json", {"command": "python eval/fields_table.py", "fields": rows})
    write_text_atomic(folder / "fields_table.md", markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
