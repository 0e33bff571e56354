"""A run that a cluster can stop at any time loses nothing: preemption, concurrent writers, full disks and
files from others (issue 28). Each test failed on the code before its fix.

Signals reach real subprocesses (``tests/helpers/train_unet_signal_at.py`` sends them at a chosen step, so
the test is deterministic); everything else runs in this process on the tiny pixel-space run.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.unet_runs import (
    ACCELERATE,
    EMA_WEIGHTS,
    REPO,
    UNET_WEIGHTS,
    free_port,
    max_abs_difference,
    run_train_unet,
    tensors,
    tiny_args,
)

from skipdiff.runfolder import LOCK_FILE
from skipdiff.training import checkpoints
from skipdiff.training.startup import TrainingInterrupted

SIGNAL_AT = REPO / "tests" / "helpers" / "train_unet_signal_at.py"
TIMEOUT = 420  # seconds for one launch; a hang fails instead of blocking


def env(**extra: str) -> dict:
    return {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        **extra,
    }


def weights_equal(a: Path, b: Path) -> None:
    assert max_abs_difference(tensors(a / UNET_WEIGHTS), tensors(b / UNET_WEIGHTS)) == 0.0
    assert max_abs_difference(tensors(a / EMA_WEIGHTS), tensors(b / EMA_WEIGHTS)) == 0.0


# --------------------------------------------------------------------------------------------------
# Preemption: SIGTERM and SIGUSR1 checkpoint after the current step
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_checkpoints_exits_143_and_the_relaunch_ends_with_the_uninterrupted_weights(tmp_path):
    straight, out = tmp_path / "straight", tmp_path / "run"
    run_train_unet(tiny_args(straight, "--max_train_steps", "6"))
    result = subprocess.run(
        [sys.executable, str(SIGNAL_AT), *tiny_args(out, "--max_train_steps", "6")],
        cwd=REPO,
        env=env(SKIPDIFF_TEST_SIGNAL="3:SIGTERM:self"),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-3000:]
    assert "SIGTERM: stopping after this step" in result.stderr and "Traceback" not in result.stderr
    assert "stopped: interrupted by SIGTERM after step 3" in result.stderr
    lines = result.stderr.splitlines()
    assert "--resume_from_checkpoint latest" in lines[lines.index(next(x for x in lines if "Resume with:" in x)) + 1]
    assert [p.name for p in checkpoints.list_checkpoints(out)] == ["checkpoint-3"]
    assert not (out / LOCK_FILE).exists() and not (out / EMA_WEIGHTS).exists()

    assert run_train_unet(tiny_args(out, "--max_train_steps", "6", "--resume_from_checkpoint", "latest"))["steps"] == 6
    weights_equal(out, straight)


@pytest.mark.slow
def test_sigusr1_in_process_raises_training_interrupted_and_restores_the_handlers(tmp_path, monkeypatch):
    """SLURM's ``--signal=USR1@90`` warning, in the library: the search package catches
    ``TrainingInterrupted``; the caller's own handlers are back afterwards."""
    from skipdiff.training import unet_trainer

    straight, out = tmp_path / "straight", tmp_path / "run"
    run_train_unet(tiny_args(straight, "--max_train_steps", "4"))
    mine = lambda signum, frame: None  # noqa: E731  a caller's handler (e.g. a search worker's)
    previous = {s: signal.signal(s, mine) for s in (signal.SIGTERM, signal.SIGUSR1)}
    sigint_before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN in a background job
    micro_step = unet_trainer._micro_step

    def signalled(run, batch, logging_step):
        done = micro_step(run, batch, logging_step)
        if done is not None and run.step + 1 == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
        return done

    try:
        monkeypatch.setattr(unet_trainer, "_micro_step", signalled)
        with pytest.raises(TrainingInterrupted, match="interrupted by SIGUSR1 after step 2") as info:
            run_train_unet(tiny_args(out, "--max_train_steps", "4"))
        assert info.value.exit_status == 138
        assert signal.getsignal(signal.SIGUSR1) is mine and signal.getsignal(signal.SIGTERM) is mine
        assert signal.getsignal(signal.SIGINT) is sigint_before
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    monkeypatch.setattr(unet_trainer, "_micro_step", micro_step)
    run_train_unet(tiny_args(out, "--max_train_steps", "4", "--resume_from_checkpoint", "latest"))
    weights_equal(out, straight)


