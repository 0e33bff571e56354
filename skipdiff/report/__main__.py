"""``python -m skipdiff.report``: a sweep's comparison (Markdown + PNG), regenerated from its JSON alone."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import check_output_folder
from ..runfolder import io_error_line
from ..search.report import write_search_report
from . import __doc__ as usage
from .write import write_report


def build_parser() -> argparse.ArgumentParser:
    """The command line; its description is the package docstring."""
    parser = argparse.ArgumentParser(
        prog="python -m skipdiff.report", description=usage, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "sweep", help="a sweep folder (python -m skipdiff.sweep) or a search folder (python -m skipdiff.search)"
    )
    parser.add_argument(
        "--out", help="output folder (default <sweep>/report; committed results: --out eval/results/<sweep name>)"
    )
    parser.add_argument(
        "--reference",
        help="the configuration every row is tested against, as the tables label "
        "it (default skips=full, else each table's first row)",
    )
    parser.add_argument(
        "--margin",
        action="append",
        default=[],
        metavar="METRIC=M",
        help="equivalence margin of a metric, e.g. fid_minus_floor=0.1 or denoise_mse=0.0005 "
        "(repeatable; recorded in summary.json): rows get a TOST verdict within ±M",
    )
    parser.add_argument(
        "--test",
        choices=("t", "sign-flip"),
        default="t",
        help="paired t-tests (default) or exact sign-flip tests where a row has 6 or more pairs",
    )
    return parser


def main(argv: list[str] | None = None) -> Path:
    """Write the report; returns the path of ``report.md`` (``ValueError`` on bad input)."""
    args = build_parser().parse_args(argv)
    if not Path(args.sweep).is_dir():
        raise ValueError(f"sweep folder {args.sweep!r} does not exist")
    check_output_folder(args.out)
    try:
        if (Path(args.sweep) / "search.json").is_file():  # a search folder (python -m skipdiff.search)
            path = write_search_report(args.sweep, args.out)
        else:
            path = write_report(args.sweep, args.out, args.reference)
    except OSError as err:  # a full disk or a read-only --out: one line naming the file (or the folder)
        raise OSError(io_error_line(err, args.out or Path(args.sweep) / "report")) from err
    print(f"wrote {path}")
    return path


def cli(argv: list[str] | None = None) -> int:
    """:func:`main` for a console: bad input, a full disk or a folder it may not write print ``error: ...``
    and return 2."""
    try:
        main(argv)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
