"""``train_scripts/train_unet.py`` end to end on tiny runs: outputs, logs, checkpoints, exact resume,
seeding, precision fallback, early errors, the non-finite guard and two data-parallel processes.

Every run is the ``tiny`` UNet (4 long skips) in pixel space on 8x8 digits, batch 16, a few steps
(see ``tests/helpers/unet_runs.py``). Most call ``main(argv)`` in this process; the two
``accelerate launch`` tests run it the way users do, in a subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from helpers.unet_runs import (
    ACCELERATE,
    ACCELERATE_CONFIG,
    EMA_WEIGHTS,
    REPO,
    SCRIPT,
    UNET_WEIGHTS,
    free_port,
    loss_records,
    max_abs_difference,
    run_train_unet,
    stats,
    tensors,
    tiny_args,
    train_unet_module,
)
from safetensors.torch import load_file

from skipdiff import SkipUNet2DModel
from skipdiff.pipeline import SkipDiffPipeline
from skipdiff.training import checkpoints, hub

# One entry per skip of the tiny UNet (decoder order, 0 = innermost): two learned gates, so that the
# logs carry gate telemetry, and two fixed ones.
PER_SKIP = "learned,scale:0.5,learned:init=0.5,keep"
PER_SKIP_RESOLVED = [
    {"mode": "learned"},
    {"mode": "scale", "factor": 0.5},
    {"mode": "learned", "init": 0.5},
    {"mode": "keep"},
]
NUM_SKIPS = 4
SUBPROCESS_TIMEOUT = 420  # seconds; a hang (e.g. ranks waiting on each other) fails instead of blocking


def subprocess_env() -> dict:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def launch(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(ACCELERATE), "launch", *args],
        cwd=cwd,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def no_temporary_folders(output_dir: Path) -> bool:
    return not [p for p in output_dir.rglob("*") if p.name.endswith(".tmp")]


# --------------------------------------------------------------------------------------------------
# One `accelerate launch` run (5 steps, a checkpoint every step, at most 2 kept) inspected by several tests
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def launched_run(tmp_path_factory) -> Path:
    """``accelerate launch --config_file accelerate_config.yaml train_scripts/train_unet.py`` as a user runs it."""
    cwd = tmp_path_factory.mktemp("launched")
    out = cwd / "run"
    args = tiny_args(
        out,
        "--skips",
        PER_SKIP,
        "--max_train_steps",
        "5",
        "--checkpointing_steps",
        "1",
        "--checkpoints_total_limit",
        "2",
    )
    launch(["--config_file", str(ACCELERATE_CONFIG), str(SCRIPT), *args], cwd=cwd)
    assert not (cwd / "runs").exists()  # nothing written outside --output_dir
    return out


@pytest.mark.slow
def test_launched_run_writes_a_pipeline_that_loads_and_samples(launched_run):
    out = launched_run
    for name in (
        "unet/config.json",
        UNET_WEIGHTS,
        "unet_raw/config.json",
        EMA_WEIGHTS,
        "scheduler/scheduler_config.json",
        "model_index.json",
        "training_options.json",
        "stats.jsonl",
        "train_metrics.json",
        "README.md",
    ):
        assert (out / name).is_file(), name
    assert [p.name for p in (out / "samples").glob("*.png")] == ["step-000005.png"]
    assert json.loads((out / "unet/config.json").read_text())["skips"] == PER_SKIP_RESOLVED
    options = json.loads((out / "training_options.json").read_text())
    assert options["skips"] == PER_SKIP and options["max_train_steps"] == 5
    assert json.loads((out / "train_metrics.json").read_text())["steps"] == 5
    assert "| 2 | up_blocks.1.resnets.0 |" in (out / "README.md").read_text()

    pipeline = SkipDiffPipeline.from_pretrained(out)
    assert isinstance(pipeline.unet, SkipUNet2DModel) and pipeline.vae is None
    assert pipeline.unet.skip_router.entries == PER_SKIP_RESOLVED
    images = pipeline(
        batch_size=2,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        sampler="ddim",
        show_progress=False,
    ).images
    assert [(image.size, image.mode) for image in images] == [((8, 8), "L")] * 2
    pixels = pipeline(
        batch_size=2,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        sampler="ddim",
        output_type="pt",
        show_progress=False,
    ).images
    assert pixels.shape == (2, 1, 8, 8) and torch.isfinite(pixels).all()


@pytest.mark.slow
def test_stats_records_hold_what_a_skip_study_needs(launched_run):
    records = stats(launched_run)
    start, steps = records[0], loss_records(launched_run)
    assert start["event"] == "start" and start["step"] == 0 and start["num_processes"] == 1
    assert [s["gate"] for s in start["skips"]] == ["learned", "scale:factor=0.5", "learned:init=0.5", "keep"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5]
    for record in steps:
        assert 0 < record["loss"] < 10
        buckets = record["loss_by_timestep"]
        assert list(buckets) == ["t000-249", "t250-499", "t500-749", "t750-999"]
        assert all(v is None or 0 < v < 10 for v in buckets.values()) and any(v is not None for v in buckets.values())
        blocks = record["grad_norm_by_block"]
        assert {"down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1", "gates"} <= set(blocks)
        assert all(v > 0 for v in blocks.values())
        assert record["grad_norm"] > 0 and record["seconds_per_step"] > 0 and record["nonfinite_total"] == 0
        assert set(record["skip_vs_backbone_norm"]) == {str(i) for i in range(NUM_SKIPS)}
        assert all(v > 0 for v in record["skip_vs_backbone_norm"].values())
        assert set(record["gates"]) == {"skip0/alpha", "skip2/alpha"}  # only the learned gates report a state
    first, last = steps[0]["gates"], steps[-1]["gates"]
    assert first["skip0/alpha"] == pytest.approx(1.0, abs=0.05) and first["skip2/alpha"] == pytest.approx(0.5, abs=0.05)
    assert last != first  # the learned gates are trained and the log follows them


@pytest.mark.slow
def test_checkpoints_are_rotated_under_the_total_limit(launched_run):
    assert [p.name for p in checkpoints.list_checkpoints(launched_run)] == ["checkpoint-4", "checkpoint-5"]
    assert not [
        p
        for p in launched_run.iterdir()
        if p.name.startswith("checkpoint-") and p.name not in ("checkpoint-4", "checkpoint-5")
    ]
    assert no_temporary_folders(launched_run)
    assert checkpoints.read_state(launched_run / "checkpoint-5")["step"] == 5
    assert checkpoints.read_state(launched_run / "checkpoint-4")["step"] == 4
    final = tensors(launched_run / UNET_WEIGHTS)
    assert max_abs_difference(tensors(launched_run / "checkpoint-5" / "model.safetensors"), final) == 0.0
    assert max_abs_difference(tensors(launched_run / "checkpoint-4" / "model.safetensors"), final) > 0


# --------------------------------------------------------------------------------------------------
# Exact resume and seeding
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> Path:
    """6 steps without interruption (EMA on, seed 0)."""
    out = tmp_path_factory.mktemp("straight") / "run"
    run_train_unet(tiny_args(out, "--max_train_steps", "6", "--use_ema", "--seed", "0"))
    return out


@pytest.mark.slow
def test_resume_from_latest_continues_at_the_right_step_and_matches_an_uninterrupted_run(
    straight_run, tmp_path, capsys
):
    out = tmp_path / "interrupted"
    common = ("--use_ema", "--seed", "0", "--checkpointing_steps", "3")
    assert run_train_unet(tiny_args(out, "--max_train_steps", "3", *common))["steps"] == 3
    assert [p.name for p in checkpoints.list_checkpoints(out)] == ["checkpoint-3"]
    capsys.readouterr()

    # Training longer changes the cosine schedule's length: a strict resume needs it named.
    metrics = run_train_unet(
        tiny_args(
            out,
            "--max_train_steps",
            "6",
            "--resume_from_checkpoint",
            "latest",
            "--allow_changed",
            "max_train_steps",
            *common,
        )
    )
    assert f"resumed from {out / 'checkpoint-3'} at step 3" in capsys.readouterr().out
    assert metrics["steps"] == 6
    records = stats(out)
    assert [r.get("event") for r in records if r["step"] == 0] == ["start"]  # the resumed run does not restart the log
    resumed, straight = loss_records(out), loss_records(straight_run)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    # Same batches, noise, timesteps, learning rates and EMA: the same curve and the same weights, bit for bit.
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
    assert [r["lr"] for r in resumed] == [r["lr"] for r in straight]
    assert max_abs_difference(tensors(out / UNET_WEIGHTS), tensors(straight_run / UNET_WEIGHTS)) == 0.0
    assert max_abs_difference(tensors(out / EMA_WEIGHTS), tensors(straight_run / EMA_WEIGHTS)) == 0.0
    # ... and not because the weights never moved.
    assert max_abs_difference(tensors(out / "checkpoint-3" / "model.safetensors"), tensors(out / UNET_WEIGHTS)) > 0


@pytest.mark.slow
def test_a_run_resumed_in_another_process_ends_where_the_uninterrupted_one_did(launched_run, tmp_path):
    """Resume the launched run's step-4 checkpoint here (a new process) and train its last step again."""
    out = tmp_path / "run"
    shutil.copytree(launched_run / "checkpoint-4", out / "checkpoint-4")
    metrics = run_train_unet(
        tiny_args(
            out,
            "--skips",
            PER_SKIP,
            "--max_train_steps",
            "5",
            "--resume_from_checkpoint",
            "latest",
            "--checkpointing_steps",
            "1",
            "--checkpoints_total_limit",
            "2",
        )
    )
    assert metrics["steps"] == 5
    assert [r["step"] for r in stats(out)] == [5]
    assert loss_records(out)[0]["loss"] == loss_records(launched_run)[-1]["loss"]
    assert max_abs_difference(tensors(out / UNET_WEIGHTS), tensors(launched_run / UNET_WEIGHTS)) == 0.0
    assert max_abs_difference(tensors(out / EMA_WEIGHTS), tensors(launched_run / EMA_WEIGHTS)) == 0.0


