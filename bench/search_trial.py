"""Seconds of one training trial and one inference trial of ``python -m skipdiff.search`` on this machine
(digits in pixel space, the CPU preset's 300 steps; then the trained trial searched at inference), so a
GPU session measures what a trial costs there. Prints JSON.

    python bench/search_trial.py                # bench/gpu.sh runs it after the throughput bench
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

TRAINING = {
    "kind": "training",
    "base": {
        "vae": "none",
        "model": "digits",
        "max_train_steps": 300,
        "validation_every": 0,
        "num_validation_images": 4,
        "checkpointing_steps": 100,
    },
    "space": {"skips": ["full"]},
    "objectives": ["denoise_mse"],
    "budget": {"trials": 1},
    "eval": {"denoise_loss": True, "grad_stability": False},
}


def timed_search(spec: dict, folder: Path, name: str) -> float:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "skipdiff.search", str(path), "--out", str(folder / name)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - start


def main() -> None:
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        training = timed_search(TRAINING, folder, "training")
        trained = folder / "training" / "trials" / "trial-0000"
        inference = {
            "kind": "inference",
            "base": {
                "checkpoint": str(trained),
                "num_samples": 500,
                "seeds": [0, 1],
                "steps": 20,
                "sample_batch_size": 500,
            },
            "space": {"skips": ["scalelong"], "scalelong.kappa": {"low": 0.7, "high": 1.0}},
            "objectives": ["fid_minus_floor", "sampling_seconds"],
            "budget": {"trials": 1},
        }
        seconds = timed_search(inference, folder, "inference")
        record = json.loads((trained / "trial.json").read_text())
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print(
        json.dumps(
            {
                "device": device,
                "training_trial_seconds_with_startup": training,
                "training_trial_seconds": record["seconds"],
                "inference_trial_seconds_with_startup": seconds,
                "steps": TRAINING["base"]["max_train_steps"],
                "note": "digits 16x16 pixel space, UNet preset digits, batch 128",
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
