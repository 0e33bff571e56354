"""Trials per hour of a search with 1 and with 2 worker processes on this machine (one torch thread each).

The digits search's recipe (``eval/searches/digits_skips.yaml``: 300 steps per trial) on a space whose
trials all cost the same (ScaleLong's kappa, a continuous range: no repeats, no architecture changes),
unpruned, without confirmation, into a fresh folder per worker count. The clock runs from the command's
start to its end, so each worker's start-up (imports, data) is counted. Run it on an otherwise idle
machine: on a 2-core CPU any other job takes a worker's core. Prints JSON.

    python bench/search_workers.py --trials 4                  # ~10 min on the 2-core CPU
    python bench/search_workers.py --trials 8 --workers 1 2 4  # on a larger machine
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from skipdiff.search.spec import load_search_spec


def bench_spec(source: str, trials: int) -> dict:
    """``source``'s base and evaluation with an equal-cost space, ``trials`` trials, no pruning."""
    spec = yaml.safe_load(Path(source).read_text())
    spec.update(
        space={"skips": ["scalelong"], "scalelong.kappa": {"low": 0.5, "high": 0.95}},
        budget={"trials": trials},
        enqueue=None,
        description=f"bench: {trials} equal-cost trials",
    )
    for key in ("pruner", "prune", "confirm", "enqueue"):
        spec.pop(key, None)
    return spec


def timed_search(spec_file: Path, out: Path, workers: int) -> float:
    """Seconds of ``python -m skipdiff.search SPEC --workers N`` from start to exit."""
    command = [
        sys.executable,
        "-m",
        "skipdiff.search",
        str(spec_file),
        "--out",
        str(out),
        "--workers",
        str(workers),
        "--num_threads",
        "1",
        "--no_confirm",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default="eval/searches/digits_skips.yaml")
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        spec_file = Path(scratch) / "bench.yaml"
        spec_file.write_text(yaml.safe_dump(bench_spec(args.spec, args.trials)))
        load_search_spec(spec_file)  # a bad spec fails here, before any training
        for workers in args.workers:
            seconds = timed_search(spec_file, Path(scratch) / f"workers-{workers}", workers)
            results[str(workers)] = {"seconds": seconds, "trials_per_hour": args.trials / seconds * 3600}
    first = results[str(args.workers[0])]["trials_per_hour"]
    for entry in results.values():
        entry["speedup"] = entry["trials_per_hour"] / first
    print(
        json.dumps(
            {
                "spec": args.spec,
                "trials": args.trials,
                "cpu_count": os.cpu_count(),
                "workers": results,
                "load_average_at_end": os.getloadavg(),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
