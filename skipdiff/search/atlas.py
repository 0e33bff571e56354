"""Several fields' searches side by side: the skip atlas.

    python -m skipdiff.search.atlas eval/results/atlas/digits eval/results/atlas/hubble ... \\
        --out eval/results/atlas --margin denoise_mse=0.003 --margin fid=0.3

Each input is a search's report folder (``python -m skipdiff.report <search folder> --out <folder>``): its
``search_summary.json`` and, once the confirmation ran, ``confirmation/summary.json``. The folder's name
is the field's label. Writes into ``--out``:

* ``atlas.json``: per field the search (trials, CPU time, the best trial seen, flagged as biased), the
  confirmation (every confirmed configuration against the field's ``full`` on the fresh seeds, by the
  held-out denoising MSE and by FID, paired by seed), parameter importance, the quality-against-FLOPs
  front and the Markov chain's learned open rates;
* ``atlas.md``: the same as tables; ``importance.png`` (field x parameter) and ``front.png``;
* with transfer runs (``<field>/transfer/summary.json``: every other field's confirmed best trained on this
  field, on the first confirmation seeds), the field x configuration matrix ``transfer.png``: each
  configuration against the target field's ``full``, paired by seed, Holm over the whole matrix.

The confirmations' tests form **one declared Holm family per metric over the whole atlas** (every field's
rows), because the atlas's claims ("on which fields does a searched configuration beat full") are read
across fields; each row also gets a TOST p of equivalence within the declared margin, so "no better than
full" is claimed only where equivalence is shown. A field whose confirmation has not run is listed with
its search alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from ..report.ranking import adjust_family, compare, parse_margins
from ..runfolder import read_json, write_json_atomic
from . import atlas_figures as figures

RERUN = "full-rerun"  # the transfer's null control (eval/atlas.py): the target's full trained again
REFERENCE = "reference"  # the confirmation's name for the reference row (skipdiff.search.confirm)
# the report's metric names (skipdiff.report.ranking.METRIC_ALIASES: --margin denoise_mse=... means "denoise")
DEFAULT_MARGINS = {"denoise": 0.003, "fid": 0.3}
METRICS = {"denoise": "held-out denoising MSE", "fid": "FID (differences equal FID minus floor's)"}


def _label(name: str) -> str:
    return name.removeprefix("config=")


def _by_seed(rows: list[dict]) -> dict[str, dict[int, float]]:
    """A ranking's rows -> configuration -> {training seed: value}."""
    return {_label(r["configuration"]): {int(s): v for s, v in r["values_by_seed"].items()} for r in rows}


def _confirmation_table(folder: Path) -> dict | None:
    """The confirmation sweep's (only) table of its report's summary.json; None before it ran."""
    path = folder / "confirmation" / "summary.json"
    return next(iter(read_json(path, "confirmation summary")["datasets"].values())) if path.is_file() else None


def confirmed_values(folder: Path) -> dict[str, dict[str, dict[int, float]]]:
    """metric -> configuration -> {training seed: value} of a field's confirmation (empty when not run)."""
    values: dict[str, dict[str, dict[int, float]]] = {}
    summary = read_json(folder / "search_summary.json", "search summary")
    ranking = (summary.get("confirmation") or {}).get("ranking")
    if ranking:
        values["denoise"] = _by_seed(ranking["rows"])
    fid = (_confirmation_table(folder) or {}).get("ranking")
    if fid and fid.get("metric") == "fid":
        values["fid"] = _by_seed(fid["rows"])
    return values


def confirmation_floor(folder: Path) -> float | None:
    """The mean real-vs-real FID floor of a field's confirmation (the same for every row)."""
    return ((_confirmation_table(folder) or {}).get("fid_floor") or {}).get("mean")


def confirmed_best(values: dict[str, dict[str, dict[int, float]]]) -> str | None:
    """The label of a field's confirmed best configuration: the lowest mean held-out MSE on the fresh seeds
    among the confirmed rows (not the reference); None before the confirmation."""
    rows = {k: v for k, v in values.get("denoise", {}).items() if k != REFERENCE and v}
    return min(rows, key=lambda k: statistics.fmean(rows[k].values())) if rows else None


