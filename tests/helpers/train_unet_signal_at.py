"""``train_scripts/train_unet.py`` that sends a signal itself at a chosen step: a deterministic preemption.

    SKIPDIFF_TEST_SIGNAL=3:SIGTERM:self   python tests/helpers/train_unet_signal_at.py <train_unet args>
    SKIPDIFF_TEST_SIGNAL=2:SIGTERM:parent accelerate launch --multi_gpu --num_processes 2 tests/helpers/... <args>

After optimizer step ``N`` (on rank 0 only), ``self`` signals this process, as a scheduler would, and
``parent`` signals the launcher (``accelerate launch``'s elastic agent), which forwards the signal to
every worker, as it does when a scheduler stops the job. ``SKIPDIFF_TEST_STEP_SECONDS`` adds a sleep
after every step (numerics unchanged), so the run cannot finish before a forwarded signal arrives. The
loop's code is unchanged: its ``_micro_step`` (skipdiff.training.unet_trainer) is wrapped.
"""

from __future__ import annotations

import os
import signal
import time

from skipdiff.training import unet_trainer as module

step_at, name, target = os.environ["SKIPDIFF_TEST_SIGNAL"].split(":")
pause = float(os.environ.get("SKIPDIFF_TEST_STEP_SECONDS", "0"))
micro_step = module._micro_step


def micro_step_then_signal(run, batch, logging_step):
    done = micro_step(run, batch, logging_step)
    if done is not None:  # an optimizer step: run.step + 1 is its number
        if run.step + 1 == int(step_at) and run.accelerator.process_index == 0:
            os.kill(os.getpid() if target == "self" else os.getppid(), getattr(signal, name))
        time.sleep(pause)
    return done


module._micro_step = micro_step_then_signal

if __name__ == "__main__":
    import sys

    from skipdiff.cli.train_unet import main  # the command line, running the patched loop

    sys.exit(main())
