"""Nothing a user already has is lost or silently wrong: run folders, image data, resume, interruptions.

Each test is a regression test for one finding of the fault probe (issue "Nothing a user already has is
ever lost or silently wrong"); each failed on the code before the fix.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers.unet_runs import EMA_WEIGHTS, REPO, run_train_unet, stats, tiny_args
from PIL import Image

from skipdiff.data import dataset_channels, load_image_splits, to_mode
from skipdiff.data_options import DataOptions
from skipdiff.runfolder import LOCK_FILE, RunLock, RunLockedError
from skipdiff.training import checkpoints

# --------------------------------------------------------------------------------------------------
# Run folders
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    run_train_unet(tiny_args(out, "--max_train_steps", "4", "--checkpointing_steps", "2"))
    (out / "eval").mkdir()
    (out / "eval" / "eval.json").write_text("{}")
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_training_into_a_folder_that_holds_a_run_refuses_and_changes_nothing(finished_run):
    before = snapshot(finished_run)
    refusal = r"holds another run .*--resume_from_checkpoint latest.*--overwrite_output_dir.*--output_dir"
    with pytest.raises(ValueError, match=refusal) as info:
        run_train_unet(tiny_args(finished_run, "--max_train_steps", "2"))
    assert str(finished_run) in str(info.value)
    assert snapshot(finished_run) == before


def test_overwriting_starts_from_an_empty_folder(finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    run_train_unet(tiny_args(out, "--max_train_steps", "1", "--overwrite_output_dir", "--checkpointing_steps", "0"))
    assert not (out / "eval").exists() and not checkpoints.list_checkpoints(out)  # nothing stale survives
    assert [r["step"] for r in stats(out)] == [0, 1]
    assert not (out / LOCK_FILE).exists()  # released


def test_a_live_lock_refuses_a_second_training_and_a_stale_one_is_replaced(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK_FILE).write_text(f'{{"pid": {sleeper.pid}, "host": "{socket.gethostname()}", "started": 0}}')
        with pytest.raises(RunLockedError, match=rf"in use by another training process \(pid {sleeper.pid}"):
            run_train_unet(tiny_args(out, "--max_train_steps", "1"))
        assert not (out / "stats.jsonl").exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    # The owner is gone: its lock is stale and the next run takes it over.
    assert RunLock._is_stale(RunLock(out).owner())
    assert run_train_unet(tiny_args(out, "--max_train_steps", "1"))["steps"] == 1
    assert not (out / LOCK_FILE).exists()


def test_the_lock_is_exclusive_between_two_holders(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunLockedError):
            RunLock(tmp_path).acquire()
    RunLock(tmp_path).acquire().release()  # free again


# --------------------------------------------------------------------------------------------------
# Image data
# --------------------------------------------------------------------------------------------------


def write_images(folder: Path, images: dict[str, Image.Image]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, image in images.items():
        image.save(folder / name)
    return folder


def test_a_three_image_folder_refuses_a_large_batch_at_once_and_trains_with_a_small_one(tmp_path):
    rng = np.random.default_rng(0)
    folder = write_images(
        tmp_path / "three", {f"{i}.png": Image.fromarray(rng.integers(0, 255, (8, 8), np.uint8)) for i in range(3)}
    )
    start = time.perf_counter()
    with pytest.raises(ValueError, match="fewer than --train_batch_size 16"):
        run_train_unet(tiny_args(tmp_path / "big", "--train_data_dir", str(folder), "--test_fraction", "0.3"))
    metrics = run_train_unet(
        tiny_args(
            tmp_path / "small",
            "--train_data_dir",
            str(folder),
            "--test_fraction",
            "0.3",
            "--train_batch_size",
            "2",
            "--max_train_steps",
            "2",
        )
    )
    assert metrics["steps"] == 2 and time.perf_counter() - start < 60


def test_the_vae_stage_never_spins_on_a_split_smaller_than_its_batch(tmp_path):
    from skipdiff.training.vae import train_vae
    from skipdiff.training.vae_options import VaeOptions

    rng = np.random.default_rng(0)
    folder = write_images(
        tmp_path / "five", {f"{i}.png": Image.fromarray(rng.integers(0, 255, (16, 16), np.uint8)) for i in range(5)}
    )
    options = VaeOptions(
        train_data_dir=str(folder),
        test_fraction=0.4,
        preset="tiny",
        train_batch_size=5000,
        max_train_steps=3,
        output_dir=str(tmp_path / "vae"),
    )
    metrics = train_vae(options)  # a batch of the whole 3-image split
    assert metrics["test_mse"] > 0 and (tmp_path / "vae" / "config.json").is_file()
    twenty = VaeOptions(**{**options.__dict__, "max_train_steps": 20, "output_dir": str(tmp_path / "vae20")})
    assert train_vae(twenty)["test_mse"] > 0  # a schedule of 20 steps (ZeroDivisionError before)


def test_image_modes_follow_one_rule_and_the_channel_count_reads_every_image(tmp_path):
    grey16 = Image.fromarray(np.full((8, 8), 32768, np.uint16))  # mode I;16: half the 16-bit range
    assert grey16.mode.startswith("I;16")
    assert np.asarray(to_mode(grey16, 1)).max() == 128  # scaled, not clipped to 255
    rgba = Image.new("RGBA", (8, 8), (200, 100, 50, 0))  # fully transparent
    assert np.asarray(to_mode(rgba, 3)).max() == 0  # composited onto black
    palette = Image.new("P", (8, 8))
    palette.putpalette([10, 20, 30] * 256)
    assert np.asarray(to_mode(palette, 3))[0, 0].tolist() == [10, 20, 30]

    mixed = write_images(
        tmp_path / "mixed",
        {
            "a.png": grey16,
            "b.png": Image.new("L", (8, 8), 50),
            "c.png": Image.new("LA", (8, 8), (80, 255)),
            "d.png": rgba,
            "e.png": palette,
            "f.png": Image.new("RGB", (8, 8), (1, 2, 3)),
        },
    )
    grey = write_images(
        tmp_path / "grey",
        {"a.png": grey16, "b.png": Image.new("L", (8, 8), 50), "c.png": Image.new("LA", (8, 8), (80, 255))},
    )
    for seed in range(4):  # the channel count no longer depends on which image the split puts first
        splits = load_image_splits(DataOptions(train_data_dir=str(mixed), split_seed=seed, test_fraction=0.34))
        assert dataset_channels(splits) == 3
    splits = load_image_splits(DataOptions(train_data_dir=str(grey), test_fraction=0.34))
    assert dataset_channels(splits) == 1 and dataset_channels(splits, requested=3) == 3


# --------------------------------------------------------------------------------------------------
# Strict resume
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def checkpointed(tmp_path) -> Path:
    out = tmp_path / "run"
    run_train_unet(tiny_args(out, "--max_train_steps", "2", "--checkpointing_steps", "2"))
    return out


def resume(out: Path, *extra: str) -> dict:
    return run_train_unet(
        tiny_args(
            out, "--max_train_steps", "2", "--checkpointing_steps", "2", "--resume_from_checkpoint", "latest", *extra
        )
    )


@pytest.mark.slow
def test_resume_refuses_changed_options_unless_they_are_named(checkpointed):
    with pytest.raises(
        ValueError,
        match=r"other options \(learning_rate: checkpoint 0.002 vs now 0.001; "
        r"prediction_type: checkpoint 'v_prediction' vs now 'sample'\)",
    ):
        resume(checkpointed, "--learning_rate", "1e-3", "--prediction_type", "sample")
    assert resume(checkpointed, "--log_every", "2")["steps"] == 2  # logging is not training: free to change
    assert resume(checkpointed, "--learning_rate", "1e-3", "--allow_changed", "learning_rate")["steps"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("name", ["random_states_0.pkl", "optimizer.bin", "custom_checkpoint_0.pkl", "scheduler.bin"])
def test_a_truncated_or_missing_state_file_is_named(checkpointed, name):
    path = checkpointed / "checkpoint-2" / name
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)])
    with pytest.raises(ValueError, match=rf"{name}' is truncated or corrupt"):
        resume(checkpointed)
    path.unlink()
    with pytest.raises(ValueError, match=rf"lacks {name}"):
        resume(checkpointed)


@pytest.mark.slow
def test_latest_without_a_state_file_is_a_clear_error(checkpointed):
    (checkpointed / "checkpoint-2" / checkpoints.STATE_FILE).unlink()
    with pytest.raises(ValueError, match=r"the latest checkpoint .*checkpoint-2' has no skipdiff_state.json"):
        resume(checkpointed)


def test_a_failed_checkpoint_write_leaves_no_temporary_folder(tmp_path, monkeypatch):
    def disk_full(folder):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints, "_fsync_tree", disk_full)
    out = tmp_path / "run"
    with pytest.raises(
        OSError, match=r"could not write checkpoint .*checkpoint-1.*No space left.*earlier checkpoints are intact"
    ):
        run_train_unet(tiny_args(out, "--max_train_steps", "2", "--checkpointing_steps", "1"))
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


# --------------------------------------------------------------------------------------------------
# Late failures made early
# --------------------------------------------------------------------------------------------------


def test_a_resolution_the_models_cannot_halve_fails_before_the_vae_stage(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"--resolution 12 gives 6x6 latents, which the UNet's 2 downsamplings"):
        run_train_unet(["--resolution", "12", "--output_dir", str(tmp_path / "run"), "--num_threads", "1"])
    assert not (tmp_path / "runs").exists()  # no VAE stage ran
    with pytest.raises(ValueError, match=r"--resolution 7 gives 7x7 pixels"):
        run_train_unet(tiny_args(tmp_path / "pixel", "--resolution", "7"))


def test_an_unwritable_vae_folder_fails_before_training(tmp_path):
    from skipdiff.training.vae import train_vae
    from skipdiff.training.vae_options import VaeOptions

    blocker = tmp_path / "file"
    blocker.write_text("x")
    start = time.perf_counter()
    with pytest.raises(OSError, match="is not writable"):
        train_vae(VaeOptions(output_dir=str(blocker / "vae"), max_train_steps=400))
    assert time.perf_counter() - start < 10


@pytest.mark.slow
def test_ctrl_c_stops_after_a_step_with_a_checkpoint_and_the_resume_command(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        str(REPO / "train_scripts" / "train_unet.py"),
        *tiny_args(out, "--max_train_steps", "100000", "--checkpointing_steps", "0"),
    ]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (out / "stats.jsonl").is_file() or len(stats_lines(out)) < 3:
        time.sleep(0.2)
        assert process.poll() is None, process.communicate()
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-2000:]
    assert "Resume with:" in err and "--resume_from_checkpoint latest" in err and "Traceback" not in err
    saved = checkpoints.list_checkpoints(out)
    assert len(saved) == 1 and checkpoints.read_state(saved[0])["step"] >= 2
    assert not (out / LOCK_FILE).exists() and not (out / EMA_WEIGHTS).exists()


def stats_lines(out: Path) -> list[str]:
    path = out / "stats.jsonl"
    return path.read_text().splitlines() if path.is_file() else []
