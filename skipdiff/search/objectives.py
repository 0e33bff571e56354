"""What a search can optimise, each with its direction and where its value comes from.

Quality comes from the trial's ``eval.json`` (written by :mod:`skipdiff.eval`, the same numbers a sweep
cell reports); compute (FLOPs of one UNet forward, parameters) from the trial's model, which is known
before any training, so it can also be a constraint of a pruned single-objective study.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable


@dataclasses.dataclass(frozen=True)
class Objective:
    """One optimisable quantity: its direction, the evaluation options it needs, and how to read it."""

    direction: str  # "minimize" or "maximize"
    needs: dict  # skipdiff.eval options that compute it
    read: Callable[[dict], float]  # eval.json -> value (compute objectives read the model record instead)
    training_only: bool = False
    from_model: bool = False  # known from the model alone (before training)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _fid_minus_floor(evaluation: dict) -> float:
    """Mean over sampling seeds of FID minus the real-vs-real floor at the same N (the estimator's bias)."""
    return _mean([row["fid"] - row["floor_fid"] for row in evaluation["fid"]["per_seed"]])


def _sampling_seconds(evaluation: dict) -> float:
    """Seconds per sampled image (the FID samples, all seeds)."""
    fid = evaluation["fid"]
    return _mean([row["sample_seconds"] for row in fid["per_seed"]]) / fid["num_samples"]


def _kid(evaluation: dict) -> float:
    return _mean([row["kid_mean"] for row in evaluation["fid"]["per_seed"]])


def _clip(evaluation: dict) -> float:
    return float(evaluation["clip_score"]["summary"]["clip_score"]["mean"])


OBJECTIVES: dict[str, Objective] = {
    "denoise_mse": Objective("minimize", {"denoise_loss": True}, lambda e: float(e["denoise"]["mean"])),
    "fid_minus_floor": Objective("minimize", {"fid": True}, _fid_minus_floor),
    "fid": Objective("minimize", {"fid": True}, lambda e: _mean([r["fid"] for r in e["fid"]["per_seed"]])),
    "kid": Objective("minimize", {"fid": True, "kid": True}, _kid),
    "clip_score": Objective("maximize", {"clip_score": True}, _clip),
    "sampling_seconds": Objective("minimize", {"fid": True}, _sampling_seconds),
    "flops": Objective("minimize", {}, lambda m: float(m["flops"]), training_only=True, from_model=True),
    "parameters": Objective("minimize", {}, lambda m: float(m["parameters"]), training_only=True, from_model=True),
}


def needed_eval(objectives) -> dict:
    """The evaluation options that compute every objective (merged)."""
    needs: dict = {}
    for name in objectives:
        needs.update(OBJECTIVES[name].needs)
    return needs


def model_record(unet, sample_shape: tuple[int, ...]) -> dict:
    """``{"flops", "parameters"}`` of ``unet`` for one sample of shape ``(C, H, W)``."""
    # heavy: torch (eval.compute) only when a model is measured: the search command line stays torch-free
    from ..eval.compute import forward_flops

    return {"flops": forward_flops(unet, sample_shape), "parameters": sum(p.numel() for p in unet.parameters())}


def read_objectives(names, evaluation: dict, model: dict) -> list[float]:
    """The values of ``names`` from ``eval.json`` and the model record, in order."""
    return [OBJECTIVES[n].read(model if OBJECTIVES[n].from_model else evaluation) for n in names]
