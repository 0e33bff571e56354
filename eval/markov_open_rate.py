"""The fraction of skips a Markov-gated run kept open during training, read from its ``stats.jsonl``.

Phase 2 of ``eval/sweeps/markov_matched.yaml`` trains stochastic depth with its keep probability p set to
the chains' open rate, so that both gate the same fraction of skips over training. The open rate of one
logged step is the mean of the skips' ``p_open`` (the chain's marginal probability that a skip is open, which
is what the gates were sampled from); a run's rate is the mean over its logged steps, warm-up included
(the chain samples at its initial probabilities then, and those steps train too).

    python eval/markov_open_rate.py runs/sweeps/markov_matched --match skips-markov-c0.1 \
        --out eval/results/markov_matched/open_rate.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from skipdiff.runfolder import write_json_atomic


def step_open_rate(record: dict) -> float | None:
    """Mean ``p_open`` over the skips of one logged step (None when the step logged no chain)."""
    rates = [value for key, value in record.get("gates", {}).items() if key.endswith("/p_open")]
    return statistics.fmean(rates) if rates else None


def run_open_rate(run: Path) -> float:
    """Mean open rate over every logged step of ``run``."""
    rates = []
    with open(run / "stats.jsonl") as lines:
        for line in lines:
            rate = step_open_rate(json.loads(line))
            if rate is not None:
                rates.append(rate)
    if not rates:
        raise ValueError(f"{run / 'stats.jsonl'} logs no Markov chain (no 'gates/.../p_open' entries)")
    return statistics.fmean(rates)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, help="a sweep folder (runs/sweeps/<name>)")
    parser.add_argument("--match", required=True, help="cells whose folder name starts with this")
    parser.add_argument("--out", type=Path, help="write the result here as JSON")
    args = parser.parse_args(argv)
    runs = sorted(path for path in args.sweep.iterdir() if path.is_dir() and path.name.startswith(args.match))
    if not runs:
        raise SystemExit(f"no cell of {args.sweep} starts with {args.match!r}")
    per_run = {run.name: run_open_rate(run) for run in runs}
    result = {
        "command": "python eval/markov_open_rate.py " + " ".join(argv or []),
        "per_run": per_run,
        "mean_open_rate": statistics.fmean(per_run.values()),
    }
    if args.out:
        write_json_atomic(args.out, result)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
