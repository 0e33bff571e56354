"""Training survives SIGKILL: relaunched with ``--resume_from_checkpoint latest`` it always resumes from
the last *complete* checkpoint, never reads a partial one, and ends with the weights of a run that was
never interrupted (CPU, one thread: bit for bit).

Each scenario runs ``python train_scripts/train_unet.py`` (a tiny pixel-space run, 8 steps, a checkpoint
every 2) as a subprocess, kills it with SIGKILL at points chosen deterministically by polling the run
folder, relaunches it with the same command line until it finishes, and compares with an uninterrupted
run of the same command, which runs alongside in its own subprocess. Kill points:

* ``mid_write``: a seeded 0-80 ms after a ``.checkpoint-N.tmp`` folder appears (writing and fsyncing
  it takes 0.1-0.3 s here, so the kill lands mid-write; when it lands after the rename instead, the
  next launch is killed the same way at its next checkpoint, and the test asserts that one landed);
* ``mid_step``: a seeded 0-20 ms after the record of a step without a checkpoint appears in
  ``stats.jsonl``;
* ``exporting``: as soon as the final ``checkpoint-8`` appears (the run rotates old checkpoints, then
  validates and exports; a relaunch must not train a ninth step);
* ``checkpoint-N_appears``: just after a checkpoint is renamed into place.

Before one relaunch a partial ``.checkpoint-8.tmp`` is planted by hand (a truncated ``model.safetensors``
next to a state file that claims step 8): a resume that looked at temporary folders would fail or
pick it. Every relaunch gets its own ``PYTHONHASHSEED``, as separate launches do in real life.

The default suite runs three kills (~1.5 min on a busy 2-core CPU, most of it interpreter start-up);
``-m extended`` adds seven kills in one run. Every test here is ``slow`` (``make test-fast`` leaves them out).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # every scenario launches training processes (a minute or more)
REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train_scripts" / "train_unet.py"
MAX_STEPS = 8
TINY_ARGS = [
    "--model",
    "tiny",
    "--vae",
    "none",
    "--resolution",
    "8",
    "--train_batch_size",
    "16",
    "--max_train_steps",
    str(MAX_STEPS),
    "--checkpointing_steps",
    "2",
    "--num_validation_images",
    "4",
    "--validation_inference_steps",
    "2",
    "--report_to",
    "none",
    "--num_threads",
    "1",
    "--log_every",
    "1",
    "--resume_from_checkpoint",
    "latest",
]
WEIGHTS = ("unet_raw/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.safetensors")
COMPLETE = re.compile(r"^checkpoint-(\d+)$")
TEMPORARY = re.compile(r"^\.checkpoint-(\d+)\.tmp$")
RESUMED = re.compile(r"resumed from (\S+) at step (\d+)")
LOSS_RECORD = re.compile(r'^\{"step": (\d+), "loss"', re.MULTILINE)
LAUNCH_TIMEOUT = 600.0  # seconds; a launch is ~15 s of imports and ~2 s of training on a busy 2-core CPU


# ---------------------------------------------------------------------------------------------------
# Launching, polling, killing
# ---------------------------------------------------------------------------------------------------


@dataclass
class Launch:
    """One ``python train_unet.py`` process writing to ``out``, its output going to ``log``."""

    process: subprocess.Popen
    out: Path
    log: Path
    started_ns: int  # wall clock at launch: folders modified later were made by this process
    stats_offset: int  # size of stats.jsonl at launch: records after it are this process's

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def launch(out: Path, log: Path, hash_seed: int) -> Launch:
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "PYTHONHASHSEED": str(hash_seed),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    stats = out / "stats.jsonl"
    offset = stats.stat().st_size if stats.exists() else 0
    started = time.time_ns()
    with open(log, "wb") as handle:
        process = subprocess.Popen(
            [sys.executable, str(SCRIPT), *TINY_ARGS, "--output_dir", str(out)],
            cwd=REPO,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
    return Launch(process, out, log, started, offset)


def finish(run: Launch) -> None:
    try:
        code = run.process.wait(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        run.process.kill()
        run.process.wait()
        pytest.fail(f"{run.out} did not finish within {LAUNCH_TIMEOUT} s:\n{run.output()[-3000:]}")
    assert code == 0, f"training in {run.out} failed (exit {code}):\n{run.output()[-3000:]}"


def fresh_dirs(run: Launch, pattern: re.Pattern) -> list[Path]:
    """Folders of ``run.out`` matching ``pattern`` that this launch wrote (modified after it started)."""
    found = []
    try:
        entries = list(os.scandir(run.out))
    except FileNotFoundError:
        return []
    for entry in entries:
        if pattern.match(entry.name):
            try:
                if entry.is_dir() and entry.stat().st_mtime_ns >= run.started_ns:
                    found.append(Path(entry.path))
            except FileNotFoundError:  # renamed or deleted between listing and stat
                continue
    return found


def logged_steps(run: Launch) -> set[int]:
    """Steps whose training record this launch has appended to stats.jsonl so far."""
    try:
        with open(run.out / "stats.jsonl", "rb") as handle:
            handle.seek(run.stats_offset)
            text = handle.read().decode(errors="replace")
    except FileNotFoundError:
        return set()
    return {int(step) for step in LOSS_RECORD.findall(text)}


@dataclass
class Kill:
    """Where to SIGKILL a launch: when ``ready(run)`` first holds, after ``delay`` seconds."""

    name: str
    ready: Callable[[Launch], bool]
    delay: float = 0.0
    mid_write: bool = False  # meant to land while a checkpoint is being written
    before_step: int = MAX_STEPS  # reachable only by a launch that resumes before this step


def mid_write(rng: random.Random) -> Kill:
    """A seeded 0-80 ms after a ``.checkpoint-N.tmp`` appears (writing it takes 0.1-0.3 s here)."""
    return Kill("mid_write", lambda run: bool(fresh_dirs(run, TEMPORARY)), rng.uniform(0.0, 0.08), True)


def mid_step(step: int, rng: random.Random) -> Kill:
    """A seeded 0-20 ms into the step after ``step`` (a step takes 0.07-0.2 s here). ``step`` should not be
    a checkpoint step: one is written right after its record, and the kill would land in that write."""
    return Kill(
        f"mid_step_{step + 1}",
        lambda run: step in logged_steps(run),
        rng.uniform(0.0, 0.02),
        before_step=step,
    )


def exporting() -> Kill:
    final = re.compile(rf"^checkpoint-{MAX_STEPS}$")
    return Kill("exporting", lambda run: bool(fresh_dirs(run, final)))


def appears(name: str) -> Kill:
    """Just after ``checkpoint-N`` is renamed into place (the kill may land in the rotation)."""
    pattern = re.compile(rf"^{re.escape(name)}$")
    return Kill(f"{name}_appears", lambda run: bool(fresh_dirs(run, pattern)))


@dataclass
class KillReport:
    name: str
    complete: list[int]  # steps of the complete checkpoints left behind
    temporary: dict[str, list[str]]  # .checkpoint-*.tmp folders left behind -> the files they hold
    interrupted_write: bool  # a .checkpoint-*.tmp this launch was writing is among them


def kill_when(run: Launch, kill: Kill, poll: float = 0.001) -> KillReport:
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    while not kill.ready(run):
        if run.process.poll() is not None:
            pytest.fail(
                f"{kill.name}: the run ended (exit {run.process.returncode}) before the kill point:\n"
                f"{run.output()[-3000:]}"
            )
        if time.monotonic() > deadline:
            pytest.fail(f"{kill.name}: kill point not reached within {LAUNCH_TIMEOUT} s")
        time.sleep(poll)
    if kill.delay:
        time.sleep(kill.delay)
    run.process.send_signal(signal.SIGKILL)
    code = run.process.wait(timeout=60)
    assert code == -signal.SIGKILL, f"{kill.name}: the run was not killed (exit {code})"
    complete, temporary = checkpoint_folders(run.out)
    return KillReport(
        kill.name,
        complete,
        {p.name: sorted(f.name for f in p.iterdir()) for p in temporary},
        bool(fresh_dirs(run, TEMPORARY)),
    )


# ---------------------------------------------------------------------------------------------------
# What a run folder holds
# ---------------------------------------------------------------------------------------------------


def checkpoint_folders(out: Path) -> tuple[list[int], list[Path]]:
    """(steps of complete checkpoints, sorted; temporary folders)."""
    complete, temporary = [], []
    for path in out.iterdir():
        if (m := COMPLETE.match(path.name)) and path.is_dir():
            complete.append(int(m.group(1)))
        elif TEMPORARY.match(path.name):
            temporary.append(path)
    return sorted(complete), temporary


def checkpoint_files(checkpoint: Path) -> set[str]:
    """The files of a complete checkpoint, after checking that its state and weights load."""
    state = json.loads((checkpoint / "skipdiff_state.json").read_text())
    assert state["step"] == int(checkpoint.name.split("-")[1]), checkpoint
    for weights in checkpoint.glob("*.safetensors"):
        load_file(weights)  # raises on a truncated file
    return {f.name for f in checkpoint.iterdir()}


def resumed_from(run: Launch) -> int | None:
    """The step the launch resumed at (None: it started from scratch)."""
    text = run.output()
    found = RESUMED.findall(text)
    if not found:
        assert "no checkpoint in" in text, f"neither a resume nor a fresh start:\n{text[-3000:]}"
        return None
    ((path, step),) = found
    assert Path(path).name == f"checkpoint-{step}", f"resumed from {path}, which is not a complete checkpoint"
    return int(step)


def plant_partial_checkpoint(out: Path, step: int, source: Path) -> Path:
    """A ``.checkpoint-{step}.tmp`` as a kill mid-write could leave it, at its worst: a state file that
    claims ``step`` and a model file cut in half."""
    partial = out / f".checkpoint-{step}.tmp"
    partial.mkdir()
    weights = (source / "model.safetensors").read_bytes()
    (partial / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    state = json.loads((source / "skipdiff_state.json").read_text())
    (partial / "skipdiff_state.json").write_text(json.dumps({**state, "step": step}))
    old = (time.time_ns() - 60_000_000_000) // 1_000_000_000  # as if written by an earlier process
    os.utime(partial, (old, old))
    return partial


def last_loss_per_step(out: Path) -> dict[int, float]:
    """Loss of every step, the last record winning (a step redone after a kill is logged again)."""
    losses = {}
    for line in (out / "stats.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            losses[record["step"]] = record["loss"]
    return losses


# ---------------------------------------------------------------------------------------------------
# Scenarios
# ---------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    reference: Path  # the uninterrupted run
    out: Path  # the killed-and-relaunched run
    kills: list[KillReport]
    resumes: list[tuple[int | None, int | None]]  # per launch: (resumed at, last complete checkpoint)
    latest_files: list[set[str]]  # per kill: the files of the checkpoint the next launch resumes from
    planted: Path | None
    landed_mid_write: bool


def run_with_kills(tmp_path: Path, kills: list[Kill], rng: random.Random, plant_before: int | None = None) -> Outcome:
    """Kill a run at each point of ``kills`` in turn, relaunching after each, then let it finish.

    A mid-write kill that landed after the rename is tried again at the next checkpoint. Before launch
    number ``plant_before`` a partial ``.checkpoint-{MAX_STEPS}.tmp`` is planted.
    """
    reference_dir, out = tmp_path / "uninterrupted", tmp_path / "killed"
    out.mkdir()
    started = [launch(reference_dir, tmp_path / "uninterrupted.log", hash_seed=0)]  # runs alongside
    outcome = Outcome(reference_dir, out, [], [], [], None, False)
    pending, latest = list(kills), None
    try:
        for number in range(1, 3 * len(kills) + 2):
            if number == plant_before:
                outcome.planted = plant_partial_checkpoint(out, MAX_STEPS, out / f"checkpoint-{latest}")
            # After a retried mid-write kill, a later kill point may lie behind the resume point.
            pending = [k for k in pending if latest is None or latest < k.before_step]
            run = launch(out, tmp_path / f"launch-{number}.log", hash_seed=number)
            started.append(run)
            if not pending:
                finish(run)
                outcome.resumes.append((resumed_from(run), latest))
                break
            kill = pending.pop(0)
            report = kill_when(run, kill)
            outcome.resumes.append((resumed_from(run), latest))
            outcome.kills.append(report)
            outcome.landed_mid_write |= report.interrupted_write
            if kill.mid_write and not report.interrupted_write:
                pending.insert(0, mid_write(rng))  # landed just after the rename: again at the next one
            latest = report.complete[-1] if report.complete else None
            if latest is not None:  # what the next launch must resume from is whole
                outcome.latest_files.append(checkpoint_files(out / f"checkpoint-{latest}"))
        else:
            pytest.fail(f"still not finished after {number} launches: {outcome.kills}")
        finish(started[0])
    finally:
        for run in started:  # on failure, leave no process of ours behind
            if run.process.poll() is None:
                run.process.kill()
                run.process.wait()
    return outcome


def assert_same_as_uninterrupted(outcome: Outcome) -> None:
    summary = {"kills": [vars(k) for k in outcome.kills], "resumes": outcome.resumes}
    print(json.dumps(summary))  # shown with pytest -s
    for resumed, expected in outcome.resumes:
        assert resumed == expected, f"resumed at {resumed}, but the last complete checkpoint was {expected}"
    _, leftovers = checkpoint_folders(outcome.out)
    assert not leftovers, f"temporary folders left behind: {leftovers}"  # each was replaced when rewritten
    final = max(checkpoint_folders(outcome.reference)[0])
    whole = checkpoint_files(outcome.reference / f"checkpoint-{final}")
    for files in outcome.latest_files:
        assert files == whole, f"a resumed-from checkpoint differs from a whole one: {sorted(files ^ whole)}"
    metrics = json.loads((outcome.out / "train_metrics.json").read_text())
    assert metrics["steps"] == MAX_STEPS, metrics
    assert last_loss_per_step(outcome.out) == last_loss_per_step(outcome.reference)
    for name in WEIGHTS:  # bit for bit, not merely close
        resumed, straight = load_file(outcome.out / name), load_file(outcome.reference / name)
        assert sorted(resumed) == sorted(straight)
        differing = {
            k: float((resumed[k] - straight[k]).abs().max())
            for k in straight
            if not torch.equal(resumed[k], straight[k])
        }
        assert not differing, f"{name}: tensors differ from the uninterrupted run: {differing}"


def test_three_kills_mid_step_mid_checkpoint_write_and_while_exporting(tmp_path):
    rng = random.Random(0)
    outcome = run_with_kills(tmp_path, [mid_step(3, rng), mid_write(rng), exporting()], rng, plant_before=2)
    assert len(outcome.kills) >= 3
    assert outcome.landed_mid_write, f"no kill landed while a checkpoint was written: {outcome.kills}"
    assert outcome.planted is not None and outcome.resumes[1][0] != MAX_STEPS  # the planted one was ignored
    assert_same_as_uninterrupted(outcome)


@pytest.mark.extended
def test_killed_at_every_checkpoint_and_between_them(tmp_path):
    rng = random.Random(1)
    kills = [
        appears("checkpoint-2"),
        mid_write(rng),
        mid_step(5, rng),
        mid_write(rng),
        mid_step(7, rng),
        mid_write(rng),
        exporting(),
    ]
    outcome = run_with_kills(tmp_path, kills, rng, plant_before=3)
    assert len(outcome.kills) >= len(kills)
    assert outcome.landed_mid_write
    assert_same_as_uninterrupted(outcome)