@pytest.mark.slow
def test_the_same_seed_gives_the_same_loss_curve_and_another_seed_does_not(straight_run, tmp_path):
    run_train_unet(tiny_args(tmp_path / "again", "--max_train_steps", "6", "--use_ema", "--seed", "0"))
    run_train_unet(tiny_args(tmp_path / "other", "--max_train_steps", "6", "--use_ema", "--seed", "1"))
    curve = [r["loss"] for r in loss_records(straight_run)]
    assert [r["loss"] for r in loss_records(tmp_path / "again")] == curve
    assert max_abs_difference(tensors(tmp_path / "again" / UNET_WEIGHTS), tensors(straight_run / UNET_WEIGHTS)) == 0.0
    other = [r["loss"] for r in loss_records(tmp_path / "other")]
    assert len(other) == len(curve) and all(a != b for a, b in zip(other, curve, strict=True))


# --------------------------------------------------------------------------------------------------
# Options: precision fallback, dry run, errors before any work
# --------------------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is a real option on a GPU")
def test_fp16_on_a_cpu_warns_and_trains_in_fp32(tmp_path, monkeypatch):
    module = train_unet_module()
    made = []

    def spy(*groups):
        accelerator = make_accelerator(*groups)
        made.append((accelerator.mixed_precision, accelerator.native_amp))
        return accelerator

    make_accelerator = module.make_accelerator
    monkeypatch.setattr(module, "make_accelerator", spy)
    with pytest.warns(UserWarning, match="fp16 needs a CUDA GPU; training in fp32"):
        metrics = run_train_unet(tiny_args(tmp_path / "run", "--mixed_precision", "fp16", "--max_train_steps", "2"))
    assert made == [("no", False)]  # no autocast, no grad scaler
    assert metrics["steps"] == 2 and 0 < metrics["final_loss"] < 10
    assert {t.dtype for t in tensors(tmp_path / "run" / UNET_WEIGHTS).values() if t.is_floating_point()} == {
        torch.float32
    }
    # The run records what was asked for; the warning says what was done.
    assert json.loads((tmp_path / "run" / "training_options.json").read_text())["mixed_precision"] == "fp16"


