"""The search engine's own cost per trial: Optuna's sampler (TPE) and the storage (SQLite in a folder, as
``python -m skipdiff.search`` uses by default), measured with the search's own space and an objective that
does nothing but suggest the trial's parameters. Prints JSON.

    python bench/search_overhead.py --trials 60
    python bench/search_overhead.py --trials 60 --trial_seconds 95   # the share of a 95 s trial
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from skipdiff.search import engine
from skipdiff.search.space import suggest
from skipdiff.search.spec import load_search_spec
from skipdiff.search.trial import num_skips_for


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default="eval/searches/digits_skips.yaml")
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--trial_seconds", type=float, help="a measured trial's duration, to state the share")
    args = parser.parse_args()
    spec = load_search_spec(args.spec)
    num_skips = num_skips_for(spec)
    with tempfile.TemporaryDirectory() as folder:
        study = engine.open_study(spec, engine.default_storage(Path(folder)))
        durations = []

        def objective(trial):
            suggestion = suggest(trial, spec.space, num_skips, spec.base)
            return float(len(suggestion.options.get("skips", ""))) * 1e-3 + trial.number * 1e-6

        for _ in range(args.trials):
            start = time.perf_counter()
            engine.fail_stale(study)
            engine.taken(study)
            engine.run_one(study, objective)
            durations.append(time.perf_counter() - start)
    result = {
        "spec": args.spec,
        "trials": args.trials,
        "storage": "sqlite (default)",
        "sampler": spec.sampler,
        "seconds_per_trial_median": statistics.median(durations),
        "seconds_per_trial_last10_median": statistics.median(durations[-10:]),
        "seconds_per_trial_max": max(durations),
    }
    if args.trial_seconds:
        result["share_of_trial_last10"] = result["seconds_per_trial_last10_median"] / args.trial_seconds
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
