"""A sweep folder -> its report folder: ``report.md``, ``summary.json`` and the PNGs.

The report goes to ``<sweep folder>/report/`` unless ``out`` names another folder: regenerating never
replaces committed results (``eval/results/<name>/``) unless that folder is asked for explicitly.
"""

from __future__ import annotations

from pathlib import Path

from ..runfolder import write_json_atomic, write_text_atomic
from .markdown import results_to_markdown
from .ranking import TESTS, choose_reference, parse_margins
from .read import cells_to_results, group, load_sweep

REPORT_FOLDER = "report"


def default_out(sweep_folder: str | Path) -> Path:
    """Where a report goes when no ``--out`` is given: inside the sweep's own folder."""
    return Path(sweep_folder) / REPORT_FOLDER


def references_for(grouped: dict, requested: str | None) -> dict[str, str]:
    """dataset -> its reference configuration (:func:`ranking.choose_reference`), checked before any writing."""
    return {
        dataset: choose_reference(list(configurations), requested, dataset)
        for dataset, configurations in grouped.items()
    }


def write_report(
    sweep_folder: str | Path,
    out: str | Path | None = None,
    reference: str | None = None,
    margins: dict[str, float] | None = None,
    test: str = "t",
) -> Path:
    """Read a sweep folder, write ``report.md``, ``summary.json`` and the PNGs to ``out`` (default
    ``<sweep_folder>/report``); returns the path of ``report.md``.

    ``reference``: the configuration label every row is tested against (default ``skips=full`` when a
    table has it, else the table's first row); a label missing from a table is a ``ValueError`` naming
    the choices. ``margins``: metric key (``fid``, ``denoise``, ...; aliases in
    :data:`ranking.METRIC_ALIASES`) -> equivalence margin, recorded in summary.json. ``test``: "t" (paired
    t-tests) or "sign-flip" (exact sign-flip tests where a row has 6 or more pairs).
    """
    from .figures import write_figures  # matplotlib: only once the input is known to be good

    if test not in TESTS:
        raise ValueError(f"test {test!r}: choose one of {TESTS}")
    margins = parse_margins(margins)

    sweep, cells = load_sweep(sweep_folder)
    grouped = group(cells_to_results(cells, sweep["kind"]))
    references = references_for(grouped, reference)
    out = Path(out) if out is not None else default_out(sweep_folder)
    out.mkdir(parents=True, exist_ok=True)
    figures = write_figures(sweep["kind"], grouped, out, references)
    markdown, summary = results_to_markdown(
        sweep, cells, grouped, references, figures, margins, test, folder=str(sweep_folder)
    )
    write_text_atomic(out / "report.md", markdown)
    write_json_atomic(out / "summary.json", summary)
    return out / "report.md"