def test_dry_run_prints_the_resolved_options_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # --vae auto would train a VAE into ./runs
    out = tmp_path / "run"
    from skipdiff.cli.train_unet import main

    assert main(tiny_args(out, "--dry_run", "--vae", "auto", "--skips", "scalelong:kappa=0.5")) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["dry_run"] is True and printed["skips"] == "scalelong:kappa=0.5" and printed["vae"] == "auto"
    assert printed["max_train_steps"] == 4 and printed["output_dir"] == str(out)
    assert printed["learning_rate"] == 2e-3 and printed["lr_scheduler"] == "cosine"  # defaults, resolved
    assert printed["inject_nonfinite_steps"] == [] and printed["hub_token"] is None
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("skips", "named"), [("scalelog:kappa=0.7", "scalelog"), ("scalelong:kapa=0.7", "kapa")])
def test_dry_run_refuses_what_a_real_run_refuses(tmp_path, monkeypatch, capsys, skips, named):
    """Issue 31: --dry_run checked nothing, so a preset or argument typo passed it and failed 10 s into a run."""
    from skipdiff.cli.train_unet import main

    monkeypatch.chdir(tmp_path)
    assert main(tiny_args(tmp_path / "run", "--dry_run", "--skips", skips)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and named in err
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def empty_folder(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--skips", "bogus"], r"unknown skip mode or preset 'bogus'"),
        (["--skips", "keep,zero,bogus,keep"], r"unknown skip mode 'bogus'"),
        (["--skips", "keep,zero,keep"], r"skip specification has 3 entries but the model has 4 skips"),
        (["--max_train_steps", "-3"], r"--max_train_steps must be >= 1, got -3"),
        (["--resume_from_checkpoint", "{tmp}/nowhere"], r"--resume_from_checkpoint '.*nowhere' does not exist"),
        (["--train_data_dir", "{tmp}/images"], r"train_data_dir '.*images' holds no image files"),
        (
            ["--dataset_name", "skipdiff-tests/no-such-dataset"],
            r"could not load Hub dataset 'skipdiff-tests/no-such-dataset' \(HF_HUB_OFFLINE is set\)",
        ),
    ],
    ids=[
        "unknown-mode",
        "unknown-mode-in-list",
        "list-length",
        "negative-steps",
        "no-checkpoint",
        "empty-folder",
        "hub-dataset-offline",
    ],
)
def test_bad_arguments_fail_before_training_naming_the_value(extra, message, tmp_path, empty_folder, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        run_train_unet(tiny_args(out, *[e.format(tmp=tmp_path) for e in extra]))
    assert not (out / "stats.jsonl").exists() and not checkpoints.list_checkpoints(out)


def test_an_unknown_option_is_refused_by_name(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_train_unet(tiny_args(tmp_path / "run", "--no_such_option", "3"))
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --no_such_option 3" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_training_ends_by_saying_where_the_run_is(tmp_path, capsys):
    out = tmp_path / "run"
    run_train_unet(tiny_args(out, "--max_train_steps", "2"))
    assert f"trained 2 steps: the run is in {out}" in capsys.readouterr().out


def test_an_option_typo_is_one_line_naming_the_closest_option(tmp_path, capsys):
    """Issue 31: a typo printed the whole usage (75 lines) without a suggestion."""
    with pytest.raises(SystemExit):
        run_train_unet(tiny_args(tmp_path / "run", "--learning_rat", "3e-4"))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "(did you mean '--learning_rate'?)" in err[0]


def test_an_unknown_key_in_a_spec_names_the_closest_option():
    from skipdiff.config import from_dict
    from skipdiff.training.options import TrainOptions

    with pytest.raises(ValueError, match=r"unknown option\(s\) \['max_train_step'\].*did you mean 'max_train_steps'"):
        from_dict(TrainOptions, {"max_train_step": 3})


@pytest.mark.slow
def test_resuming_a_checkpoint_of_another_model_names_what_differs(launched_run, tmp_path):
    out = tmp_path / "run"
    checkpoint = launched_run / "checkpoint-5"
    with pytest.raises(ValueError, match=r"was made for another model \(skips: checkpoint \[.*\] vs requested") as info:
        run_train_unet(tiny_args(out, "--skips", "full", "--resume_from_checkpoint", str(checkpoint)))
    assert "block_out_channels" not in str(info.value)  # only the skips differ
    assert not (out / "stats.jsonl").exists()


@pytest.mark.slow
def test_resuming_a_truncated_checkpoint_says_so(launched_run, tmp_path):
    checkpoint = tmp_path / "checkpoint-5"
    shutil.copytree(launched_run / "checkpoint-5", checkpoint)
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"model\.safetensors' are truncated or corrupt"):
        run_train_unet(tiny_args(out, "--skips", PER_SKIP, "--resume_from_checkpoint", str(checkpoint)))
    assert not (out / "stats.jsonl").exists()


def test_push_to_hub_without_a_token_or_network_fails_before_training(tmp_path, monkeypatch):
    def whoami(self, token=None):
        raise OSError("no token, no network")

    monkeypatch.setattr(hub.HfApi, "whoami", whoami)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match=r"cannot push to the Hub repo 'user/test': no valid token or no network"):
        run_train_unet(tiny_args(out, "--push_to_hub", "--hub_model_id", "user/test"))
    assert not (out / "stats.jsonl").exists() and not (out / "training_options.json").exists()


