"""Re-rank a committed sweep's per-seed results with the report's statistics, without its run folders.

Sweeps run before the report compared against a named reference (paired by training seed, Holm-corrected)
left their per-seed values in ``eval/results/<sweep>/summary.json``; their run folders are not committed.
This script applies ``skipdiff.report.ranking`` to those values and writes ``ranking.json`` and
``ranking.md`` next to them (the old ``report.md`` stays as it was written). Floors per sampling seed and
KID need the run folders, so they are not part of a re-ranking.

    python eval/rerank.py eval/results/markov eval/results/cpu_digits --margin fid_minus_floor=0.1
    python eval/rerank.py eval/results/confounds --within prediction_type --family section \
        --interaction epsilon   # full vs none/removed per objective, and the no-skip penalty across objectives

``--margin METRIC=M`` declares an equivalence margin (``fid_minus_floor`` and ``fid`` are the same: every
row of a sweep shares the floor at each sampling seed, so their paired differences are equal; ``denoise``
or ``denoise_mse``). ``--family`` declares the Holm family: ``table`` (each dataset/group and metric),
``metric`` (every group of one metric together) or ``section`` (every table of the folder). All three are
recorded in ranking.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from skipdiff.report.markdown import detectable_note, family_text, ranking_table
from skipdiff.report.ranking import BETTER, TESTS, WORSE, adjust_family, compare, parse_margins, rank_against
from skipdiff.runfolder import read_json, write_json_atomic

METRICS = {"fid": "FID", "denoise": "denoising MSE"}
FAMILIES = ("table", "metric", "section")
NO_INTERACTION = "no interaction"


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


def _by_seed(row: dict, metric: str) -> dict[int, float]:
    return dict(zip(row["seeds"], row["values"][metric], strict=True))


def _has(table: dict, metric: str) -> bool:
    return any(v is not None for row in table.values() for v in row["values"].get(metric, []))


def _family_key(family: str, dataset: str, metric: str) -> tuple:
    return {"table": (dataset, metric), "metric": (metric,), "section": ()}[family]


def interactions(
    table: dict, reference: str, within: str, base: str, metric: str, margin: float | None, test: str
) -> dict:
    """Is a configuration's effect (its paired difference from the reference) the same at every value of
    ``within``? For each configuration X and value v != ``base``, per training seed
    (X_base - ref_base) - (X_v - ref_v): the effect under ``base`` minus under v, tested against 0 on the
    seeds all four cells share; one Holm family over them. Verdicts: "larger under <base>", "smaller under
    <base>" or undecided."""
    groups = _groups(table, reference, within)
    base_label = f" · {within}={base}"
    if base_label not in groups:
        raise ValueError(f"--interaction {base!r}: no {within}={base} among {sorted(groups)}")
    base_ref, base_rows = groups[base_label]
    effects = {}
    for name in base_rows:
        if name == base_ref or " · " in name:
            continue
        others = {k: v for k, v in _parts(name).items() if k != within}
        for label, (ref_v, rows_v) in groups.items():
            match = [
                n for n in rows_v if {k: v for k, v in _parts(n).items() if k != within} == others and " · " not in n
            ]
            if label == base_label or len(match) != 1:
                continue
            a, ra, b, rb = (_by_seed(table[n], metric) for n in (name, base_ref, match[0], ref_v))
            seeds = sorted(set(a) & set(ra) & set(b) & set(rb))
            other = label.split("=", 1)[1]
            key = f"{', '.join(f'{k}={v}' for k, v in others.items())}: effect under {base} − under {other}"
            effects[key] = {s: (a[s] - ra[s]) - (b[s] - rb[s]) for s in seeds}
    if not effects:
        raise ValueError(f"--interaction {base!r}: no configuration appears at {within}={base} and another value")
    seeds = sorted({s for values in effects.values() for s in values})
    result = rank_against(
        {s: 0.0 for s in seeds}, effects, margin=margin, family="interaction", test=test, reference_name=NO_INTERACTION
    )
    wording = {WORSE: f"larger under {base}", BETTER: f"smaller under {base}"}  # "worse" would misread here
    for row in result["rows"]:
        row["verdict"] = wording.get(row["verdict"], row["verdict"])
    return result


def rerank(
    folder: Path,
    reference: str = "skips=full",
    within: str | None = None,
    margins: dict | None = None,
    family: str = "table",
    test: str = "t",
    interaction: str | None = None,
) -> dict:
    """Rankings of every metric in ``METRICS`` for every dataset of ``folder``/summary.json; with ``within``
    (an axis of the grid), one ranking per value of that axis against the reference at the same value
    (e.g. no skips against full under the same prediction type). ``margins``: metric -> equivalence margin;
    ``family``: one of :data:`FAMILIES`; ``interaction``: a value of ``within`` whose effects are tested
    against every other value's (:func:`interactions`)."""
    if family not in FAMILIES:
        raise ValueError(f"--family {family!r}: choose one of {FAMILIES}")
    if interaction is not None and within is None:
        raise ValueError("--interaction needs --within (the axis whose values are compared)")
    margins = parse_margins(margins)
    summary = read_json(folder / "summary.json", "sweep summary")
    out = {
        "source": str(folder / "summary.json"),
        "reference": reference,
        "within": within,
        "margins": margins,
        "family": family,
        "test": test,
        "datasets": {},
    }
    families: dict[tuple, list[dict]] = {}  # the tables of each Holm family, adjusted once all are ranked
    for dataset, entry in summary["datasets"].items():
        for label, (group_reference, table) in _groups(entry["configurations"], reference, within).items():
            inference = [name for name in table if name.endswith("(inference)")]
            tables = out["datasets"].setdefault(dataset + label, {})
            for metric in (m for m in METRICS if _has(table, m)):
                result = compare(
                    {name: _by_seed(row, metric) for name, row in table.items()},
                    group_reference,
                    True,
                    inference,
                    margin=margins.get(metric),
                    test=test,
                    family=None,
                )
                tables[metric] = result
                families.setdefault(_family_key(family, dataset, metric), []).append(result)
        if interaction is not None:
            out.setdefault("interactions", {})[dataset] = {
                metric: interactions(
                    entry["configurations"], reference, within, interaction, metric, margins.get(metric), test
                )
                for metric in METRICS
                if _has(entry["configurations"], metric)
            }
    for results in families.values():
        adjust_family(results, family)
    out["interaction"] = interaction
    return out


