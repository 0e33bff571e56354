"""What the shipped default job gives over training seeds: ``make demo``'s two commands with ``--seed N``.

Each seed runs as in a fresh clone, in its own folder (so its ``--vae auto`` stage is trained there, at two
threads, with that seed, as ``make demo`` would):

    mkdir -p runs/demo_2threads/seed-N && cd runs/demo_2threads/seed-N
    accelerate launch --config_file ../../../accelerate_config.yaml ../../../train_scripts/train_unet.py \
        --num_threads 2 --seed N --resume_from_checkpoint latest
    python -m skipdiff.eval --checkpoint runs/digits-latent --fid --denoise_loss --num_threads 2
    python eval/default_job_seeds.py runs/demo_2threads --epsilon_folder runs/demo_2threads_epsilon \
        --out eval/results/default_job_seeds   # from the root

The table puts each seed's FID next to its floor, and pairs each seed with the one-thread sweep cell of the
same recipe and seed (``eval/results/default_recipe/results.json``, ``recipe-vpred__seed-N``), whose VAE stage
was trained once, at one thread, with seed 0: the paired difference mixes the thread count and the VAE.

``--epsilon_folder`` holds the same two commands with ``--prediction_type epsilon`` added (the default before
the recipe screen chose v-prediction) in ``seed-N/``: the recipe's confirmation at the shipped two threads,
v-prediction against epsilon paired by training seed, on fresh seeds only (the screen's seed 0 is left out).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from skipdiff.runfolder import write_json_atomic

RECIPE_RESULTS = Path("eval/results/default_recipe/results.json")
SCREEN_SEED = 0  # the recipe screen chose v-prediction on this training seed: selection data, not confirmation


def read_seed(folder: Path) -> dict | None:
    """One seed folder's evaluation of ``runs/digits-latent`` (None until it has one)."""
    path = folder / "runs" / "digits-latent" / "eval" / "eval.json"
    if not path.is_file():
        return None
    evaluation = json.loads(path.read_text())
    fid = evaluation["fid"]["summary"]
    return {
        "seed": int(folder.name.removeprefix("seed-")),
        "fid": fid["fid"]["mean"],
        "fid_std_over_sampling_seeds": fid["fid"]["std"],
        "floor": fid["floor_fid"]["mean"],
        "fid_over_floor": fid["fid"]["mean"] / fid["floor_fid"]["mean"],
        "fid_minus_floor": fid["fid"]["mean"] - fid["floor_fid"]["mean"],
        "denoise_mse": evaluation.get("denoise", {}).get("mean"),
    }


def one_thread_fids(recipe_results: Path) -> dict[int, float]:
    """Training seed -> FID of the one-thread sweep cell of the shipped recipe (v-prediction)."""
    if not recipe_results.is_file():
        return {}
    runs = json.loads(recipe_results.read_text())["runs"]
    return {run["seed"]: run["fid"] for run in runs if run["recipe"] == "vpred"}


def summarise(seeds: list[dict], one_thread: dict[int, float]) -> dict:
    """Mean and sd over seeds of FID, floor and their ratio and difference; the two-minus-one-thread pairs."""

    def spread(key: str) -> dict:
        values = [row[key] for row in seeds]
        return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None}

    pairs = {row["seed"]: row["fid"] - one_thread[row["seed"]] for row in seeds if row["seed"] in one_thread}
    return {
        "seeds": [row["seed"] for row in seeds],
        "fid": spread("fid"),
        "floor": spread("floor"),
        "fid_over_floor": spread("fid_over_floor"),
        "fid_minus_floor": spread("fid_minus_floor"),
        "two_minus_one_thread_fid": {str(seed): delta for seed, delta in sorted(pairs.items())},
    }


def against_one_thread(seeds: list[dict], one_thread: dict[int, float]) -> dict | None:
    """The shipped job's FID against the one-thread sweep cell of the same training seed, paired by seed
    (skipdiff.report.ranking.compare, one test); None with fewer than two shared seeds."""
    from skipdiff.report.ranking import compare  # scipy: only for this test

    demo = {row["seed"]: row["fid"] for row in seeds if row["seed"] in one_thread}
    if len(demo) < 2:
        return None
    shared = {seed: one_thread[seed] for seed in demo}
    return compare(
        {"one thread (sweep cell)": shared, "make demo": demo}, "one thread (sweep cell)", lower_is_better=True
    )


def recipe_at_two_threads(seeds: list[dict], epsilon_seeds: list[dict], test: str = "t") -> dict | None:
    """The shipped recipe (v-prediction) against the old default (epsilon) at two threads, FID paired by
    training seed over the fresh seeds both have (``SCREEN_SEED`` left out: it chose the recipe; ``test``: "t"
    or "sign-flip"); None with fewer than two."""
    from skipdiff.report.ranking import compare  # scipy: only for this test

    shipped = {row["seed"]: row["fid"] for row in seeds if row["seed"] != SCREEN_SEED}
    epsilon = {row["seed"]: row["fid"] for row in epsilon_seeds if row["seed"] in shipped}
    if len(epsilon) < 2:
        return None
    shipped = {seed: fid for seed, fid in shipped.items() if seed in epsilon}
    configurations = {"epsilon (old default)": epsilon, "v-prediction (shipped)": shipped}
    return compare(configurations, "epsilon (old default)", lower_is_better=True, test=test)