# --------------------------------------------------------------------------------------------------
# Non-finite losses
# --------------------------------------------------------------------------------------------------


def optimizer_steps(checkpoint: Path) -> tuple[int, int]:
    """(AdamW steps, EMA steps) taken up to a checkpoint."""
    adam = torch.load(checkpoint / "optimizer.bin", weights_only=False)["state"][0]["step"]
    ema = torch.load(checkpoint / "custom_checkpoint_0.pkl", weights_only=False)["optimization_step"]
    return int(adam), int(ema)


def test_a_nonfinite_step_is_counted_skipped_and_logged(tmp_path):
    out = tmp_path / "run"
    metrics = run_train_unet(
        tiny_args(
            out,
            "--inject_nonfinite_steps",
            "2",
            "--max_train_steps",
            "4",
            "--use_ema",
            "--checkpointing_steps",
            "1",
            "--checkpoints_total_limit",
            "10",
        )
    )
    assert metrics["steps"] == 4 and metrics["nonfinite_total"] == 1
    events = [r for r in stats(out) if r.get("event") == "nonfinite"]
    assert events == [{"step": 2, "event": "nonfinite", "nonfinite_total": 1, "in_row": 1}]
    records = loss_records(out)
    assert [r["step"] for r in records] == [1, 3, 4]
    assert [r["nonfinite_total"] for r in records] == [0, 1, 1]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    # Neither the optimizer nor the EMA took step 2; training went on after it.
    assert optimizer_steps(out / "checkpoint-1") == (1, 1)
    assert optimizer_steps(out / "checkpoint-3") == (2, 2)
    assert optimizer_steps(out / "checkpoint-4") == (3, 3)
    final = tensors(out / UNET_WEIGHTS)
    assert all(torch.isfinite(t).all() for t in final.values() if t.is_floating_point())
    assert max_abs_difference(tensors(out / "checkpoint-4" / "model.safetensors"), final) == 0.0


