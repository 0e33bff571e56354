"""``train_scripts/train_unet.py`` with one addition: every rank saves the weights it ends with.

    accelerate launch --multi_gpu --num_processes 2 tests/helpers/train_unet_rank_weights.py <train_unet args>

writes ``rank{i}.safetensors`` (the unwrapped UNet's state dict on rank ``i`` when training ends)
into ``--output_dir``, so a test can check that data-parallel ranks agree. The script's own code is
unchanged: the loop's ``_export`` (skipdiff.training.unet_trainer), which every rank calls once
training is over, is wrapped.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file

from skipdiff.training import unet_trainer as module

export = module._export


def export_after_saving_rank_weights(run, card):
    state = {k: v.detach().cpu().contiguous().clone() for k, v in run.model.state_dict().items()}
    save_file(state, str(Path(run.output_dir) / f"rank{run.accelerator.process_index}.safetensors"))
    return export(run, card)


module._export = export_after_saving_rank_weights

if __name__ == "__main__":
    import sys

    from skipdiff.cli.train_unet import main  # the command line, running the patched loop

    sys.exit(main())