def _command(ranking: dict) -> str:
    margins = "".join(f" --margin {metric}={value:g}" for metric, value in sorted(ranking.get("margins", {}).items()))
    return (
        "python eval/rerank.py "
        + str(Path(ranking["source"]).parent)
        + (f" --reference {ranking['reference']}" if ranking["reference"] != "skips=full" else "")
        + (f" --within {ranking['within']}" if ranking.get("within") else "")
        + (f" --family {ranking['family']}" if ranking.get("family", "table") != "table" else "")
        + (f" --test {ranking['test']}" if ranking.get("test", "t") != "t" else "")
        + (f" --interaction {ranking['interaction']}" if ranking.get("interaction") else "")
        + margins
        + (f" --name {ranking['name']}" if "name" in ranking else "")
    )


def markdown(ranking: dict) -> str:
    """A table per dataset and metric: Δ vs the reference with its CI, test, raw and Holm p, TOST p where a
    margin is declared, verdict; then the interaction tables."""
    within = f" within each {ranking['within']}" if ranking.get("within") else ""
    margins = ", ".join(f"{METRICS.get(m, m)} ±{v:g}" for m, v in sorted(ranking.get("margins", {}).items())) or "none"
    lines = [
        f"# Re-ranked from `{ranking['source']}` against `{ranking['reference']}`{within}",
        "",
        "Each row against the reference on its own paired differences over shared training seeds (paired t-test; "
        "a row with one shared seed is exploratory: values, no p), with two one-sided tests of equivalence "
        f"where a margin is declared (margins: {margins}). Verdicts: better / worse / equivalent within ±m / "
        f"undecided at this seed count, at α = 0.05 after Holm over the declared family (`{ranking['family']}`). "
        f"Regenerate with `{_command(ranking)}`.",
        "",
    ]
    for dataset, metrics in ranking["datasets"].items():
        for metric, result in metrics.items():
            lines += [
                f"## {dataset}: {METRICS[metric]}",
                "",
                *ranking_table(result, METRICS[metric]),
                "",
                f"p (Holm): {family_text(result)}.",
                "",
                detectable_note(result, METRICS[metric]),
                "",
            ]
    for dataset, metrics in ranking.get("interactions", {}).items():
        for metric, result in metrics.items():
            lines += [
                f"## {dataset}: interaction, {METRICS[metric]}",
                "",
                f"Per training seed, a configuration's paired difference from the reference under "
                f"{ranking['within']}={ranking['interaction']} minus the same difference under another value, "
                "against 0 (Δ > 0: the effect is larger under the first).",
                "",
                *ranking_table(result, f"{METRICS[metric]} effect difference"),
                "",
                f"p (Holm): {family_text(result)}.",
                "",
                detectable_note(result, METRICS[metric]),
                "",
            ]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", help="eval/results/<sweep> folders holding summary.json")
    parser.add_argument("--reference", default="skips=full")
    parser.add_argument("--within", help="rank separately for each value of this grid axis (e.g. prediction_type)")
    parser.add_argument(
        "--margin",
        action="append",
        default=[],
        metavar="METRIC=M",
        help="equivalence margin, e.g. fid_minus_floor=0.1 or denoise_mse=0.0005 (repeatable)",
    )
    parser.add_argument("--family", choices=FAMILIES, default="table", help="the Holm family (default: each table)")
    parser.add_argument("--test", choices=TESTS, default="t", help="paired t, or sign-flip where a row has >= 6 pairs")
    parser.add_argument(
        "--interaction",
        metavar="VALUE",
        help="with --within: test each configuration's effect at this value against every other value",
    )
    parser.add_argument(
        "--name", default="ranking", help="write <name>.json and <name>.md (another name keeps a second ranking)"
    )
    args = parser.parse_args(argv)
    for folder in map(Path, args.folders):
        ranking = rerank(folder, args.reference, args.within, args.margin, args.family, args.test, args.interaction)
        if args.name != "ranking":  # recorded only when not the default, so the committed rankings stay as they are
            ranking["name"] = args.name
        write_json_atomic(folder / f"{args.name}.json", ranking)
        (folder / f"{args.name}.md").write_text(markdown(ranking))
        print(f"wrote {folder / args.name}.json and {args.name}.md")


if __name__ == "__main__":
    main()