def test_a_nonfinite_step_leaves_the_weights_as_they_were(tmp_path):
    out = tmp_path / "run"
    metrics = run_train_unet(
        tiny_args(out, "--inject_nonfinite_steps", "2", "--max_train_steps", "2", "--checkpointing_steps", "1")
    )
    assert metrics["steps"] == 2 and metrics["nonfinite_total"] == 1  # a skipped last step still ends the run
    assert [r["step"] for r in stats(out)] == [0, 1, 2]
    # The run's final weights (after step 2) are those of step 1.
    assert max_abs_difference(tensors(out / "checkpoint-1" / "model.safetensors"), tensors(out / UNET_WEIGHTS)) == 0.0


def test_too_many_nonfinite_steps_in_a_row_stop_the_run_with_its_checkpoint_intact(tmp_path):
    out = tmp_path / "run"
    module = train_unet_module()
    stopped = r"stopping at step 4: 3 non-finite losses or gradients in a row \(last good checkpoint: .*checkpoint-1\)"
    with pytest.raises(module.TrainingStopped, match=stopped):
        run_train_unet(
            tiny_args(
                out,
                "--inject_nonfinite_steps",
                "2",
                "3",
                "4",
                "--max_nonfinite_in_row",
                "3",
                "--checkpointing_steps",
                "1",
                "--max_train_steps",
                "6",
            )
        )
    events = [(r["step"], r["in_row"]) for r in stats(out) if r.get("event") == "nonfinite"]
    assert events == [(2, 1), (3, 2), (4, 3)]
    assert [p.name for p in checkpoints.list_checkpoints(out)] == ["checkpoint-1"] and no_temporary_folders(out)
    assert not (out / "unet").exists()  # stopped: no final export

    checkpoint = out / "checkpoint-1"
    state = checkpoints.read_state(checkpoint)
    assert state["step"] == 1
    checkpoints.check_compatible(checkpoint, state["unet_config"])  # complete and readable
    model = SkipUNet2DModel.from_config(state["unet_config"])
    missing, unexpected = model.load_state_dict(load_file(checkpoint / "model.safetensors"), strict=True)
    assert not missing and not unexpected
    assert all(torch.isfinite(p).all() for p in model.parameters())


