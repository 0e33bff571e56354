"""A Hub token is hidden by one function, ``skipdiff.config.redact``, wherever options are shown or written:
``--dry_run``, ``training_options.json``, checkpoints, the tracker's config, the model card, a sweep's
``cell.json`` and the ``accelerate launch`` command line it prints. (tests/test_hub.py checks that no file
of a pushed run, uploaded or not, holds the token.)"""

from __future__ import annotations

import dataclasses
import json

import pytest
from helpers.unet_runs import tiny_args

from skipdiff.config import REDACTED, SECRET_OPTIONS, redact
from skipdiff.training.options import TrainOptions

TOKEN = "hf_fake_token_for_tests_1234567890"


def test_redact_hides_every_secret_of_options_a_dict_and_a_command_line():
    options = TrainOptions(hub_token=TOKEN, output_dir="out")
    assert redact(options).hub_token is None
    assert redact(options, REDACTED).hub_token == REDACTED
    assert redact(TrainOptions(), REDACTED).hub_token is None  # no token given: none shown either
    assert options.hub_token == TOKEN  # the options themselves keep it (the push needs it)
    assert dataclasses.replace(redact(options), hub_token=TOKEN) == options  # nothing else changed

    values = vars(options)
    assert redact(values) == {k: v for k, v in values.items() if k != "hub_token"} and "hub_token" in values
    argv = ["--model", "tiny", "--hub_token", TOKEN, f"--hub_token={TOKEN}", "--output_dir=out"]
    assert redact(argv) == ["--model", "tiny", "--hub_token", REDACTED, f"--hub_token={REDACTED}", "--output_dir=out"]
    assert redact(tuple(argv)) == redact(argv) and argv[3] == TOKEN
    assert SECRET_OPTIONS <= {f.name for f in dataclasses.fields(TrainOptions)}
    with pytest.raises(TypeError, match="got str"):
        redact(TOKEN)


def test_dry_run_shows_that_a_token_was_given_but_not_the_token(tmp_path, monkeypatch, capsys):
    from skipdiff.cli.train_unet import main  # skipdiff-train-unet / train_scripts/train_unet.py: the one command line

    monkeypatch.chdir(tmp_path)
    argv = [*tiny_args(tmp_path / "run"), "--hub_token", TOKEN, "--dry_run"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert TOKEN not in printed and json.loads(printed)["hub_token"] == REDACTED
    assert not (tmp_path / "run").exists()


def test_a_sweep_cell_records_and_prints_its_options_without_the_token(tmp_path, monkeypatch, capsys):
    from skipdiff import sweep
    from skipdiff.sweep import launch

    base = dict(model="tiny", vae="none", resolution=8, max_train_steps=2, report_to="none", hub_token=TOKEN)
    spec = sweep.parse_spec({"kind": "diffusion", "base": base, "grid": {"seed": [0]}}, "secret")

    def stopped(kind, options, launcher):  # the cell is recorded before its training starts
        assert options["hub_token"] == TOKEN  # the training itself still gets it
        raise RuntimeError("stopped before training")

    train_cell = launch.train_cell
    monkeypatch.setattr(launch, "train_cell", stopped)
    for _ in range(2):  # the relaunch compares its options with the record's: no "run with other options"
        with pytest.raises(sweep.SweepError, match="1 cell"):
            sweep.run_sweep(spec, tmp_path / "out", log=lambda line: None)
    record = (tmp_path / "out" / "seed-0" / "cell.json").read_text()
    assert TOKEN not in record and "hub_token" not in json.loads(record)["options"]
    assert TOKEN not in (tmp_path / "out" / "sweep.json").read_text()  # the spec as recorded, too
    lines = []
    sweep.run_sweep(spec, tmp_path / "out", dry_run=True, log=lines.append)
    assert TOKEN not in "\n".join(lines)  # nor the --dry_run plan

    class FailedProcess:
        def __init__(self, command):
            assert f"--hub_token={TOKEN}" in command  # the launched training gets the token
            self.returncode = 1

        def wait(self):
            return 1

    monkeypatch.setattr(launch.subprocess, "Popen", FailedProcess)
    cell = sweep.expand_cells(spec, tmp_path / "out")[0]
    with pytest.raises(RuntimeError, match=r"exited with status 1: .*--hub_token=<redacted>") as failure:
        train_cell(sweep.get_kind("diffusion"), cell.options, launch.Launcher("accelerate"))
    printed = capsys.readouterr().out
    assert "--hub_token=<redacted>" in printed and TOKEN not in printed + str(failure.value)


def test_a_search_records_its_spec_and_trials_without_the_token(tmp_path):
    import yaml

    from skipdiff.search.__main__ import cli

    base = dict(
        model="tiny",
        vae="none",
        resolution=8,
        max_train_steps=2,
        train_batch_size=16,
        log_every=1,
        validation_every=0,
        num_validation_images=4,
        validation_inference_steps=2,
        checkpointing_steps=2,
        report_to="none",
        hub_token=TOKEN,
    )
    spec = {
        "kind": "training",
        "base": base,
        "space": {"skips": ["full", "none"]},
        "objectives": ["denoise_mse"],
        "budget": {"trials": 1},
        "eval": {"denoise_loss": True, "grad_stability": False, "buckets": 2},
    }
    path = tmp_path / "secret.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert cli([str(path), "--out", str(tmp_path / "out"), "--no_confirm", "--num_threads", "1"]) == 0
    written = [p for p in (tmp_path / "out").rglob("*.json")]
    assert any(p.name == "trial.json" for p in written) and any(p.name == "search.json" for p in written)
    assert not [p for p in written if TOKEN in p.read_text()]