def transfer_values(folder: Path) -> dict[str, dict[str, dict[int, float]]]:
    """metric -> source label (``from-<field>``) -> {training seed: value} of a field's transfer sweep."""
    path = folder / "transfer" / "summary.json"
    if not path.is_file():
        return {}
    table = next(iter(read_json(path, "transfer summary")["datasets"].values()))
    values: dict[str, dict[str, dict[int, float]]] = {}
    for name, configuration in table["configurations"].items():
        for metric, key in (("denoise", "denoise"), ("fid", "fid")):
            found = configuration["values"].get(key) or []
            pairs = {int(s): v for s, v in zip(configuration["seeds"], found, strict=True) if v is not None}
            if pairs:
                values.setdefault(metric, {})[_label(name)] = pairs
    return values


OWN_BEST = "own best"  # the transfer matrix's column of the target's own confirmed best
OWN_RERUN = "own-best-rerun"  # the target's own best, trained again by the transfer sweep (eval/atlas.py)


def _transfer_rows(
    own: dict[str, dict[int, float]], best: str | None, transferred: dict[str, dict[int, float]]
) -> dict:
    """The matrix's rows of one target and metric: its full and own best from the transfer sweep itself
    (trained in the same session, with the same VAE, as every transferred configuration) where it ran them,
    else from the confirmation on the transfer's seeds; then each transferred configuration."""
    seeds = {s for values in transferred.values() for s in values}
    reference = transferred.get(RERUN) or {s: v for s, v in own[REFERENCE].items() if s in seeds}
    rows = {REFERENCE: reference, **{k: v for k, v in transferred.items() if k not in (RERUN, OWN_RERUN)}}
    if OWN_RERUN in transferred:
        rows[OWN_BEST] = transferred[OWN_RERUN]
    elif best is not None:
        rows[OWN_BEST] = {s: v for s, v in own[best].items() if s in seeds}
    return rows


def rank_transfer(
    values_by_field: dict[str, dict], transfer_by_field: dict[str, dict], margins: dict[str, float] | None = None
) -> dict:
    """The transfer matrix per metric, on the transfer's seeds, paired by seed, Holm over each whole matrix
    (scope "transfer"): ``transfer[metric][target]`` ranks every transferred configuration and the target's
    own best against the target's full; ``transfer["against_own_best"][metric][target]`` ranks the transferred
    configurations against that own best (does a field's best carry over as well as the target's own?);
    ``transfer["null_control"][metric][target]`` ranks the full trained again by the transfer sweep against
    the confirmation's full on the same seeds (how far a rerun in another session lands from it: the reason
    the matrix pairs within the transfer sweep); ``transfer["own_best"][target]`` names the own best. With
    ``margins`` (metric -> m) every row also gets its TOST of equivalence within ±m."""
    rankings: dict = {"own_best": {}, "against_own_best": {}, "null_control": {}}
    for metric in METRICS:
        margin = (margins or {}).get(metric)
        against_full, against_own, control = {}, {}, {}
        for field, transferred in transfer_by_field.items():
            own = values_by_field[field].get(metric, {})
            if REFERENCE not in own or metric not in transferred:
                continue
            best = confirmed_best(values_by_field[field])
            rows = _transfer_rows(own, best, transferred[metric])
            if best is not None:
                rankings["own_best"][field] = best
            if OWN_BEST in rows:
                against_own[field] = compare(
                    {k: v for k, v in rows.items() if k != REFERENCE},
                    OWN_BEST,
                    lower_is_better=True,
                    margin=margin,
                    family=None,
                )
            against_full[field] = compare(rows, REFERENCE, lower_is_better=True, margin=margin, family=None)
            if RERUN in transferred[metric]:
                control[field] = compare(
                    {"confirmation's full": own[REFERENCE], RERUN: transferred[metric][RERUN]},
                    "confirmation's full",
                    lower_is_better=True,
                    family="table",
                )
        adjust_family(list(against_full.values()), scope="transfer")
        adjust_family(list(against_own.values()), scope="transfer")
        rankings[metric], rankings["against_own_best"][metric] = against_full, against_own
        rankings["null_control"][metric] = control
    return rankings


