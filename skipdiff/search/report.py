"""A search folder -> its report: ``report.md``, ``search_summary.json``, the optimisation history, parameter
importance, the Pareto front (several objectives), the skip table of each confirmed configuration and the
confirmation's ranking (``python -m skipdiff.report <search folder>``).

The search's best value is selected from many noisy trials and is biased in its favour; the report says
so and calls the confirmation (fresh seeds, paired against the reference) the result.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..report.markdown import ranking_table
from ..report.ranking import rank_against
from ..runfolder import atomic_path, read_json, write_json_atomic, write_text_atomic
from .atlas_figures import pyplot
from .objectives import OBJECTIVES


def trial_rows(study) -> list[dict]:
    """One row per trial: number, state, parameters, objective values, intermediate values, seconds, folder,
    the trial it repeated (``duplicate_of``: answered from that twin, not counted) and what its run folder
    adds (:func:`trial_extras`)."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        folder = trial.user_attrs.get("folder")
        extras = trial_extras(Path(folder)) if folder else {}
        seconds = extras.pop("seconds", None)  # trial.json's: pruned trials' too
        seconds = trial.user_attrs.get("seconds", seconds)
        rows.append(
            {
                "number": trial.number,
                "state": trial.state.name.lower(),
                "params": trial.params,
                "values": trial.values,
                "intermediate": {str(k): v for k, v in trial.intermediate_values.items()},
                "retry_of": trial.system_attrs.get("failed_trial"),
                "seconds": seconds,
                "folder": folder,
                "duplicate_of": trial.user_attrs.get("duplicate_of"),
                **extras,
            }
        )
    return rows


def trial_extras(folder: Path) -> dict:
    """From a trial's run folder: its UNet's ``flops`` per forward and ``parameters`` (a complete trial's
    ``trial.json``), the ``seconds`` it took (complete or pruned), and for a Markov-chain trial the chain's
    learned open rate per skip at the last logged step (``markov_open``: UNet skip index -> P(open), from ``stats.jsonl``)."""
    extras = {}
    record = folder / "trial.json"
    if record.is_file():
        found = read_json(record, "trial record")
        extras.update(found.get("model_record") or {})
        if found.get("seconds") is not None:
            extras["seconds"] = found["seconds"]
    stats = folder / "stats.jsonl"
    if stats.is_file():
        last = None
        for line in stats.read_text().splitlines():
            if '"markov"' in line:
                last = line
        if last is not None:
            chain = json.loads(last)["markov"]
            extras["markov_open"] = {str(k): p for k, p in zip(chain["skips"], chain["marginals"], strict=True)}
    return extras


def _history(rows: list[dict], objective: str, minimize: bool, path: Path) -> None:
    plt = pyplot()

    done = [r for r in rows if r["state"] == "complete"]
    fig, ax = plt.subplots(figsize=(6, 3.5), layout="constrained")
    xs, ys = [r["number"] for r in done], [r["values"][0] for r in done]
    ax.scatter(xs, ys, s=14, label="complete trial")
    best, line = None, []
    for y in ys:
        best = y if best is None or (y < best if minimize else y > best) else best
        line.append(best)
    ax.step(xs, line, where="post", color="C1", label="best so far")
    pruned = [r for r in rows if r["state"] == "pruned" and r["intermediate"]]
    if pruned:
        ax.scatter(
            [r["number"] for r in pruned],
            [list(r["intermediate"].values())[-1] for r in pruned],
            marker="x",
            color="grey",
            s=14,
            label="pruned (last reported)",
        )
    ax.set_xlabel("trial number")
    ax.set_ylabel(objective)
    ax.set_title(f"optimisation history ({objective}, {'lower' if minimize else 'higher'} is better)")
    ax.legend(fontsize=7)
    with atomic_path(path) as tmp:  # a full disk leaves the old file
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def _pareto(rows: list[dict], front: set[int], objectives: list[str], path: Path) -> None:
    plt = pyplot()

    done = [r for r in rows if r["state"] == "complete"]
    fig, ax = plt.subplots(figsize=(5, 4), layout="constrained")
    for on_front in (False, True):
        chosen = [r for r in done if (r["number"] in front) == on_front]
        ax.scatter(
            [r["values"][1] for r in chosen],
            [r["values"][0] for r in chosen],
            s=16,
            color="C3" if on_front else "C0",
            label="Pareto front" if on_front else "trial",
        )
    ax.set_xlabel(objectives[1])
    ax.set_ylabel(objectives[0])
    ax.set_title("quality against compute")
    ax.legend(fontsize=7)
    with atomic_path(path) as tmp:  # a full disk leaves the old file
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def _skip_table(folder: str) -> str:
    """The skip table of a trial's trained UNet (training searches), or its skip spec (inference)."""
    trial = read_json(Path(folder) / "trial.json", "trial record")
    if (Path(folder) / "unet" / "config.json").is_file():
        # heavy: torch and diffusers only for a trained trial's skip table
        from ..skips.unet import SkipUNet2DModel

        return SkipUNet2DModel.from_pretrained(folder, subfolder="unet").skip_table()
    return f"skips: {trial['options'].get('skips')}"


