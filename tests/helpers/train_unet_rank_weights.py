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


def export_after_saving_rank_weights(accelerator, unet, ema, scheduler, encoder, options_json, output_dir, *rest):
    state = {k: v.detach().cpu().contiguous().clone() for k, v in accelerator.unwrap_model(unet).state_dict().items()}
    save_file(state, str(Path(output_dir) / f"rank{accelerator.process_index}.safetensors"))
    return export(accelerator, unet, ema, scheduler, encoder, options_json, output_dir, *rest)


module._export = export_after_saving_rank_weights

if __name__ == "__main__":
    module.main()
