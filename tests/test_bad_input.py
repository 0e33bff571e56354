"""Bad input fails at once, as one line naming the problem, with a meaningful exit code.

``PROBE`` is the table of the fault probe's bad inputs: (command, arguments, exit code, words the one-line
message must hold). The next bad input is one line to add. Exit codes: 2 for option errors found while
parsing (argparse's convention), 1 for errors found once the command looks at data, models or folders.
Every case runs the command line's ``main`` in this process; the message must be a single ``error:`` line
on stderr, no traceback.
"""

from __future__ import annotations

import importlib
import json

import pytest
from diffusers import AutoencoderKL
from helpers.unet_runs import run_train_unet, tiny_args

from skipdiff.presets import vae_config

TINY = " ".join(tiny_args("{tmp}/run"))

PROBE = [
    # (command, arguments, exit code, words in the message)
    ("train_unet", TINY + " --skips bogus", 1, "unknown skip mode or preset 'bogus'"),
    ("train_unet", TINY + " --skips scale:١", 1, "scale factor must be a number, got '١'"),
    ("train_unet", TINY + " --skips scale:1_0", 1, "scale factor must be a number, got '1_0'"),
    ("train_unet", TINY + " --skips markov --markov cost=nan", 1, "markov cost must be a number"),
    ("train_unet", TINY + " --markov p_init=0.5", 2, "only used by markov skips"),
    ("train_unet", TINY + " --learning_rate ١", 2, "not a number: '١'"),
    ("train_unet", TINY + " --max_train_steps 1_0", 2, "not an integer: '1_0'"),
    ("train_unet", TINY + " --model {tmp}/list.json", 1, "must hold a JSON object, got list"),
    ("train_unet", TINY + " --model {tmp}/unknown-key.json", 1, "unexpected key(s) ['bogus_key']"),
    ("train_unet", TINY + " --model {tmp}/truncated.json", 1, "truncated.json' is not valid JSON"),
    ("train_unet", TINY + " --resolution 7", 1, "--resolution 7 gives 7x7 pixels"),
    ("train_unet", TINY + " --output_dir {tmp}/a-file/run", 1, "a-file/run' is not writable"),
    ("train_unet", TINY + " --resume_from_checkpoint {tmp}/nowhere", 1, "does not exist"),
    ("train_unet", TINY + " --push_to_hub", 2, "--push_to_hub needs --hub_model_id"),
    ("train_unet", TINY + " --allow_changed bogus", 2, "--allow_changed names unknown option(s) ['bogus']"),
    ("train_unet", TINY + " --image_channels 2", 2, "--image_channels must be 1 or 3, got 2"),
    ("train_unet", TINY + " --ema_max_decay 1.5", 2, "--ema_max_decay must lie in [0, 1), got 1.5"),
    ("train_unet", TINY + " --noise_offset -1", 2, "--noise_offset must be a finite number >= 0, got -1.0"),
    ("train_vae", "--output_dir {tmp}/a-file/vae", 1, "a-file/vae' is not writable"),
    ("train_vae", "--resolution 15", 2, "--resolution 15 is not a multiple of the VAE's downscaling 2"),
    ("train_vae", "--max_train_steps 0", 2, "--max_train_steps must be >= 1, got 0"),
    ("train_classifier", "--dataset wine --model skipresnet", 2, "takes image data, but dataset 'wine' is tabular"),
    ("train_classifier", "--widths 0", 2, "--widths must be one or more integers >= 1"),
    ("train_classifier", "--dataset nope", 2, "unknown dataset 'nope'"),
    ("train_classifier", "--gating bernoulli --markov warmup_steps=1", 2, "only used with --gating markov"),
    ("sweep", "{tmp}/malformed.yaml", 2, "malformed.yaml' is not valid YAML at line 3"),
    ("sweep", "{tmp}/list.json --out {tmp}/a-file", 2, "--out '{tmp}/a-file' is a file, not a folder"),
    ("report", "{tmp} --out {tmp}/a-file", 2, "--out '{tmp}/a-file' is a file, not a folder"),
    ("report", "{tmp}/nowhere", 2, "sweep folder '{tmp}/nowhere' does not exist"),
    ("eval", "--checkpoint {tmp} --denoise_loss --spike_k -1", 2, "--spike_k must be a positive finite number"),
    ("eval", "--checkpoint {tmp} --denoise_loss --out {tmp}/a-file", 2, "--out '{tmp}/a-file' is a file, not a folder"),
    ("eval", "--checkpoint {tmp}/nowhere --denoise_loss", 2, "nowhere"),
]

# The command lines of the package's __main__ modules (their cli() returns the exit code).
MODULES = {"sweep": "skipdiff.sweep.__main__", "report": "skipdiff.report.__main__", "eval": "skipdiff.eval.__main__"}


@pytest.fixture
def probe_files(tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "unknown-key.json").write_text(json.dumps({"block_out_channels": [8, 16], "bogus_key": 1}))
    (tmp_path / "truncated.json").write_text('{"block_out_channels": [8,')
    (tmp_path / "malformed.yaml").write_text("kind: diffusion\ngrid: [\n  - a: [1,\n")
    return tmp_path


@pytest.mark.parametrize(
    ("command", "arguments", "code", "words"), PROBE, ids=[f"{c}:{' '.join(a.split()[-2:])}" for c, a, _, _ in PROBE]
)
def test_probe(command, arguments, code, words, probe_files, capsys):
    argv = arguments.format(tmp=probe_files).split()
    words = words.format(tmp=probe_files)
    if command in MODULES:
        main = importlib.import_module(MODULES[command]).cli
    else:
        main = importlib.import_module(f"skipdiff.cli.{command}").main
    try:
        returned = main(argv)
    except SystemExit as exit_:  # argparse's own usage errors
        returned = exit_.code
    err = capsys.readouterr().err.strip().splitlines()
    assert returned == code, err
    assert "Traceback" not in "\n".join(err)
    assert words in err[-1], err
    if code == 1:
        assert len(err) == 1 and err[0].startswith("error: "), err  # one line


def test_an_output_folder_that_cannot_be_written_fails_before_any_work(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError, match=r"output_dir .*a-file/run.* is not writable"):
        run_train_unet(tiny_args(blocker / "run"))


def test_images_with_the_wrong_number_of_channels_for_the_vae_are_refused(tmp_path):
    AutoencoderKL(**vae_config("tiny", 3)).save_pretrained(tmp_path / "rgb-vae")  # digits are grey
    with pytest.raises(ValueError, match="takes 3-channel images but the dataset has 1 channels"):
        run_train_unet(tiny_args(tmp_path / "run", "--vae", str(tmp_path / "rgb-vae")))
    assert not (tmp_path / "run" / "unet").exists()