def write_search_report(folder: str | Path, out: str | Path | None = None) -> Path:
    """Write the search's report into ``out`` (default ``<folder>/report``); returns ``report.md``'s path."""
    # optuna (~0.3 s) only once the study is read: the report command line answers bad arguments before it
    from .engine import best_trials, importance, load_existing_study

    folder = Path(folder)
    search = read_json(folder / "search.json", "search record")
    out = Path(out) if out is not None else folder / "report"
    out.mkdir(parents=True, exist_ok=True)
    study = load_existing_study(search["storage"], search["name"])
    rows = trial_rows(study)
    objectives, minimize = search["objectives"], search["directions"][0] == "minimize"
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    summary = {
        "name": search["name"],
        "objectives": objectives,
        "directions": search["directions"],
        "counts": counts,
        "importance": importance(study) if counts.get("complete", 0) >= 2 else {},
        "trials": rows,
    }
    lines = [
        f"# Search {search['name']} ({search['kind']})",
        "",
        f"Trials: {json.dumps(counts)}. Objectives: "
        + ", ".join(f"{o} ({d})" for o, d in zip(objectives, search["directions"], strict=True)),
        "",
    ]
    if counts.get("complete"):
        _history(rows, objectives[0], minimize, out / "history.png")
        lines += ["![optimisation history](history.png)", ""]
    best = best_trials(study, 5)
    if len(objectives) > 1 and best:
        front = {t.number for t in study.best_trials}
        summary["pareto_front"] = sorted(front)
        _pareto(rows, front, objectives, out / "pareto.png")
        lines += ["![Pareto front](pareto.png)", ""]
    lines += [
        "## Best trials seen during the search",
        "",
        "Selected as the best of many noisy trials, these values are biased in their favour (the winner's "
        "curse): the result is the confirmation below, on seeds no trial used.",
        "",
        "| trial | " + " | ".join(objectives) + " | parameters |",
        "|---|" + "---|" * len(objectives) + "---|",
    ]
    for trial in best:
        values = " | ".join(f"{v:.5g}" for v in trial.values)
        lines.append(f"| {trial.number} | {values} | `{json.dumps(trial.params, sort_keys=True)}` |")
    if summary["importance"]:
        lines += [
            "",
            f"## Parameter importance ({objectives[0]}, Optuna's default evaluator)",
            "",
            "| parameter | importance |",
            "|---|---|",
        ]
        lines += [f"| {name} | {value:.3f} |" for name, value in summary["importance"].items()]
    lines += _confirmation_lines(folder, summary)
    write_text_atomic(out / "report.md", "\n".join(lines) + "\n")
    write_json_atomic(out / "search_summary.json", summary, default=str)
    return out / "report.md"