@pytest.mark.slow
def test_two_processes_stop_together_on_the_launchers_sigterm_and_resume_to_the_same_weights(tmp_path):
    """``accelerate launch``'s elastic agent forwards SIGTERM to both gloo workers (what a scheduler's stop
    does); they agree on a step, write one checkpoint, and the launcher exits 143."""
    straight, out = tmp_path / "straight", tmp_path / "run"
    launch_args = [
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    args = ("--max_train_steps", "8")

    def launch(folder: Path, *extra: str, signal_at: str | None = None) -> subprocess.CompletedProcess:
        variables = {"SKIPDIFF_TEST_SIGNAL": signal_at or "0:SIGTERM:self", "SKIPDIFF_TEST_STEP_SECONDS": "0.1"}
        return subprocess.run(
            [
                str(ACCELERATE),
                "launch",
                *launch_args,
                "--main_process_port",
                str(free_port()),
                str(SIGNAL_AT),
                *tiny_args(folder, *args, *extra),
            ],
            cwd=tmp_path,
            env=env(**variables),
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )

    assert launch(straight).returncode == 0
    stopped = launch(out, signal_at="2:SIGTERM:parent")
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    saved = checkpoints.list_checkpoints(out)
    assert len(saved) == 1 and 2 <= checkpoints.read_state(saved[0])["step"] < 8, stopped.stderr[-3000:]
    assert "interrupted by SIGTERM after step" in stopped.stderr
    resumed = launch(out, "--resume_from_checkpoint", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    weights_equal(out, straight)


def test_a_sweep_reads_a_sigterm_stopped_training_as_an_interruption():
    from skipdiff.sweep.launch import interrupting_signal

    assert interrupting_signal(143) == signal.SIGTERM and interrupting_signal(138) == signal.SIGUSR1
    assert interrupting_signal(-signal.SIGTERM) == signal.SIGTERM and interrupting_signal(130) == signal.SIGINT
    assert interrupting_signal(1) is None and interrupting_signal(0) is None


def test_a_sweep_passes_sigterm_on_to_the_training_it_waits_for_and_survives_it():
    from skipdiff.sweep.launch import forwarding_stop_signals

    child = (
        "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(143)); "
        "print('ready', flush=True); time.sleep(60)"
    )
    process = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    before = signal.getsignal(signal.SIGTERM)
    with forwarding_stop_signals(process):
        os.kill(os.getpid(), signal.SIGTERM)  # sent to the sweep alone: without forwarding it would end pytest
        assert process.wait(timeout=30) == 143
    assert signal.getsignal(signal.SIGTERM) is before


# --------------------------------------------------------------------------------------------------
# Untrusted files: a checkpoint from someone else runs nothing
# --------------------------------------------------------------------------------------------------


class RunsCode:
    """Pickles as a call of ``os.system``: loading it with plain pickle would create ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("checkpointed") / "run"
    run_train_unet(tiny_args(out, "--max_train_steps", "2", "--checkpointing_steps", "2"))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["random_states_0.pkl", "custom_checkpoint_0.pkl", "optimizer.bin"])
def test_a_planted_pickle_that_would_run_code_is_refused_by_name_and_never_runs(checkpointed, tmp_path, name):
    import torch

    out = tmp_path / "run"
    shutil.copytree(checkpointed, out)
    marker = tmp_path / "ran"
    torch.save({"state": RunsCode(marker)}, out / "checkpoint-2" / name)
    before = (out / "training_options.json").read_bytes()
    with pytest.raises(
        ValueError, match=rf"{name}' would run code to load \(\S*system\).*refused, nothing in it was run"
    ):
        run_train_unet(
            tiny_args(
                out,
                "--max_train_steps",
                "4",
                "--checkpointing_steps",
                "2",
                "--resume_from_checkpoint",
                "latest",
                "--allow_changed",
                "max_train_steps",
            )
        )
    assert not marker.exists()
    assert (out / "training_options.json").read_bytes() == before  # a refused resume rewrites nothing


def test_the_state_files_skipdiff_writes_load_without_running_code(checkpointed):
    for path in sorted((checkpointed / "checkpoint-2").glob("*.[pb][ki][ln]")):
        assert isinstance(checkpoints.load_state_file(path), dict), path


# --------------------------------------------------------------------------------------------------
# --overwrite_output_dir deletes only what skipdiff wrote; a refused or failed start changes nothing
# --------------------------------------------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_refuses_a_folder_holding_files_skipdiff_never_writes_and_deletes_nothing(checkpointed, tmp_path):
    repo = tmp_path / "repo"  # what `--output_dir .` in a clone is: eval/ makes it look like a run
    (repo / ".git").mkdir(parents=True)
    (repo / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (repo / "skipdiff").mkdir()
    (repo / "skipdiff" / "unet.py").write_text("# source\n")
    (repo / "eval").mkdir()
    (repo / "eval" / "results.md").write_text("numbers\n")
    before = snapshot(repo)
    with pytest.raises(
        ValueError,
        match=r"--overwrite_output_dir refused: .*repo' holds files that skipdiff never "
        r"writes in a run folder \(\.git/, eval/results\.md, skipdiff/\)",
    ):
        run_train_unet(tiny_args(repo, "--max_train_steps", "1", "--overwrite_output_dir"))
    assert snapshot(repo) == before

    run = tmp_path / "run"  # a real run with one user file in it
    shutil.copytree(checkpointed, run)
    (run / "notes.txt").write_text("my notes\n")
    before = snapshot(run)
    with pytest.raises(ValueError, match=r"\(notes\.txt\)"):
        run_train_unet(tiny_args(run, "--max_train_steps", "1", "--overwrite_output_dir"))
    assert snapshot(run) == before


@pytest.mark.slow
def test_a_failed_start_leaves_no_options_file_that_makes_the_next_fresh_run_refuse(tmp_path, monkeypatch):
    from skipdiff.training import unet_trainer

    def tracker_fails(*args):
        raise OSError("the tracker could not start")

    out = tmp_path / "run"
    monkeypatch.setattr(unet_trainer, "_start_log", tracker_fails)
    with pytest.raises(OSError, match="tracker could not start"):
        run_train_unet(tiny_args(out, "--max_train_steps", "1"))
    assert not (out / "training_options.json").exists()
    monkeypatch.undo()
    assert run_train_unet(tiny_args(out, "--max_train_steps", "1"))["steps"] == 1  # not refused as "another run"


# --------------------------------------------------------------------------------------------------
# Evaluation never silently replaces results
# --------------------------------------------------------------------------------------------------


def evaluate_cli(*argv: str) -> int:
    from skipdiff.eval.__main__ import cli

    return cli(["--buckets", "2", "--denoise_images", "8", "--num_threads", "1", *argv])  # later options win


@pytest.mark.slow
def test_evaluations_with_agreeing_settings_merge_and_differing_ones_are_refused_unless_overwrite(
    checkpointed, tmp_path, capsys
):
    import json

    run = tmp_path / "run"
    shutil.copytree(checkpointed, run)
    results = run / "eval" / "eval.json"
    assert evaluate_cli("--checkpoint", str(run), "--denoise_loss") == 0  # as the README's first line
    first = json.loads(results.read_text())
    assert evaluate_cli("--checkpoint", str(run), "--grad_stability") == 0  # ... then its third: both kept
    merged = json.loads(results.read_text())
    assert merged["denoise"] == first["denoise"] and "grad_stability" in merged
    assert merged["settings"]["denoise_loss"] and merged["settings"]["grad_stability"]

    capsys.readouterr()
    before = results.read_bytes()
    out = ("--out", str(run / "eval"))
    assert evaluate_cli("--checkpoint", str(run), "--denoise_loss", "--skips", "zero", *out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "skips: existing None vs now 'zero'" in err[0], err
    assert "--overwrite" in err[0] and results.read_bytes() == before
    assert evaluate_cli("--checkpoint", str(run), "--denoise_loss", "--buckets", "3", "--grad_stability") == 2
    assert "buckets: existing 2 vs now 3" in capsys.readouterr().err

    assert evaluate_cli("--checkpoint", str(run), "--denoise_loss", "--skips", "zero", *out, "--overwrite") == 0
    replaced = json.loads(results.read_text())
    assert replaced["skip_spec"] == "zero" and "grad_stability" not in replaced


def test_an_edited_split_in_training_options_is_refused_against_the_checkpoints_own_copy(
    checkpointed, tmp_path, capsys
):
    """With ``split_seed`` edited, evaluation scored a test split holding training images, and said nothing."""
    import json

    from skipdiff.eval.run import load_run

    run = Path(shutil.copytree(checkpointed, tmp_path / "run"))
    options_file = run / "training_options.json"
    trained = json.loads(options_file.read_text())
    options_file.write_text(json.dumps({**trained, "split_seed": trained["split_seed"] + 7, "test_fraction": 0.5}))
    assert evaluate_cli("--checkpoint", str(run), "--denoise_loss") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"'{options_file}' names another train/test split" in err[0], err
    assert (
        f"split_seed: training_options.json {trained['split_seed'] + 7} vs checkpoint {trained['split_seed']}" in err[0]
    )
    assert (
        "test_fraction: training_options.json 0.5 vs checkpoint" in err[0]
        and "checkpoint-2/skipdiff_state.json" in err[0]
    )
    assert not (run / "eval").exists()

    options_file.write_text(json.dumps({**trained, "learning_rate": 1.0}))  # not the split: the run still loads
    assert load_run(str(run))[1]["learning_rate"] == 1.0


def test_a_second_evaluation_into_a_folder_in_use_is_refused_naming_it(checkpointed, tmp_path, capsys):
    import socket

    from skipdiff.runfolder import EVAL_LOCK_FILE

    out = tmp_path / "eval"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / EVAL_LOCK_FILE).write_text(f'{{"pid": {sleeper.pid}, "host": "{socket.gethostname()}", "started": 0}}')
        assert evaluate_cli("--checkpoint", str(checkpointed), "--denoise_loss", "--out", str(out)) == 2
        err = capsys.readouterr().err
        assert f"'{out}' is in use by another evaluation (pid {sleeper.pid}" in err and "another --out" in err
        assert not (out / "eval.json").exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert (
        evaluate_cli("--checkpoint", str(checkpointed), "--denoise_loss", "--out", str(out)) == 0
    )  # stale: taken over
    assert (out / "eval.json").is_file() and not (out / EVAL_LOCK_FILE).exists()


# --------------------------------------------------------------------------------------------------
# File modes follow the umask, weights included
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_every_file_of_a_run_follows_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        out = tmp_path / "run"
        run_train_unet(tiny_args(out, "--max_train_steps", "2", "--checkpointing_steps", "2"))
    finally:
        os.umask(previous)
    modes = {str(p.relative_to(out)): p.stat().st_mode & 0o777 for p in out.rglob("*") if p.is_file()}
    assert UNET_WEIGHTS in modes and "checkpoint-2/model.safetensors" in modes
    wrong = {name: oct(mode) for name, mode in modes.items() if mode != 0o666 & ~umask}
    assert not wrong, wrong


# --------------------------------------------------------------------------------------------------
# A full disk is one line
# --------------------------------------------------------------------------------------------------


def test_a_full_disk_while_safetensors_writes_a_checkpoint_is_one_error_line(tmp_path, monkeypatch, capsys):
    import accelerate.utils.other
    from safetensors import SafetensorError

    from skipdiff.cli.train_unet import main

    def disk_full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(accelerate.utils.other, "safe_save_file", disk_full)
    out = tmp_path / "run"
    from helpers.unet_runs import reset_accelerate_state

    reset_accelerate_state()
    try:
        code = main(tiny_args(out, "--max_train_steps", "2", "--checkpointing_steps", "1"))
    finally:
        reset_accelerate_state()
    text = capsys.readouterr().err  # (after tqdm's progress line, which ends in a carriage return)
    err = [line[line.index("error: ") :] for line in text.splitlines() if "error: " in line]
    assert "Traceback" not in text
    assert code == 1 and len(err) == 1, err
    assert "could not write checkpoint" in err[0] and "checkpoint-1" in err[0] and "No space left" in err[0]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")] and not checkpoints.list_checkpoints(out)


# --------------------------------------------------------------------------------------------------
# Every stage writes atomically or is detected as unfinished; nobody deletes a folder another holds
# --------------------------------------------------------------------------------------------------


def test_a_sweep_leaves_a_cell_another_process_is_training_untouched(tmp_path, monkeypatch):
    """A second sweep on the same ``--out`` finds a cell without a checkpoint yet (the first is still in its
    first steps): it used to delete the folder as an earlier attempt and train it again; both said done."""
    import json
    import socket

    from skipdiff import sweep
    from skipdiff.sweep import launch
    from skipdiff.sweep.runner import SweepError

    spec = sweep.parse_spec(
        {
            "kind": "diffusion",
            "base": {"model": "tiny", "vae": "none", "resolution": 8},
            "grid": {"skips": {"none": "none"}, "seed": [0]},
            "eval": {"denoise_loss": True},
        },
        "micro",
    )
    out = tmp_path / "out"
    cell = out / "skips-none__seed-0"
    cell.mkdir(parents=True)  # as the first sweep left it a few steps into training
    (cell / "cell.json").write_text(json.dumps({"name": cell.name, "status": "running"}))
    (cell / "stats.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    trained = []

    def train_cell(kind, options, *args):  # records that training started, then stops the cell there
        trained.append(options)
        raise RuntimeError("stopped by the test")

    monkeypatch.setattr(launch, "train_cell", train_cell)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    lines = []
    try:
        (cell / LOCK_FILE).write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(), "started": 0}))
        before = snapshot(cell)
        with pytest.raises(SweepError, match=r"1 cell\(s\) in use by another process were left to it .*skips-none"):
            sweep.run_sweep(spec, out, log=lines.append)
        assert snapshot(cell) == before and not trained  # nothing deleted, rewritten or trained
        assert any(f"skipped, '{cell}' is in use by another training process (pid {sleeper.pid}" in x for x in lines)
    finally:
        sleeper.kill()
        sleeper.wait()
    with pytest.raises(SweepError, match=r"1 cell\(s\) failed"):  # its owner gone, the lock is stale: the cell runs
        sweep.run_sweep(spec, out, log=lines.append)
    assert len(trained) == 1 and not (cell / "stats.jsonl").exists()  # restarted in a clean folder


def five_images(folder: Path) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (16, 16), np.uint8)).save(folder / f"{i}.png")
    return folder


def vae_options(images: Path, out: Path, **changes):
    from skipdiff.training.vae_options import VaeOptions

    fields = dict(
        train_data_dir=str(images),
        test_fraction=0.4,
        preset="tiny",
        train_batch_size=2,
        max_train_steps=2,
        num_threads=1,
        output_dir=str(out),
    )
    return VaeOptions(**{**fields, **changes})


def test_a_vae_stage_stopped_while_saving_leaves_no_folder_a_later_run_would_reuse(tmp_path, monkeypatch):
    """The VAE folder was written in place: a full disk (or a kill) after config.json left a folder that
    ``--vae auto`` reused, failing later with diffusers' "Unable to load weights" and no hint."""
    import errno

    from diffusers import AutoencoderKL

    from skipdiff.training import vae as stage

    images, out = five_images(tmp_path / "images"), tmp_path / "vae"

    def disk_full_after_the_config(self, folder, **kwargs):
        self.save_config(folder)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(AutoencoderKL, "save_pretrained", disk_full_after_the_config)
    with pytest.raises(OSError, match=rf"could not write the VAE stage to '{out}': .*No space left.*nothing of it"):
        stage.train_vae(vae_options(images, out))
    assert stage.vae_folder_state(out) == ("none", []) and not list(out.iterdir())
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left
    monkeypatch.undo()
    stage.train_vae(vae_options(images, out))  # the folder is free: the same command trains it
    assert stage.vae_folder_state(out) == ("finished", [])


def test_two_runs_training_one_vae_stage_together_keep_the_first_saved(tmp_path, monkeypatch, caplog):
    """Two runs of one split start ``--vae auto`` together: the second to finish keeps the first's VAE (both
    runs and every later one encode with it) instead of replacing it under the first run."""
    from diffusers import AutoencoderKL

    from skipdiff.training import vae as stage

    images, first, out = five_images(tmp_path / "images"), tmp_path / "first", tmp_path / "vae"
    first_metrics = stage.train_vae(vae_options(images, first))
    save = AutoencoderKL.save_pretrained

    def the_other_run_saves_first(self, folder, **kwargs):
        shutil.copytree(first, out, dirs_exist_ok=True)
        return save(self, folder, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "save_pretrained", the_other_run_saves_first)
    assert stage.train_vae(vae_options(images, out, seed=1)) == first_metrics
    assert snapshot(out) == snapshot(first) and "that one is kept and used" in caplog.text  # a logging warning
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_half_written_vae_folder_is_refused_by_name_and_never_reused(tmp_path, monkeypatch):
    """What an in-place save killed after its config.json left (the save is atomic now; older folders remain)."""
    from skipdiff.encoders import load_encoder
    from skipdiff.training import runtime
    from skipdiff.training import vae as stage
    from skipdiff.training.options import TrainOptions

    monkeypatch.chdir(tmp_path)
    images = five_images(tmp_path / "images")
    options = TrainOptions(vae="auto", train_data_dir=str(images), test_fraction=0.4, resolution=16)
    folder = runtime.auto_vae_dir(options)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    monkeypatch.setattr(runtime, "train_vae", lambda *args: pytest.fail("trained instead of refusing"))
    with pytest.raises(
        ValueError,
        match=rf"'{folder}' holds an unfinished VAE stage \(no diffusion_pytorch_model"
        r"\.safetensors, vae_metrics\.json: .*delete the folder",
    ):
        runtime.prepare_encoder(options, None, 1)
    with pytest.raises(ValueError, match=r"cannot be loaded \(missing, truncated or half-written weights\?\)"):
        load_encoder(str(folder), 1)  # named by hand (--vae FOLDER): a remedy instead of diffusers' bare error
    with pytest.raises(ValueError, match=r"unfinished VAE stage .*pass --overwrite_output_dir to train it again"):
        stage.train_vae(vae_options(images, folder))
    stage.train_vae(vae_options(images, folder, overwrite_output_dir=True))
    assert stage.vae_folder_state(folder) == ("finished", []) and load_encoder(str(folder), 1).downscale == 2

    (folder / "notes.txt").write_text("mine\n")  # overwriting replaces the stage's files, and only them
    before = (folder / stage.VAE_WEIGHTS).read_bytes()
    stage.train_vae(vae_options(images, folder, overwrite_output_dir=True, seed=1))
    assert (folder / "notes.txt").read_text() == "mine\n" and (folder / stage.VAE_WEIGHTS).read_bytes() != before
    assert stage.vae_folder_state(folder) == ("finished", [])
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".")] == []


