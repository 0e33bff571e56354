"""What the shipped default job gives over training seeds: ``make demo``'s two commands with ``--seed N``.

Each seed runs as in a fresh clone, in its own folder ``seed-N/`` (so its ``--vae auto`` stage is trained
there, at two threads, with that seed, as ``make demo`` would); ``run`` skips seeds already evaluated, so a
stopped run goes on where it stopped, and appends each seed's wall time to the folder's ``times.txt``:

    python eval/default_job_seeds.py run runs/demo_2threads --seeds 0 1 2 3 4 5 6        # ~6 min a seed, idle CPU
    python eval/default_job_seeds.py run runs/demo_2threads_epsilon --seeds 1 2 3 4 5 6 --prediction_type epsilon
    python eval/default_job_seeds.py collect runs/demo_2threads --epsilon_folder runs/demo_2threads_epsilon

which is, per seed, from ``seed-N/``:

    accelerate launch --config_file <root>/accelerate_config.yaml <root>/train_scripts/train_unet.py \
        --num_threads 2 --seed N --resume_from_checkpoint latest [--prediction_type epsilon]
    python -m skipdiff.eval --checkpoint runs/digits-latent --fid --denoise_loss --num_threads 2

The table puts each seed's FID next to its floor, and pairs each seed with the one-thread sweep cell of the
same recipe and seed (``eval/results/default_recipe/results.json``, ``recipe-vpred__seed-N``), whose VAE stage
was trained once, at one thread, with seed 0: the paired difference mixes the thread count and the VAE.

``--epsilon_folder`` holds the same two commands with ``--prediction_type epsilon`` added (the default before
the recipe screen chose v-prediction): the recipe's confirmation at the shipped two threads, v-prediction
against epsilon paired by training seed, on fresh seeds only (the screen's seed 0 is left out).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from skipdiff.report.markdown import SIGN_FLIP_HEADING, comparison_section
from skipdiff.report.ranking import compare
from skipdiff.runfolder import write_json_atomic

ROOT = Path(__file__).resolve().parent.parent
RECIPE_RESULTS = Path("eval/results/default_recipe/results.json")
THREADS = 2  # make demo's THREADS
SCREEN_SEED = 0  # the recipe screen chose v-prediction on this training seed: selection data, not confirmation


def seed_commands(seed: int, extra: list[str]) -> list[list[str]]:
    """``make demo``'s two commands for one training seed (run from the seed's folder); ``extra``: more
    training options (``--prediction_type epsilon``)."""
    train = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "accelerate_config.yaml")]
    train += [str(ROOT / "train_scripts" / "train_unet.py"), "--num_threads", str(THREADS), "--seed", str(seed)]
    train += ["--resume_from_checkpoint", "latest", *extra]
    evaluate = [sys.executable, "-m", "skipdiff.eval", "--checkpoint", "runs/digits-latent", "--fid"]
    evaluate += ["--denoise_loss", "--num_threads", str(THREADS)]
    return [train, evaluate]


def run_seeds(folder: Path, seeds: list[int], extra: list[str]) -> None:
    """Run the default job for every seed not yet evaluated in ``folder/seed-N``, one after another (logs in
    the seed folder); each seed's exit code and wall seconds are appended to ``folder/times.txt``. Stops at the
    first seed that fails, naming its log."""
    for seed in seeds:
        place = folder / f"seed-{seed}"
        if read_seed(place) is not None:
            print(f"seed {seed}: evaluated already, skipped")
            continue
        place.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        for command, log in zip(seed_commands(seed, extra), ("train.log", "eval.log"), strict=True):
            with open(place / log, "a") as out:  # a resumed seed keeps its earlier log
                code = subprocess.run(command, cwd=place, stdout=out, stderr=subprocess.STDOUT).returncode
            if code:
                break
        seconds = round(time.monotonic() - start)
        with open(folder / "times.txt", "a") as times:
            times.write(f"seed {seed} rc {code} {seconds} s\n")
        if code:
            raise SystemExit(f"seed {seed}: exit code {code}, see {place / log}")
        print(f"seed {seed}: done in {seconds} s")


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


def _seed_cells(row: dict) -> str:
    """A seed's table cells: seed, FID ± over sampling seeds, floor, FID / floor, FID − floor, denoise MSE."""
    return (
        f"| {row['seed']} | {row['fid']:.3f} ± {row['fid_std_over_sampling_seeds']:.3f} | {row['floor']:.3f} | "
        f"{row['fid_over_floor']:.2f} | {row['fid_minus_floor']:.3f} | {row['denoise_mse']:.4f} |"
    )


