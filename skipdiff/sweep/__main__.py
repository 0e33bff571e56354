"""``python -m skipdiff.sweep``: the sweep runner's command line (arguments are checked before any heavy
import; the spec and every cell's options are checked before anything runs)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from ..config import SkipdiffError, check_output_folder, parse_int
from . import __doc__ as usage
from .runner import SweepError, interrupted, run_sweep
from .spec import load_spec


def build_parser() -> argparse.ArgumentParser:
    """The command line; its description is the package docstring (spec format and usage)."""
    parser = argparse.ArgumentParser(
        prog="python -m skipdiff.sweep", description=usage, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("spec", help="the sweep's YAML spec, e.g. eval/sweeps/cpu_digits.yaml")
    parser.add_argument("--out", help="the sweep's folder (default runs/sweeps/<spec name>)")
    parser.add_argument("--dry_run", action="store_true", help="list the cells and their resolved options, run nothing")
    parser.add_argument("--only", help="run only the cells whose name contains this text")
    parser.add_argument(
        "--launcher",
        default="inprocess",
        choices=("inprocess", "accelerate"),
        help="train in this process, or in a subprocess under `accelerate launch -m`",
    )
    parser.add_argument(
        "--accelerate_args",
        default="",
        help='arguments for accelerate launch, e.g. "--num_processes 2" (with --launcher accelerate)',
    )
    parser.add_argument("--num_threads", type=parse_int, help="torch CPU threads for every cell and the evaluation")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and run (or, with ``--dry_run``, list) the sweep; raises ``ValueError`` on bad
    input and :class:`~skipdiff.sweep.runner.SweepError` when cells failed."""
    args = build_parser().parse_args(argv)
    if args.num_threads is not None and args.num_threads < 1:
        raise ValueError(f"--num_threads must be >= 1, got {args.num_threads}")
    check_output_folder(args.out)
    spec = load_spec(args.spec)
    run_sweep(
        spec,
        args.out or Path("runs") / "sweeps" / spec.name,
        only=args.only,
        dry_run=args.dry_run,
        launcher=args.launcher,
        accelerate_args=shlex.split(args.accelerate_args),
        num_threads=args.num_threads,
    )


def cli(argv: list[str] | None = None) -> int:
    """:func:`main` for a console: bad input prints ``error: ...`` and returns 2, failed cells 1; a training a
    signal stopped after its checkpoint 128 + the signal's number (Ctrl-C 130, SIGTERM 143, SIGUSR1 138)."""
    try:
        main(argv)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stopped; relaunch the same command to resume the sweep", file=sys.stderr)
        return 130
    except (SweepError, SkipdiffError) as err:
        if interrupted(err):  # the training's own resume hint names its command line, not the sweep's
            print(
                f"stopped: {str(err).splitlines()[0]}; relaunch the same command to resume the sweep", file=sys.stderr
            )
            return getattr(err, "exit_status", 130)
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