def test_sigterm_during_the_vae_stage_stops_it_after_the_current_step(tmp_path, monkeypatch):
    """Inside a diffusion run (``--vae auto``), whose handler used to note the signal and act only once the
    whole VAE stage had ended."""
    from skipdiff.training import vae as stage
    from skipdiff.training.startup import StopRequest

    class SignalledAtStep2(stage.tqdm):
        def update(self, n=1):
            super().update(n)
            if self.n == 2:
                os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(stage, "tqdm", SignalledAtStep2)
    out = tmp_path / "vae"
    with StopRequest() as run:
        outer = signal.getsignal(signal.SIGTERM)
        with pytest.raises(
            TrainingInterrupted,
            match=r"interrupted by SIGTERM after step 2 of 400; .*nothing of it "
            r"was saved",
        ) as info:
            stage.train_vae(vae_options(five_images(tmp_path / "images"), out, max_train_steps=400))
        assert signal.getsignal(signal.SIGTERM) == outer and not run.flag  # the run's own handler is back
    assert info.value.exit_status == 143 and stage.vae_folder_state(out) == ("none", [])


# --------------------------------------------------------------------------------------------------
# Export and evaluation: a full disk is one line, writes whole or detected as unfinished
# --------------------------------------------------------------------------------------------------


def error_lines(text: str) -> list[str]:
    """The ``error:`` lines of a command's stderr (after tqdm's progress, which ends in a carriage return)."""
    return [line[line.index("error: ") :] for line in text.splitlines() if "error: " in line]