# --------------------------------------------------------------------------------------------------
# Two processes (gloo on a CPU)
# --------------------------------------------------------------------------------------------------


# Both two-process tests of Markov skips: the chain learns from step 2 (warmup_steps=1, min_count=1), so it
# changes during the run and the ranks must agree on it; checkpoints at steps 2 and 4.
MARKOV_TWO_PROCESS = [
    "--skips",
    "markov",
    "--markov",
    "warmup_steps=1,min_count=1",
    "--max_train_steps",
    "4",
    "--use_ema",
    "--checkpointing_steps",
    "2",
]


@pytest.fixture(scope="module")
def markov_two_processes(tmp_path_factory) -> Path:
    """One 2-process gloo run of Markov skips (batch 16 each) that also saves every rank's final weights
    (``rank{i}.safetensors``, tests/helpers/train_unet_rank_weights.py); read by the two tests below."""
    cwd = tmp_path_factory.mktemp("two_processes")
    out = cwd / "run"
    dump_ranks = REPO / "tests" / "helpers" / "train_unet_rank_weights.py"
    args = tiny_args(out, *MARKOV_TWO_PROCESS, "--train_batch_size", "16")
    launch(
        [
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(free_port()),
            str(dump_ranks),
            *args,
        ],
        cwd=cwd,
    )
    return out


