"""Confirmation without the winner's curse: the top configurations and the reference, run again on fresh seeds.

A search's best value is the best of many noisy draws, biased in its favour. What the search reports
is this confirmation: the ``confirm.top`` best complete trials, the reference (``confirm.reference``,
default ``skips: full``) and any configuration chosen elsewhere (``confirm.also``, e.g. a grid's winner),
as a sweep in ``<search>/confirm/`` (one cell per configuration and seed: training seeds that no trial
used, or, for an inference search, fresh sampling seeds shared by every row), ranked by
:mod:`skipdiff.report` against the reference: paired by seed, Holm over the rows.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..report.write import write_report
from ..runfolder import write_json_atomic
from ..sweep.runner import run_sweep, spec_command
from ..sweep.spec import parse_spec
from .space import model_config
from .spec import SearchSpec
from .trial import read_trial

REFERENCE = "reference"
CONFIRM_FOLDER = "confirm"


def runs_the_reference(spec: SearchSpec, record: dict) -> bool:
    """Whether a trial ran the reference's own configuration (the same options and UNet): confirming it would
    retrain the reference under another name and test it against itself (every paired difference 0)."""
    if record.get("model"):
        base = spec.base.get("model", "digits")
        if not spec.training or model_config(base, record["model"]) != model_config(base, {}):
            return False
    return {**spec.base, **record["overrides"]} == {**spec.base, **spec.confirm["reference"]}


def choose(spec: SearchSpec, ranked: list, read=read_trial, log=print) -> list[tuple]:
    """The ``confirm.top`` best of ``ranked`` (trials, best first) that are not the reference's own
    configuration, as ``(trial record, trial)`` pairs."""
    chosen = []
    for trial in ranked:
        record = read(Path(trial.user_attrs["folder"]))
        if runs_the_reference(spec, record):
            log(f"confirmation: trial {trial.number} ran the reference's configuration; the next best takes its place")
            continue
        chosen.append((record, trial))
        if len(chosen) == spec.confirm["top"]:
            break
    return chosen


def confirmation_sweep(spec: SearchSpec, chosen: list[dict], out: Path) -> dict:
    """The sweep spec (as a dict) that reruns ``chosen`` trial records and the reference on fresh seeds."""
    configs: dict[str, dict] = {REFERENCE: dict(spec.confirm["reference"]), **spec.confirm.get("also", {})}
    for record in chosen:
        overrides = dict(record["overrides"])
        if record.get("model"):  # the trial's own UNet config, copied so the confirmation stands alone
            source = Path(record["options"]["model"])
            target = out / CONFIRM_FOLDER / "configs" / f"trial-{record['root']:04d}.json"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
            overrides["model"] = str(target)
        configs[f"trial-{record['root']:04d}"] = overrides
    if spec.training:
        grid = {"config": configs, "seed": spec.confirm["seeds"]}
        return {
            "kind": "diffusion",
            "description": f"confirmation of search {spec.name}",
            "base": spec.base,
            "grid": grid,
            "eval": spec.confirm.get("eval", spec.eval),
        }
    base = {**spec.base, "seeds": spec.confirm["seeds"]}
    return {
        "kind": "inference",
        "description": f"confirmation of search {spec.name} on fresh sampling seeds",
        "base": base,
        "grid": {"config": configs},
    }


def search_command(spec: SearchSpec, out: Path) -> dict | None:
    """The command that runs the search ``spec`` in ``out`` again: it finishes the budget, then the
    confirmation's missing cells (None when the spec was not read from a file)."""
    return spec_command("skipdiff.search", spec.source, out, Path("runs") / "searches" / spec.name)


def run_confirmation(spec: SearchSpec, study, out: Path, num_threads: int | None = None, log=print) -> Path:
    """Run the confirmation sweep and its report; returns the report's path."""
    # optuna (~0.3 s) only once a study is opened: the search command line answers --help and bad arguments before it
    from . import engine

    pairs = choose(spec, engine.best_trials(study, len(study.trials)), log=log)
    if not pairs:
        raise ValueError(f"search {spec.name}: no complete trial other than the reference's configuration to confirm")
    chosen, best = [record for record, _ in pairs], [trial for _, trial in pairs]
    sweep = confirmation_sweep(spec, chosen, out)
    folder = out / CONFIRM_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    picked = [
        {"label": f"trial-{r['root']:04d}", "trial": t.number, "params": t.params, "search_values": list(t.values)}
        for r, t in zip(chosen, best, strict=True)
    ]
    also = spec.confirm.get("also", {})
    write_json_atomic(folder / "chosen.json", {"reference": spec.confirm["reference"], "chosen": picked, "also": also})
    beside = f", {len(also)} chosen elsewhere ({', '.join(also)})" if also else ""
    log(f"confirmation: {len(chosen)} configuration(s){beside} and the reference on seeds {spec.confirm['seeds']}")
    run_sweep(
        parse_spec(sweep, f"{spec.name}-confirm"),
        folder,
        num_threads=num_threads,
        log=log,
        relaunch=search_command(spec, out),
    )
    return write_report(folder, folder / "report", reference=f"config={REFERENCE}")