def no_space(*args, **kwargs):
    import errno

    raise OSError(errno.ENOSPC, "No space left on device")


def raw_weights_do_not_fit(monkeypatch) -> None:
    """The disk fills while the export writes ``unet_raw/`` (after model_index.json and unet/)."""
    from skipdiff.skips.unet import SkipUNet2DModel

    save = SkipUNet2DModel.save_pretrained

    def save_pretrained(self, folder, **kwargs):
        return no_space() if Path(folder).name == "unet_raw" else save(self, folder, **kwargs)

    monkeypatch.setattr(SkipUNet2DModel, "save_pretrained", save_pretrained)


def test_a_full_disk_during_the_export_is_one_line_and_leaves_no_run_that_looks_finished(tmp_path, monkeypatch, capsys):
    """It left model_index.json and unet/ without unet_raw/: evaluation read the EMA weights as the raw ones."""
    from helpers.unet_runs import reset_accelerate_state

    from skipdiff.cli.train_unet import main

    raw_weights_do_not_fit(monkeypatch)
    out = tmp_path / "run"
    args = tiny_args(out, "--max_train_steps", "2", "--checkpointing_steps", "2")
    reset_accelerate_state()
    try:
        code = main(args)
    finally:
        reset_accelerate_state()
    text = capsys.readouterr().err
    err = error_lines(text)
    assert code == 1 and len(err) == 1 and "Traceback" not in text, err
    assert f"could not export the pipeline to '{out}'" in err[0] and "No space left" in err[0]
    assert "--resume_from_checkpoint latest" in err[0]
    assert not (out / "model_index.json").exists() and not [p for p in out.iterdir() if ".tmp" in p.name]
    monkeypatch.undo()

    assert evaluate_cli("--checkpoint", str(out), "--denoise_loss") == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "is a skipdiff run without its exported pipeline" in err[0], err
    assert run_train_unet([*args, "--resume_from_checkpoint", "latest"])["steps"] == 2  # what the error says to do
    assert (out / "unet_raw").is_dir() and evaluate_cli("--checkpoint", str(out), "--denoise_loss") == 0