@pytest.mark.slow
def test_two_processes_train_one_model_and_only_the_main_one_writes(markov_two_processes):
    out = markov_two_processes
    records = stats(out)
    assert records[0]["event"] == "start" and records[0]["num_processes"] == 2
    steps = [r["step"] for r in records]
    assert steps == [0, 1, 2, 3, 4]  # one writer: no record twice
    assert [p.name for p in checkpoints.list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    assert no_temporary_folders(out)
    assert sorted(p.name for p in (out / "checkpoint-4").glob("random_states_*.pkl")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]

    # Both ranks end with the same weights and the same Markov chain, which is the saved one.
    rank0, rank1 = tensors(out / "rank0.safetensors"), tensors(out / "rank1.safetensors")
    saved = tensors(out / UNET_WEIGHTS)
    assert max_abs_difference(rank0, rank1) == 0.0
    assert max_abs_difference(rank0, saved) == 0.0
    chain = {k: v for k, v in saved.items() if k.startswith("skip_router.chain.")}
    assert int(chain["skip_router.chain.num_updates"]) == 4
    # Every link counted the paths of both ranks' examples: 2 processes x 16 examples x 4 steps.
    counts = chain["skip_router.chain.counts"]  # (links, previous state, state)
    assert counts[1:].sum(dim=(1, 2)).tolist() == [2 * 16 * 4] * (NUM_SKIPS - 1)
    assert SkipDiffPipeline.from_pretrained(out).unet.skip_router.chain is not None


@pytest.mark.slow
@pytest.mark.parametrize("skips", ["full", "markov"])
def test_two_processes_match_one_process_with_the_same_global_batch(skips, tmp_path, request):
    """1 process x batch 32 vs 2 gloo processes x batch 16: accelerate gives the ranks the two halves of
    the single process's batch, and every rank draws the global batch's noise, timesteps and gate
    states and keeps its slice, so only float summation order differs. Stated tolerance: 1e-4
    absolute on every weight and on every logged loss (the learning rate is <= 1.6e-4 in these steps)."""
    extra = MARKOV_TWO_PROCESS if skips == "markov" else ["--skips", skips, "--max_train_steps", "4", "--use_ema"]
    single = tmp_path / "single"
    run_train_unet(tiny_args(single, *extra, "--train_batch_size", "32"))
    if skips == "markov":  # the run the test above reads
        double = request.getfixturevalue("markov_two_processes")
    else:
        double = tmp_path / "double"
        launch(
            [
                "--multi_gpu",
                "--num_processes",
                "2",
                "--num_machines",
                "1",
                "--mixed_precision",
                "no",
                "--dynamo_backend",
                "no",
                "--main_process_port",
                str(free_port()),
                str(SCRIPT),
                *tiny_args(double, *extra, "--train_batch_size", "16"),
            ],
            cwd=tmp_path,
        )

    one, two = tensors(single / UNET_WEIGHTS), tensors(double / UNET_WEIGHTS)
    assert max_abs_difference(one, two) <= 1e-4
    assert max_abs_difference(tensors(single / EMA_WEIGHTS), tensors(double / EMA_WEIGHTS)) <= 1e-4
    losses = [[r["loss"] for r in stats(run) if "loss" in r] for run in (single, double)]
    assert len(losses[0]) == len(losses[1]) == 4
    assert max(abs(a - b) for a, b in zip(*losses, strict=True)) <= 1e-4
    if skips == "markov":  # the chain learned from the same 32 examples per step in both runs
        assert int(two["skip_router.chain.num_updates"]) == 4
        assert torch.allclose(one["skip_router.chain.open_prob"], two["skip_router.chain.open_prob"], atol=1e-5)
        assert not torch.equal(
            two["skip_router.chain.open_prob"], torch.full_like(two["skip_router.chain.open_prob"], 0.8)
        )