def field_record(folder: Path) -> dict:
    """What the atlas keeps of one field's search report folder."""
    summary = read_json(folder / "search_summary.json", "search summary")
    trials = summary["trials"]
    counted = [t for t in trials if t["state"] in ("complete", "pruned") and t.get("duplicate_of") is None]
    complete = [t for t in trials if t["state"] == "complete" and t["values"]]
    best = min(complete, key=lambda t: t["values"][0]) if complete else None
    markov = [t for t in complete if t.get("markov_open")]
    best_markov = min(markov, key=lambda t: t["values"][0]) if markov else None
    return {
        "field": folder.name,
        "search": summary["name"],
        "counts": summary["counts"],
        "trials_counted": len(counted),
        "cpu_minutes": sum(t["seconds"] or 0.0 for t in trials) / 60,
        "best_seen": None
        if best is None
        else {"trial": best["number"], "value": best["values"][0], "params": best["params"], "biased": True},
        "importance": summary.get("importance") or {},
        "front": pareto_front([(t["flops"], t["values"][0], t["number"]) for t in complete if "flops" in t]),
        "markov_open": None
        if best_markov is None
        else {"trial": best_markov["number"], "open": best_markov["markov_open"]},
        "trials": [
            {k: t.get(k) for k in ("number", "state", "params", "values", "folder", "flops", "seconds", "duplicate_of")}
            for t in trials
        ],
    }


def pareto_front(points: list[tuple[float, float, int]]) -> list[dict]:
    """The (flops, value, trial) points no other point beats on both (lower is better on each)."""
    front, best = [], float("inf")
    for flops, value, number in sorted(points):
        if value < best:
            front.append({"flops": flops, "value": value, "trial": number})
            best = value
    return front


def rank_fields(values_by_field: dict[str, dict], margins: dict[str, float]) -> dict[str, dict[str, dict]]:
    """metric -> field -> ranking (:func:`skipdiff.report.ranking.compare`), Holm over every field's rows of
    that metric as one family (scope "atlas")."""
    rankings: dict[str, dict[str, dict]] = {}
    for metric in METRICS:
        per_field = {f: v[metric] for f, v in values_by_field.items() if metric in v and REFERENCE in v[metric]}
        results = {
            f: compare(v, REFERENCE, lower_is_better=True, margin=margins.get(metric), family=None)
            for f, v in per_field.items()
            if len(v) >= 2
        }
        adjust_family(list(results.values()), scope="atlas")
        rankings[metric] = results
    return rankings


def write_atlas(folders: list[Path], out: Path, margins: dict[str, float] | None = None) -> Path:
    """Write ``atlas.json``, ``atlas.md`` and the figures for the field report ``folders``; returns atlas.md."""
    margins = {**DEFAULT_MARGINS, **(margins or {})}
    out.mkdir(parents=True, exist_ok=True)
    fields = [field_record(f) for f in folders]
    values = {f.name: confirmed_values(f) for f in folders}
    rankings = rank_fields(values, margins)
    transferred = {f.name: t for f in folders if (t := transfer_values(f))}
    transfer = rank_transfer(values, transferred, margins)
    for record, folder in zip(fields, folders, strict=True):
        record["fid_floor"] = confirmation_floor(folder)
        record["confirmation"] = {m: rankings[m][record["field"]] for m in METRICS if record["field"] in rankings[m]}
        record["confirmed_best"] = confirmed_best(values[record["field"]])
    atlas = {
        "fields": fields,
        "margins": margins,
        "family": "atlas: Holm over every field's confirmed rows, per metric",
        "transfer": transfer,
    }
    if transfer["denoise"]:
        figures.transfer_figure(transfer["denoise"], out / "transfer.png")
    write_json_atomic(out / "atlas.json", atlas, default=str)
    figures.confirmation_figure(atlas, out / "confirmation.png")
    figures.importance_figure(fields, out / "importance.png")
    figures.front_figure(fields, out / "front.png")
    (out / "atlas.md").write_text("\n".join(atlas_lines(atlas)) + "\n")
    return out / "atlas.md"