def table(results: dict) -> str:
    lines = [
        "# The shipped default job over training seeds (`make demo`, two threads)",
        "",
        "FID with the digits extractor, 1000 samples x 3 sampling seeds, DDIM-50, reference = the test split; the",
        "floor is 1000 train images against the same reference. Generated by `python eval/default_job_seeds.py collect`.",
        "",
        "| training seed | FID (± over sampling seeds) | floor | FID / floor | FID − floor | denoise MSE (v) "
        "| one-thread sweep cell's FID |",
        "|---|---|---|---|---|---|---|",
    ]
    one_thread = results["one_thread_fid"]
    for row in results["runs"]:
        other = one_thread.get(str(row["seed"]))
        lines.append(_seed_cells(row) + (f" {other:.3f} |" if other is not None else " - |"))
    summary = results["summary"]
    std = summary["fid"]["std"]
    lines += [
        "",
        f"Over {len(summary['seeds'])} seeds: FID {summary['fid']['mean']:.3f}"
        + (f" ± {std:.3f}" if std is not None else "")
        + f", {summary['fid_over_floor']['mean']:.2f} x the floor, FID − floor {summary['fid_minus_floor']['mean']:.3f}.",
    ]
    if results.get("against_one_thread"):
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
        lines += [_seed_cells(row) for row in results["epsilon_runs"]]
    if results.get("recipe_at_two_threads"):
        heading = (
            f"## The recipe at two threads: v-prediction against epsilon (FID, paired by training seed; seed "
            f"{SCREEN_SEED}, the screen's, left out)"
        )
        lines += comparison_section(heading, results["recipe_at_two_threads"], "FID")
        if results.get("recipe_at_two_threads_signflip"):
            lines += comparison_section(SIGN_FLIP_HEADING, results["recipe_at_two_threads_signflip"], "FID")
    return "\n".join(lines) + "\n"


def collect(folder: Path, epsilon_folder: Path | None, out: Path, command: str) -> dict:
    """Read every evaluated seed, summarise and test them, and write ``out/results.json`` and ``table.md``."""
    for place in (folder, epsilon_folder):
        if place is not None and not place.is_dir():
            raise SystemExit(f"{place}: no such folder")
    seeds = read_seeds(folder)
    if not seeds:
        raise SystemExit(f"no evaluated seed in {folder} (seed-N/runs/digits-latent/eval/eval.json)")
    one_thread = one_thread_fids(RECIPE_RESULTS)
    results = {
        "command": command,
        "runs": seeds,
        "one_thread_fid": {str(seed): fid for seed, fid in sorted(one_thread.items())},
        "summary": summarise(seeds, one_thread),
        "wall_seconds": read_times(folder / "times.txt"),
        "against_one_thread": against_one_thread(seeds, one_thread),
    }
    if epsilon_folder is not None:
        results["epsilon_runs"] = read_seeds(epsilon_folder)
        results["epsilon_wall_seconds"] = read_times(epsilon_folder / "times.txt")
        results["recipe_at_two_threads"] = recipe_at_two_threads(seeds, results["epsilon_runs"])
        results["recipe_at_two_threads_signflip"] = recipe_at_two_threads(seeds, results["epsilon_runs"], "sign-flip")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "results.json", results)
    text = table(results)
    (out / "table.md").write_text(text)
    print(text)
    return results


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="make demo's two commands for each seed not yet evaluated")
    r.add_argument("folder", type=Path, help="where seed-N/ folders go (runs/demo_2threads)")
    r.add_argument("--seeds", type=int, nargs="+", required=True)
    r.add_argument("--prediction_type", choices=["epsilon", "v_prediction", "sample"], help="else the default's")
    c = sub.add_parser("collect", help="summarise the evaluated seeds into --out")
    c.add_argument("folder", type=Path, help="the folder holding seed-N/ (runs/demo_2threads)")
    c.add_argument("--out", type=Path, default=Path("eval/results/default_job_seeds"))
    c.add_argument("--epsilon_folder", type=Path, help="seed-N/ of the same job with --prediction_type epsilon")
    args = parser.parse_args(argv)
    if args.command == "run":
        if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
            raise SystemExit(f"--seeds {args.seeds}: give distinct seeds >= 0")
        run_seeds(args.folder, args.seeds, ["--prediction_type", args.prediction_type] if args.prediction_type else [])
        return None
    command = "python eval/default_job_seeds.py " + " ".join(argv if argv is not None else sys.argv[1:])
    return collect(args.folder, args.epsilon_folder, args.out, command)


if __name__ == "__main__":
    main()
