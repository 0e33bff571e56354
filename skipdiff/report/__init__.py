"""``python -m skipdiff.report``: a sweep's comparison (Markdown + PNG), regenerated from its JSON alone.

    python -m skipdiff.report runs/sweeps/cpu_digits                          # -> runs/sweeps/cpu_digits/report/
    python -m skipdiff.report runs/sweeps/cpu_digits --out eval/results/cpu_digits   # the committed copy
    python -m skipdiff.report runs/sweeps/cpu_digits --reference "skips=none"

Reads sweep.json and, for every cell, cell.json, stats.jsonl and eval/eval.json
(variants/<label>/eval/eval.json for inference variants) or, for classifiers, metrics.json. Writes
report.md, summary.json (the same numbers) and loss_*.png, grad_*.png, markov_*.png, samples_*.png
(inference sweeps: metric_*.png, speed_*.png) to --out, by default <sweep>/report: committed results are
replaced only when --out names them.

report.md, per dataset: one row per configuration (the grid labels without the seed and the dataset)
with mean ± std over training seeds of FID (next to the real-vs-real floor, mean ± std over sampling
seeds, and KID with its interval when evaluated with --kid), the held-out denoising loss, the final
training loss, gradient stability, parameters and seconds per step; the FID floor at each sampling
seed; a ranking against a reference configuration; the Markov chain's learned probabilities; figures.
Classifier sweeps get test accuracy and loss instead. Inference sweeps (one model, a setting per row) are
compared on sampling seeds; with a skip cache they add each row's seconds per image, its measured speed-up
over the reference (paired by sampling seed) and its FLOP bound.

Is a difference real? Every row is tested against one named reference configuration (--reference;
default skips=full, else the table's first row) on the training seeds they share, on its own paired
differences: a paired t-test (the same seed gives the same initial weights, data order and noise), or with
--test sign-flip the exact sign-flip test for rows with 6 or more pairs; Welch's test without shared seeds
(5 or more a side). A row with too few seeds for its test (one shared seed) is exploratory: its values, no p-value. With
--margin METRIC=M (e.g. fid_minus_floor=0.1, denoise_mse=0.0005; recorded in summary.json) each row also
gets two one-sided tests of equivalence within ±M (TOST). The p-values of a table are one Holm family
(difference and equivalence p's together, at most one true null per row); each row's verdict is better,
worse, "equivalent within ±M" or "undecided at this seed count"; each row states the smallest difference it
can detect at the level Holm applies at its first step (power 0.8). Details: skipdiff.report.ranking
(``compare``, ``rank_against``, ``adjust_family``) and skipdiff.report.stats.

Deterministic: rows, datasets and files are sorted or in the spec's order, floats have fixed formats,
no timestamps or absolute paths, and PNGs are written by Agg with fixed metadata, so running the
report twice on the same JSON gives the same bytes.

Modules: read (sweep folder -> results), stats (tests, Holm, detectable differences), ranking (a table
against its reference), markdown (tables and text), figures (PNGs), write (the whole report),
__main__ (the command line).
"""

from __future__ import annotations

from ..lazy import lazy_exports

_EXPORTS = {
    "write_report": ".write",
    "default_out": ".write",
    "compare": ".ranking",
    "rank_against": ".ranking",
    "adjust_family": ".ranking",
    "parse_margins": ".ranking",
    "choose_reference": ".ranking",
    "load_sweep": ".read",
    "main": ".__main__",
    "cli": ".__main__",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
