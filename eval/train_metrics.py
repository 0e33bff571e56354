"""Gather a sweep's per-run training metrics: trainable parameters, peak memory, artefact size, per configuration.

The report's tables hold what evaluation measured; the cost of training lives in each run's
``train_metrics.json`` (trainable parameters, peak memory: the process's resident set on a CPU, CUDA's
allocator peak on a GPU, so compare cells run in their own processes, e.g. ``--launcher accelerate``) and, for
gate-only runs, in the size of the ``skip_gates/`` artefact. This script collects them per configuration
(cells named ``<configuration>__seed-<n>``) as JSON.

    python eval/train_metrics.py runs/sweeps/gate_tuning --out eval/results/gate_tuning/train_metrics.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from skipdiff.runfolder import read_json, write_json_atomic


def run_metrics(run: Path) -> dict:
    """One run's training metrics, with the bytes of its ``skip_gates/`` artefact when it wrote one."""
    metrics = read_json(run / "train_metrics.json", "training metrics")
    gates = run / "skip_gates"
    if gates.is_dir():
        metrics["skip_gates_bytes"] = sum(path.stat().st_size for path in gates.iterdir() if path.is_file())
    return metrics


def collect(sweep: Path) -> dict:
    """Configuration -> per-seed metrics and the mean of each numeric one."""
    by_configuration: dict[str, dict[str, dict]] = {}
    for run in sorted(path for path in sweep.iterdir() if (path / "train_metrics.json").is_file()):
        configuration, _, seed = run.name.rpartition("__seed-")
        by_configuration.setdefault(configuration or run.name, {})[seed] = run_metrics(run)
    summary = {}
    for configuration, seeds in by_configuration.items():
        keys = sorted(
            {key for metrics in seeds.values() for key, value in metrics.items() if isinstance(value, int | float)}
        )
        means = {key: statistics.fmean(m[key] for m in seeds.values() if key in m) for key in keys}
        summary[configuration] = {"seeds": seeds, "mean": means}
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    result = {"command": "python eval/train_metrics.py " + " ".join(argv or []), "configurations": collect(args.sweep)}
    if args.out:
        write_json_atomic(args.out, result)
    print(json.dumps({name: entry["mean"] for name, entry in result["configurations"].items()}, indent=2))
    return result


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