def test_a_failed_export_into_an_exported_run_changes_nothing_in_it(checkpointed, tmp_path, monkeypatch):
    import torch

    from skipdiff.export import export_pipeline
    from skipdiff.pipeline import SkipDiffPipeline

    run = Path(shutil.copytree(checkpointed, tmp_path / "run"))
    pipeline = SkipDiffPipeline.from_pretrained(run)
    with torch.no_grad():
        next(pipeline.unet.parameters()).add_(1.0)  # other weights than the folder's, as a later export has
    before = snapshot(run)
    raw_weights_do_not_fit(monkeypatch)
    with pytest.raises(OSError, match=rf"could not export the pipeline to '{run}': .*No space left.*is intact"):
        export_pipeline(pipeline, run, raw_unet=pipeline.unet)
    assert snapshot(run) == before  # unet/ was rewritten in place before the failure
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in checkpointed.iterdir())


def test_an_export_stopped_while_moving_its_files_in_is_refused_by_name(checkpointed, tmp_path, monkeypatch, capsys):
    """A kill between its moves leaves the folder without unet_raw/; the marker left with it tells."""
    from skipdiff import export
    from skipdiff.pipeline import UNFINISHED_EXPORT, SkipDiffPipeline

    run = Path(shutil.copytree(checkpointed, tmp_path / "run"))
    pipeline = SkipDiffPipeline.from_pretrained(run)
    replace = os.replace

    def killed_before_unet_raw(source, target):
        if Path(target).name == "unet_raw":
            raise KeyboardInterrupt  # (a kill -9 would also leave the temporary folder: a hidden name, never read)
        return replace(source, target)

    monkeypatch.setattr(export.os, "replace", killed_before_unet_raw)
    with pytest.raises(KeyboardInterrupt):
        export.export_pipeline(pipeline, run, raw_unet=pipeline.unet)
    monkeypatch.undo()
    assert (run / UNFINISHED_EXPORT).is_file() and not (run / "unet_raw").exists()
    assert evaluate_cli("--checkpoint", str(run), "--denoise_loss") == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and f"'{run}' holds an unfinished export" in err[0] and "write it again" in err[0], err
    with pytest.raises(ValueError, match="holds an unfinished export"):
        SkipDiffPipeline.from_pretrained(run)
    export.export_pipeline(pipeline, run, raw_unet=pipeline.unet)  # exported again: whole, and loads
    assert not (run / UNFINISHED_EXPORT).exists() and SkipDiffPipeline.from_pretrained(run).unet is not None