def read_seeds(folder: Path) -> list[dict]:
    """Every evaluated ``seed-N/`` of ``folder``, by seed."""
    return sorted((row for path in folder.glob("seed-*") if (row := read_seed(path))), key=lambda r: r["seed"])


def read_times(path: Path | None) -> dict[str, int]:
    """Seed -> wall seconds from the runner's ``times.txt`` (lines ``seed N rc R S s``); empty without one."""
    if path is None or not path.is_file():
        return {}
    return {line.split()[1]: int(line.split()[4]) for line in path.read_text().splitlines() if line.strip()}


def table(results: dict) -> str:
    lines = [
        "# The shipped default job over training seeds (`make demo`, two threads)",
        "",
        "FID with the digits extractor, 1000 samples x 3 sampling seeds, DDIM-50, reference = the test split; the",
        "floor is 1000 train images against the same reference. Generated by `python eval/default_job_seeds.py`.",
        "",
        "| training seed | FID (± over sampling seeds) | floor | FID / floor | FID − floor | denoise MSE (v) "
        "| one-thread sweep cell's FID |",
        "|---|---|---|---|---|---|---|",
    ]
    one_thread = results["one_thread_fid"]
    for row in results["runs"]:
        other = one_thread.get(str(row["seed"]))
        lines.append(
            f"| {row['seed']} | {row['fid']:.3f} ± {row['fid_std_over_sampling_seeds']:.3f} | {row['floor']:.3f} | "
            f"{row['fid_over_floor']:.2f} | {row['fid_minus_floor']:.3f} | {row['denoise_mse']:.4f} | "
            + (f"{other:.3f} |" if other is not None else "- |")
        )
    summary = results["summary"]
    std = summary["fid"]["std"]
    lines += [
        "",
        f"Over {len(summary['seeds'])} seeds: FID {summary['fid']['mean']:.3f}"
        + (f" ± {std:.3f}" if std is not None else "")
        + f", {summary['fid_over_floor']['mean']:.2f} x the floor, FID − floor {summary['fid_minus_floor']['mean']:.3f}.",
    ]
    if results.get("against_one_thread"):
        from skipdiff.report.markdown import comparison_section

        heading = "## Against the one-thread sweep cell of the same seed (FID, paired by training seed)"
        lines += comparison_section(heading, results["against_one_thread"], "FID")
    if results.get("epsilon_runs"):
        lines += [
            "",
            "## The old default (epsilon prediction) at two threads, same commands with `--prediction_type epsilon`",
            "",
            "| training seed | FID (± over sampling seeds) | floor | FID / floor | FID − floor | denoise MSE (ε) |",
            "|---|---|---|---|---|---|",
        ]
        for row in results["epsilon_runs"]:
            lines.append(
                f"| {row['seed']} | {row['fid']:.3f} ± {row['fid_std_over_sampling_seeds']:.3f} | {row['floor']:.3f} | "
                f"{row['fid_over_floor']:.2f} | {row['fid_minus_floor']:.3f} | {row['denoise_mse']:.4f} |"
            )
    if results.get("recipe_at_two_threads"):
        from skipdiff.report.markdown import comparison_section

        heading = (
            f"## The recipe at two threads: v-prediction against epsilon (FID, paired by training seed; seed "
            f"{SCREEN_SEED}, the screen's, left out)"
        )
        lines += comparison_section(heading, results["recipe_at_two_threads"], "FID")
        if results.get("recipe_at_two_threads_signflip"):
            heading = "## The same, by a sign-flip test (no normality assumed)"
            lines += comparison_section(heading, results["recipe_at_two_threads_signflip"], "FID")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="the folder holding seed-N/ (runs/demo_2threads)")
    parser.add_argument("--out", type=Path, default=Path("eval/results/default_job_seeds"))
    parser.add_argument("--times", type=Path, help="times.txt the runner wrote (seed, exit code, seconds)")
    parser.add_argument(
        "--epsilon_folder", type=Path, help="the folder holding seed-N/ of the same job with --prediction_type epsilon"
    )
    args = parser.parse_args(argv)
    for folder in (args.folder, args.epsilon_folder):
        if folder is not None and not folder.is_dir():
            raise SystemExit(f"{folder}: no such folder")
    seeds = read_seeds(args.folder)
    if not seeds:
        raise SystemExit(f"no evaluated seed in {args.folder} (seed-N/runs/digits-latent/eval/eval.json)")
    one_thread = one_thread_fids(RECIPE_RESULTS)
    results = {
        "command": "python eval/default_job_seeds.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "runs": seeds,
        "one_thread_fid": {str(seed): fid for seed, fid in sorted(one_thread.items())},
        "summary": summarise(seeds, one_thread),
    }
    if args.times and args.times.is_file():
        results["wall_seconds"] = read_times(args.times)
    results["against_one_thread"] = against_one_thread(seeds, one_thread)
    if args.epsilon_folder is not None:
        results["epsilon_runs"] = read_seeds(args.epsilon_folder)
        results["epsilon_wall_seconds"] = read_times(args.epsilon_folder / "times.txt")
        results["recipe_at_two_threads"] = recipe_at_two_threads(seeds, results["epsilon_runs"])
        results["recipe_at_two_threads_signflip"] = recipe_at_two_threads(seeds, results["epsilon_runs"], "sign-flip")
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "results.json", results)
    (args.out / "table.md").write_text(table(results))
    print(table(results))
    return results


if __name__ == "__main__":
    main()