def finished_cells(folder: Path) -> list[tuple[dict, Path]]:
    """``(cell record, eval.json path)`` of the confirmation's cells that trained and evaluated."""
    finished = []
    for cell_file in sorted((folder / "confirm").glob("*/cell.json")):
        cell = read_json(cell_file, "cell record")
        evaluation = cell_file.parent / "eval" / "eval.json"
        if cell.get("status") == "done" and evaluation.is_file():
            finished.append((cell, evaluation))
    return finished


def confirmed_values(folder: Path, read) -> dict[str, dict[int, float]]:
    """label -> {training seed: value} of the confirmation's finished cells (``read(eval.json)``)."""
    values: dict[str, dict[int, float]] = {}
    for cell, evaluation in finished_cells(folder):
        label = next(a["label"] for a in cell["axes"] if a["axis"] == "config")
        values.setdefault(label, {})[int(cell["options"]["seed"])] = read(read_json(evaluation, "evaluation"))
    return values


def _objective_ranking(folder: Path, summary: dict | None = None) -> list[str]:
    """The search's own (first) objective on the fresh seeds, paired against the reference (Holm over the
    confirmed configurations), as the report's ranking table."""
    # confirm reaches sweep: skipdiff.report imports this module and stays free of sweep and training (test_layout)
    from .confirm import REFERENCE

    search = read_json(folder / "search.json", "search record")
    name = search["objectives"][0]
    objective = OBJECTIVES[name]
    if objective.from_model or not search["spec"].get("kind") == "training":
        return []
    values = confirmed_values(folder, objective.read)
    if REFERENCE not in values or len(values) < 2:
        return []
    rows = {label: v for label, v in values.items() if label != REFERENCE}
    result = rank_against(
        values[REFERENCE], rows, lower_is_better=objective.direction == "minimize", reference_name=REFERENCE
    )
    if summary is not None:
        summary["confirmation"] = {"objective": name, "ranking": result}
    return ["", f"### The search's objective ({name}) on the fresh seeds", "", *ranking_table(result, name), ""]


def _confirmation_lines(folder: Path, summary: dict) -> list[str]:
    chosen_path = folder / "confirm" / "chosen.json"
    if not chosen_path.is_file():
        return [
            "",
            "## Confirmation",
            "",
            "Not run yet: the search's result is its confirmation (`confirm:` in the "
            "spec; it runs when the budget is reached).",
        ]
    choice = read_json(chosen_path, "confirmation choice")
    chosen, also = choice["chosen"], choice.get("also", {})
    sweep = folder / "confirm" / "sweep.json"
    cells = read_json(sweep, "confirmation sweep")["cells"] if sweep.is_file() else []
    done = len(finished_cells(folder))
    if done < len(cells) or not cells:  # a ranking on the seeds finished so far is no result
        return [
            "",
            "## Confirmation",
            "",
            f"Running: {done} of {len(cells)} runs finished "
            f"({', '.join([e['label'] for e in chosen] + list(also))} and the reference on seeds no trial used); its ranking "
            "is the search's result once every run has finished (relaunch the search to continue it).",
        ]
    lines = [
        "",
        "## Confirmation (the result)",
        "",
        "The configurations below and the reference, retrained (or resampled) on fresh seeds and ranked "
        "against the reference, paired by seed with Holm's correction (the full report: "
        "`<search folder>/confirm/report/report.md`).",
        "",
    ]
    for entry in chosen:
        table = _skip_table(str(folder / "trials" / entry["label"]))  # the label is the trial folder's name
        lines += [
            f"### {entry['label']} (trial {entry['trial']}; search value {entry['search_values']})",
            "",
            "```",
            table,
            "```",
            "",
        ]
    for label, overrides in also.items():
        lines += [f"### {label} (chosen elsewhere: `{json.dumps(overrides)}`)", ""]
    lines += _objective_ranking(folder, summary)
    ranking = folder / "confirm" / "report" / "report.md"
    if ranking.is_file():
        lines += ["### Ranking on fresh seeds", "", *ranking.read_text().splitlines()[1:]]
    return lines