def test_a_full_disk_while_evaluation_writes_its_results_is_one_line_and_keeps_the_earlier_ones(
    checkpointed, tmp_path, monkeypatch, capsys
):
    import pathlib

    run = Path(shutil.copytree(checkpointed, tmp_path / "run"))
    assert evaluate_cli("--checkpoint", str(run), "--denoise_loss") == 0
    before = snapshot(run / "eval")
    capsys.readouterr()

    def half_written_then_full(self, data, *args, **kwargs):  # a real full disk: part of the file, then ENOSPC
        with open(self, "w") as handle:
            handle.write(data[: len(data) // 2])
        no_space()

    monkeypatch.setattr(pathlib.Path, "write_text", half_written_then_full)
    assert evaluate_cli("--checkpoint", str(run), "--denoise_loss") == 2
    monkeypatch.undo()
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith(f"error: could not write '{run / 'eval'}': no space left"), err
    assert "free space or write somewhere else (--out)" in err[0]
    assert snapshot(run / "eval") == before and not [p for p in (run / "eval").iterdir() if ".tmp" in p.name]


def test_a_full_disk_while_a_plot_is_written_leaves_the_old_plot(tmp_path, monkeypatch):
    import matplotlib.figure

    from skipdiff.eval import plots

    path = tmp_path / "loss.png"
    fig, ax = plots.new_figure(2, 2)
    ax.plot([0, 1], [1, 0])
    plots.save_figure(fig, path)
    before = path.read_bytes()
    savefig = matplotlib.figure.Figure.savefig

    def half_written_then_full(self, target, **kwargs):
        savefig(self, target, **kwargs)
        Path(target).write_bytes(Path(target).read_bytes()[:100])
        no_space()

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", half_written_then_full)
    fig, ax = plots.new_figure(2, 2)
    with pytest.raises(OSError, match="No space left"):
        plots.save_figure(fig, path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["loss.png"]


def test_the_vae_stage_inside_a_run_leaves_its_random_state_as_it_found_it(tmp_path, monkeypatch):
    """``--vae auto`` trains the VAE stage (which seeds and draws) only in the first run of a split: the UNet
    that run then builds must start from the random state every later run starts from (it used to start from
    the VAE stage's, so a sweep's first cell trained other initial weights than its rerun)."""
    import random
    import types

    import numpy as np
    import torch
    from accelerate.utils import set_seed

    from skipdiff.training import runtime
    from skipdiff.training.options import TrainOptions

    monkeypatch.chdir(tmp_path)
    images = five_images(tmp_path / "images")
    options = TrainOptions(vae="auto", vae_preset="tiny", train_data_dir=str(images), test_fraction=0.4, seed=3)
    monkeypatch.setattr(
        runtime, "auto_vae_options", lambda opts: vae_options(images, runtime.auto_vae_dir(opts), seed=opts.seed)
    )
    accelerator = types.SimpleNamespace(print=lambda *args: None)

    def draws():
        return torch.rand(4).tolist(), float(np.random.rand()), random.random()

    set_seed(options.seed)
    runtime.prepare_encoder(options, accelerator, 1)  # trains the stage
    after_training = draws()
    set_seed(options.seed)
    runtime.prepare_encoder(options, accelerator, 1)  # reuses it
    assert after_training == draws()
    set_seed(options.seed)
    assert after_training == draws()
