"""The fraction of skips a Markov-gated run kept open during training, read from its ``stats.jsonl``.

Phase 2 of ``eval/sweeps/markov_matched.yaml`` trains stochastic depth with its keep probability p set to
the chains' open rate, so that both gate the same fraction of skips over training. The open rate of one
logged step is the mean of the skips' ``p_open`` (the chain's marginal probability that a skip is open, which
is what the gates were sampled from); a run's rate is the mean over its logged steps, warm-up included
(the chain samples at its initial probabilities then, and those steps train too). Per skip, the same mean
gives the chain's own rate for each skip, and ``independent_gates_spec`` the spec of independent gates at those
rates (phase 3 of the sweep).

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


def _chain_records(run: Path) -> list[dict]:
    """The ``gates`` entry of every logged step of ``run`` that logged the chain."""
    with open(run / "stats.jsonl") as lines:
        records = [json.loads(line).get("gates", {}) for line in lines if line.strip()]
    records = [gates for gates in records if any(key.endswith("/p_open") for key in gates)]
    if not records:
        raise ValueError(f"{run / 'stats.jsonl'} logs no Markov chain (no 'gates/.../p_open' entries)")
    return records


def run_open_rate(run: Path) -> float:
    """Mean open rate over every logged step of ``run``."""
    return statistics.fmean(step_open_rate({"gates": gates}) for gates in _chain_records(run))


def run_skip_open_rates(run: Path) -> dict[int, float]:
    """Each chain skip's mean ``p_open`` over every logged step of ``run``: skip index -> rate."""
    rates: dict[int, list[float]] = {}
    for gates in _chain_records(run):
        for key, value in gates.items():
            name, _, stat = key.partition("/")
            if stat == "p_open" and name.startswith("skip"):
                rates.setdefault(int(name.removeprefix("skip")), []).append(value)
    return {index: statistics.fmean(values) for index, values in sorted(rates.items())}


def independent_gates_spec(rates: dict[int, float], digits: int = 3) -> str:
    """A skip spec of independent Bernoulli gates, skip k kept with the chain's own rate for skip k.

    Stochastic depth at these per-skip rates gates each skip as often as the chain did, without the chain's
    dependence between neighbouring skips: the comparison that isolates the dependence.
    """
    if sorted(rates) != list(range(len(rates))):
        raise ValueError(f"the chain must gate every skip 0..K-1 for a per-skip spec, got skips {sorted(rates)}")
    return ",".join(f"bernoulli:p={rates[index]:.{digits}f}" for index in range(len(rates)))


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
    per_run_skip = {run.name: run_skip_open_rates(run) for run in runs}
    skips = sorted({index for rates in per_run_skip.values() for index in rates})
    per_skip = {index: statistics.fmean(rates[index] for rates in per_run_skip.values()) for index in skips}
    result = {
        "command": "python eval/markov_open_rate.py " + " ".join(argv or []),
        "per_run": per_run,
        "mean_open_rate": statistics.fmean(per_run.values()),
        "per_run_skip": {name: {str(k): v for k, v in rates.items()} for name, rates in per_run_skip.items()},
        "per_skip_open_rate": {str(k): v for k, v in per_skip.items()},
        "independent_gates_spec": independent_gates_spec(per_skip),
    }
    if args.out:
        write_json_atomic(args.out, result)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
