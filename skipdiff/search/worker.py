"""A search worker: asks the study for trials and runs them until the budget is taken.

    python -m skipdiff.search.worker --storage postgresql+psycopg://user@host/db --study NAME [--out FOLDER]

joins a study from another machine or a scheduler's job (the spec is read from the study itself);
``python -m skipdiff.search SPEC --workers N`` starts N of these on this machine. Budget: ``trials``
counts finished (complete or pruned) trials of the whole study, over every worker and launch;
``minutes`` is per launch (no new trial starts after it). A configuration proposed again is answered from
its first trial without training and does not count; 25 of them in a row end the worker (the space is
spent). A worker stopped by Ctrl-C or a scheduler's SIGTERM/SIGUSR1 (the training checkpoints after its
current step) re-queues its trial at once, which resumes from the trial's checkpoint, and exits as the
training does (130, 143, 138); a worker killed outright is noticed by its missing heartbeat and its trial
re-queued by the next worker.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from ..config import SkipdiffError, parse_int
from ..sweep.runner import duration
from .spec import SearchSpec, parse_search_spec
from .trial import make_objective

MAX_REPEATS_IN_ROW = 25  # repeated configurations are answered for free but must not loop forever


def _interrupted(err: BaseException) -> bool:
    return isinstance(err, KeyboardInterrupt) or type(err).__name__ == "TrainingInterrupted"


def exit_status(err: BaseException) -> int:
    """The training's own status for the signal that stopped it (143 SIGTERM, 138 SIGUSR1, 130 Ctrl-C)."""
    return int(getattr(err, "exit_status", 130))


def progress_line(study, spec: SearchSpec, started: float, finished_here: int) -> str:
    """``trials 7/30 (2 pruned); best denoise_mse 0.2314 (trial 5); ETA 41 min`` after a finished trial."""
    # optuna (~0.3 s) only once a study is opened: the search command line answers --help and bad arguments before it
    from . import engine

    count = engine.counts(study)
    running = count.get("running", 0)
    done = engine.taken(study) - running  # as the budget counts: repeated configurations are not trials
    repeats = count.get("complete", 0) + count.get("pruned", 0) - done
    budget = spec.budget.get("trials")
    best = engine.best_trials(study, 1)
    best_text = (
        f"best {spec.objectives[0]} {best[0].values[0]:.5g} (trial {best[0].number})"
        if best
        else "no complete trial yet"
    )
    eta = ""
    if budget and finished_here:
        each = (time.perf_counter() - started) / finished_here
        eta = f"; ETA {duration(each * max(budget - done, 0))} at {duration(each)} per trial in this worker"
    if "minutes" in spec.budget:  # a time budget ends this launch first, whatever the trial count says
        left = max(spec.budget["minutes"] * 60 - (time.perf_counter() - started), 0.0)
        eta += f"; {duration(left)} of this launch's {spec.budget['minutes']:g} min left"
    extra = f", {repeats} repeated configuration(s) not counted" if repeats else ""
    return (
        f"trials {done}/{budget or '-'} ({count.get('pruned', 0)} pruned, {running} running{extra}); {best_text}{eta}"
    )


def run_worker(spec: SearchSpec, out: Path, storage_url: str, study_name: str | None = None, log=print) -> int:
    """Run trials until the budget is taken (or the launch's minutes are up); returns trials run here."""
    # optuna (~0.3 s) only once a study is opened: the search command line answers --help and bad arguments before it
    from . import engine

    study = engine.open_study(spec, storage_url, study_name)
    objective = make_objective(spec, out, log)
    budget, minutes = spec.budget.get("trials"), spec.budget.get("minutes")
    started, ran, repeats = time.perf_counter(), 0, 0
    while True:
        engine.fail_stale(study)  # a dead worker's trial goes back to the queue before we count
        if budget is not None and engine.taken(study) >= budget:
            break
        if minutes is not None and time.perf_counter() - started > 60 * minutes:
            log(f"worker {os.getpid()}: {minutes} min of this launch are up; relaunch to continue")
            break
        objective.current = None
        try:
            engine.run_one(study, objective)
        except BaseException as err:
            if _interrupted(err) and objective.current is not None:
                engine.retry(study, objective.current, None)  # a preemption is no failure: no retry limit
            raise
        if engine.is_duplicate(study, objective.current):
            repeats += 1
            if repeats >= MAX_REPEATS_IN_ROW:  # the sampler keeps proposing tried points: the space is spent
                log(f"{repeats} repeated configurations in a row: the space looks exhausted; stopping this worker")
                break
            continue
        repeats = 0
        ran += 1
        log(progress_line(study, spec, started, ran))
    return ran


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m skipdiff.search.worker",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--storage", required=True, help="the study's storage URL (sqlite:///... or postgresql+psycopg://...)"
    )
    parser.add_argument("--study", required=True, help="the study's name (the search spec's name)")
    parser.add_argument("--out", help="where this worker writes trial folders (default runs/searches/<study>)")
    parser.add_argument("--num_threads", type=parse_int, default=None, help="torch CPU threads of this worker")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Join the study named on the command line and run trials; returns the number run here."""
    # optuna (~0.3 s) only once a study is opened: the search command line answers --help and bad arguments before it
    from . import engine

    args = build_parser().parse_args(argv)
    raw, name = engine.stored_spec(args.storage, args.study)
    spec = parse_search_spec(raw, name)
    if args.num_threads:
        # heavy: torch only to set the worker's threads
        import torch

        torch.set_num_threads(args.num_threads)
    return run_worker(spec, Path(args.out or Path("runs") / "searches" / args.study), args.storage, args.study)


def console(run, stopped: str) -> int:
    """Run ``run()`` for a console: bad input ``error: ...`` and 2; stopped by a signal the training's status
    (130, 143, 138) with ``stopped``; a known failure ``error: ...`` and 1; else ``run()``'s status or 0."""
    try:
        return run() or 0
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BaseException as err:  # noqa: BLE001
        if _interrupted(err):
            print(stopped, file=sys.stderr)
            return exit_status(err)
        if isinstance(err, SkipdiffError | RuntimeError):
            print(f"error: {err}", file=sys.stderr)
            return 1
        raise


def cli(argv: list[str] | None = None) -> int:
    """:func:`main` for a console (see :func:`console`); done 0."""
    return console(
        lambda: main(argv) and 0, "stopped; the trial was re-queued and resumes from its checkpoint on relaunch"
    )


if __name__ == "__main__":
    sys.exit(cli())
