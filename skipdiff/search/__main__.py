"""``python -m skipdiff.search``: the command line (arguments and the whole spec are checked before any
training, loading or study)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from ..config import check_output_folder, parse_int, redact_spec
from ..runfolder import write_json_atomic
from . import __doc__ as usage
from .confirm import run_confirmation
from .spec import load_search_spec
from .trial import example_configurations
from .worker import console, run_worker

INTERRUPTED = (130, 128 + signal.SIGTERM, 128 + signal.SIGUSR1)  # a worker's status when it was stopped


def build_parser() -> argparse.ArgumentParser:
    """The command line; its description is the package docstring (spec format and usage)."""
    parser = argparse.ArgumentParser(
        prog="python -m skipdiff.search", description=usage, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("spec", help="the search's YAML spec, e.g. eval/searches/digits_skips.yaml")
    parser.add_argument("--out", help="the search folder (default runs/searches/<spec name>)")
    parser.add_argument("--dry_run", action="store_true", help="print the space, objectives and budget; run nothing")
    parser.add_argument(
        "--storage",
        help="the study's storage URL (default sqlite:///<out>/study.db); "
        "postgresql+psycopg://user@host:port/db for workers on several machines",
    )
    parser.add_argument("--workers", type=parse_int, default=1, help="worker processes on this machine (default 1)")
    parser.add_argument("--devices", help="comma-separated GPU ids, one per worker (CUDA_VISIBLE_DEVICES)")
    parser.add_argument(
        "--num_threads",
        type=parse_int,
        help="torch CPU threads per worker (default: 1 with --workers > 1, else torch's default)",
    )
    parser.add_argument("--no_confirm", action="store_true", help="stop after the search (no confirmation run)")
    return parser


def check_args(args) -> list[str] | None:
    """Argument errors as ``ValueError`` before anything runs; returns the device list (or None)."""
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    if args.num_threads is not None and args.num_threads < 1:
        raise ValueError(f"--num_threads must be >= 1, got {args.num_threads}")
    check_output_folder(args.out)
    if args.devices is None:
        return None
    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    if len(devices) != args.workers or not all(d.isdigit() for d in devices):
        raise ValueError(f"--devices needs {args.workers} GPU id(s) (one per worker), got {args.devices!r}")
    return devices


def show_plan(spec, examples: dict, out: Path, storage: str, workers: int, log=print) -> None:
    """``--dry_run``: the space, objectives, budget, engine settings and one example configuration."""
    log(f"search {spec.name} ({spec.kind}) -> {out}; storage {storage}; {workers} worker(s)")
    log("space:")
    for line in spec.space.describe():
        log(line)
    objectives = ", ".join(f"{n} ({d})" for n, d in zip(spec.objectives, spec.directions, strict=True))
    log(f"objectives: {objectives}" + (f"; constraints {spec.constraints}" if spec.constraints else ""))
    log(
        f"budget: {json.dumps(spec.budget)}; sampler {json.dumps(spec.sampler)} seed {spec.seed}; "
        f"pruner {json.dumps(spec.pruner)}" + (f" at steps {spec.prune['steps']}" if spec.prune else "")
    )
    if spec.enqueue:
        log(f"enqueued first: {json.dumps(list(spec.enqueue))}")
    log(f"confirmation: {json.dumps(spec.confirm) if spec.confirm else 'none'}")
    for family, example in examples.items():
        log(f"example ({family}): {json.dumps(example, sort_keys=True)}")


def launch_workers(args, out: Path, storage: str, study: str, devices) -> list[int]:
    """``--workers N``: N worker processes on one study; returns their exit statuses."""
    procs = []
    for i in range(args.workers):
        env = dict(os.environ)
        threads = args.num_threads or 1
        env["OMP_NUM_THREADS"] = str(threads)
        if devices:
            env["CUDA_VISIBLE_DEVICES"] = devices[i]
        command = [
            sys.executable,
            "-m",
            "skipdiff.search.worker",
            "--storage",
            storage,
            "--study",
            study,
            "--out",
            str(out),
            "--num_threads",
            str(threads),
        ]
        procs.append(subprocess.Popen(command, env=env))

    def forward(signum, frame):  # a scheduler signals the launcher: every worker checkpoints and re-queues
        for proc in procs:
            proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        return [p.wait() for p in procs]
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def main(argv: list[str] | None = None) -> int:
    """Parse, check, then search (and confirm); returns the process exit status."""
    args = build_parser().parse_args(argv)
    devices = check_args(args)
    spec = load_search_spec(args.spec)
    out = Path(args.out or Path("runs") / "searches" / spec.name)
    # optuna (~0.3 s) only once a study is opened: the search command line answers --help and bad arguments before it
    from . import engine

    storage = args.storage or engine.default_storage(out)
    examples = example_configurations(spec)
    if args.dry_run:
        show_plan(spec, examples, out, storage, args.workers)
        return 0
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        out / "search.json",
        {
            "name": spec.name,
            "kind": spec.kind,
            "storage": storage,
            "objectives": list(spec.objectives),
            "directions": spec.directions,
            "spec": redact_spec(spec.raw),
        },
    )
    study = engine.open_study(spec, storage)  # created (and enqueued) once, before the workers join
    if args.workers == 1:
        if args.num_threads:
            # heavy: torch only to set a one-worker search's threads
            import torch

            torch.set_num_threads(args.num_threads)
        run_worker(spec, out, storage)
    else:
        statuses = launch_workers(args, out, storage, spec.name, devices)
        stopped = [s for s in statuses if s in INTERRUPTED]
        if stopped:
            print("stopped; relaunch the same command to continue the search", file=sys.stderr)
            return stopped[0]
        if any(statuses):
            raise RuntimeError(f"worker exit statuses {statuses}")
    counts = engine.counts(study)
    print(f"search {spec.name}: {json.dumps(counts)} in {out}")
    if spec.confirm and not args.no_confirm:
        if spec.budget.get("trials") and engine.taken(study) < spec.budget["trials"]:
            print("budget not reached yet: relaunch to continue before the confirmation", file=sys.stderr)
            return 0
        path = run_confirmation(spec, study, out, args.num_threads)
        print(f"confirmation report: {path}")
    print(f"report: python -m skipdiff.report {out}")
    return 0


def cli(argv: list[str] | None = None) -> int:
    """:func:`main` for a console: bad input ``error: ...`` and 2, stopped 130/143/138, a failed worker 1."""
    return console(lambda: main(argv), "stopped; relaunch the same command to continue the search")


if __name__ == "__main__":
    sys.exit(cli())
