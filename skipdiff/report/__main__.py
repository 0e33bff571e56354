"""``python -m skipdiff.report``: a sweep's comparison (Markdown + PNG), regenerated from its JSON alone."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import check_output_folder


def build_parser() -> argparse.ArgumentParser:
    """The command line; its description is the package docstring."""
    from . import __doc__ as usage

    parser = argparse.ArgumentParser(prog="python -m skipdiff.report", description=usage,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("sweep", help="a sweep folder written by python -m skipdiff.sweep")
    parser.add_argument("--out", help="output folder (default <sweep>/report; committed results: "
                                      "--out eval/results/<sweep name>)")  # fmt: skip
    parser.add_argument("--reference", help="the configuration every row is tested against, as the tables label "
                                            "it (default skips=full, else each table's first row)")  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> Path:
    """Write the report; returns the path of ``report.md`` (``ValueError`` on bad input)."""
    args = build_parser().parse_args(argv)
    if not Path(args.sweep).is_dir():
        raise ValueError(f"sweep folder {args.sweep!r} does not exist")
    check_output_folder(args.out)
    from .write import write_report

    path = write_report(args.sweep, args.out, args.reference)
    print(f"wrote {path}")
    return path


def cli(argv: list[str] | None = None) -> int:
    """:func:`main` for a console: bad input prints ``error: ...`` and returns 2."""
    try:
        main(argv)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
