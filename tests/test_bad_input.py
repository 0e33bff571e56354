"""Bad input fails at once with a message naming the problem (issue: "Hold up under faults")."""

import pytest
from diffusers import AutoencoderKL
from helpers.unet_runs import run_train_unet, tiny_args

from skipdiff.presets import vae_config


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