def _fmt(value, spec=".4g") -> str:
    return "–" if value is None else format(value, spec)


def atlas_lines(atlas: dict) -> list[str]:
    """The atlas as Markdown: the headline table, then search costs, importance and open rates."""
    margins = atlas["margins"]
    lines = [
        "# The skip atlas",
        "",
        "Per field: the configurations the search ranked best, retrained on fresh seeds against the field's "
        f"`full` (keep every skip), paired by seed. Holm's correction runs over every field's rows of a metric "
        f"(one declared family); equivalence is TOST within ±{margins['denoise']} MSE and "
        f"±{margins['fid']} FID. Intervals are each row's own 95% CI (unadjusted); the verdicts use the Holm p.",
        "",
        "![each field's confirmed configurations against its full](confirmation.png)",
        "",
        "| field | configuration | seeds | Δ MSE vs full [95% CI] | Holm p | verdict (MSE) | Δ FID [95% CI] | "
        "Holm p | verdict (FID) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for record in atlas["fields"]:
        confirmation = record.get("confirmation") or {}
        if not confirmation:
            lines.append(
                f"| {record['field']} | not confirmed yet (search: {record['trials_counted']} trials) | | | | | | | |"
            )
            continue
        mse = {r["configuration"]: r for r in confirmation.get("denoise", {}).get("rows", [])}
        fid = {r["configuration"]: r for r in confirmation.get("fid", {}).get("rows", [])}
        for name in sorted(set(mse) | set(fid)):
            m, f = mse.get(name), fid.get(name)
            if (m or f)["is_reference"]:
                above = None if f is None or record["fid_floor"] is None else f["mean"] - record["fid_floor"]
                mean = f"MSE {_fmt(m['mean'] if m else None)}, FID−floor {_fmt(above, '.3f')}"
                lines.append(f"| {record['field']} | full (reference: {mean}) | {(m or f)['seeds']} | | | | | | |")
                continue
            lines.append(
                f"| {record['field']} | {name} `{_params(record, name)}` | {(m or f)['shared_seeds']} | "
                f"{_delta(m)} | {_fmt(m['p_holm'] if m else None, '.3f')} | {m['verdict'] if m else '–'} | "
                f"{_delta(f)} | {_fmt(f['p_holm'] if f else None, '.3f')} | {f['verdict'] if f else '–'} |"
            )
    lines += [
        "",
        "## The searches",
        "",
        "The best trial's value is the best of many noisy draws, biased in its favour; the table above is the result.",
        "",
        "| field | trials (complete/pruned; repeats not counted) | CPU minutes | best trial seen | its MSE | parameters |",
        "|---|---|---|---|---|---|",
    ]
    for record in atlas["fields"]:
        best = record["best_seen"] or {}
        counted = [t for t in record["trials"] if t.get("duplicate_of") is None]  # a repeat trained nothing
        complete = sum(t["state"] == "complete" for t in counted)
        lines.append(
            f"| {record['field']} | {complete}/{sum(t['state'] == 'pruned' for t in counted)} | "
            f"{record['cpu_minutes']:.1f} | {best.get('trial', '–')} | {_fmt(best.get('value'), '.5f')} | "
            f"`{json.dumps(best.get('params', {}), sort_keys=True)}` |"
        )
    lines += [
        "",
        "## What matters: parameter importance per field (Optuna's default evaluator)",
        "",
        "![importance](importance.png)",
        "",
        "![MSE against FLOPs](front.png)",
        "",
    ]
    lines += transfer_lines(atlas["transfer"])
    lines += [
        "## The Markov chain's learned open rates (its best trial per field)",
        "",
        "| field | trial | P(open) per skip |",
        "|---|---|---|",
    ]
    for record in atlas["fields"]:
        chain = record["markov_open"]
        if chain:
            rates = ", ".join(f"{k}: {p:.2f}" for k, p in chain["open"].items())
            lines.append(f"| {record['field']} | {chain['trial']} | {rates} |")
    return lines


def transfer_lines(transfer: dict) -> list[str]:
    """The transfer matrix as Markdown: target field x configuration, Δ MSE against the target's full, and the
    verdict against the target's own best."""
    rankings = transfer.get("denoise") or {}
    if not rankings:
        return ["## Transfer", "", "Not run yet (`python eval/atlas.py transfer`, after the confirmations).", ""]
    columns = sorted({r["configuration"] for t in rankings.values() for r in t["rows"] if not r["is_reference"]})
    against_own = (transfer.get("against_own_best") or {}).get("denoise", {})
    lines = [
        "## Transfer: each field's confirmed best, trained on the other fields",
        "",
        "Each cell: Δ held-out MSE against the target field's `full` on the transfer's seeds (paired; 95% CI), "
        "the Holm p over the whole matrix and the verdict; below it the verdict against the target's own "
        f"confirmed best on the same seeds (`{OWN_BEST}`, its trial in the first column). The target's full "
        "and own best are trained again by the transfer sweep, so every pair shares its session and VAE.",
        "",
        "![transfer matrix](transfer.png)",
        "",
        "| target field (own best) | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for field, ranking in rankings.items():
        rows = {r["configuration"]: r for r in ranking["rows"]}
        own = {r["configuration"]: r for r in against_own.get(field, {}).get("rows", [])}
        cells = []
        for column in columns:
            row = rows.get(column)
            cell = "–" if row is None else f"{_delta(row)} (p {_fmt(row['p_holm'], '.2f')}, {row['verdict']})"
            if column in own and not own[column]["is_reference"]:
                cell += f"<br>vs own best: {own[column]['verdict']}"
            cells.append(cell)
        lines.append(f"| {field} ({transfer.get('own_best', {}).get(field, '–')}) | " + " | ".join(cells) + " |")
    control = (transfer.get("null_control") or {}).get("denoise", {})
    if control:
        lines += [
            "",
            "The null control: each target's full trained again by the transfer sweep (same seeds, another "
            "session, the VAE stage retrained with the search's seed) against its confirmation's full.",
            "",
            "| target field | Δ MSE, rerun − confirmation [95% CI] | p |",
            "|---|---|---|",
        ]
        for field, ranking in control.items():
            row = next(r for r in ranking["rows"] if not r["is_reference"])
            lines.append(f"| {field} | {_delta(row)} | {_fmt(row['p'], '.3f')} |")
    return lines + [""]


def _delta(row: dict | None) -> str:
    if row is None:
        return "–"
    ci = row.get("ci")
    return f"{row['delta']:+.4g}" + (f" [{ci[0]:+.3g}, {ci[1]:+.3g}]" if ci else "")


def _params(record: dict, label: str) -> str:
    """A confirmed row's searched parameters (its label is its trial folder's name)."""
    entry = figures.trial_of(record, label)
    return json.dumps(entry["params"], sort_keys=True) if entry else ""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="search report folders, one per field")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--margin", action="append", default=[], help=f"metric=margin (denoise_mse, fid; defaults: {DEFAULT_MARGINS})"
    )
    args = parser.parse_args(argv)
    missing = [str(f) for f in args.folders if not (f / "search_summary.json").is_file()]
    if missing:
        print(
            f"error: no search_summary.json in {missing} (run python -m skipdiff.report <search> --out <folder>)",
            file=sys.stderr,
        )
        return 2
    try:
        margins = parse_margins(args.margin)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    unknown = sorted(set(margins) - set(METRICS))
    if unknown:
        print(f"error: --margin for {unknown}: the atlas tests {sorted(METRICS)}", file=sys.stderr)
        return 2
    print(write_atlas(args.folders, args.out, margins))
    return 0


if __name__ == "__main__":
    sys.exit(main())
