"""An exponential moving average of the weights whose update never waits for the device.

Same schedule as diffusers' ``EMAModel(use_ema_warmup=True)``, the one its training examples use::

    t = (number of counted updates) - 1
    decay_t = clip(1 - (1 + t / inv_gamma) ** -power, min_decay, max_decay)       (0 at the first update)
    shadow <- shadow - (1 - decay_t) * (shadow - weights)

Unlike ``EMAModel``, the step counter lives on the device and every update takes a ``counted`` flag
(a 0-d bool tensor): an update whose step was skipped (non-finite loss or gradient) leaves the shadow
weights and the counter unchanged without the host ever reading the flag.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


class WeightEMA:
    """EMA of the trainable parameters of a model (frozen ones are the model's own)."""

    def __init__(
        self,
        parameters: Iterable[nn.Parameter],
        max_decay: float = 0.999,
        min_decay: float = 0.0,
        inv_gamma: float = 1.0,
        power: float = 0.75,
    ):
        self.parameters = [p for p in parameters if p.requires_grad]
        self.shadow = [p.detach().clone() for p in self.parameters]
        self.max_decay, self.min_decay, self.inv_gamma, self.power = max_decay, min_decay, inv_gamma, power
        device = self.shadow[0].device if self.shadow else torch.device("cpu")
        self.optimization_step = torch.zeros((), dtype=torch.long, device=device)

    def decay(self) -> torch.Tensor:
        """decay_t for the current counter, a float64 0-d tensor on the device (0 before the second update)."""
        t = (self.optimization_step - 1).clamp_min(0).double()
        value = 1.0 - (1.0 + t / self.inv_gamma) ** -self.power
        value = value.clamp(max=self.max_decay).clamp(min=self.min_decay)
        return torch.where(t > 0, value, torch.zeros_like(value))

    @torch.no_grad()
    def step(self, counted: torch.Tensor | None = None) -> None:
        """One update from the model's current weights; ``counted=False`` makes it a no-op, on the device."""
        if not self.shadow:
            return
        flag = torch.ones((), dtype=torch.bool, device=self.optimization_step.device) if counted is None else counted
        self.optimization_step += flag.to(self.optimization_step.device).long()
        rate = ((1.0 - self.decay()) * flag.double()).float()  # 1 - decay_t, or 0 for a skipped step
        rate = rate.to(self.shadow[0].device)
        move_towards = lerp_per_tensor if rate.device.type == "cpu" else lerp_multi_tensor
        move_towards(self.shadow, self.parameters, rate)

    @torch.no_grad()
    def copy_to(self, parameters: Iterable[nn.Parameter]) -> None:
        """Write the shadow weights into ``parameters`` (the trainable ones, in the same order)."""
        targets = [p for p in parameters if p.requires_grad]
        if len(targets) != len(self.shadow):
            raise ValueError(f"the EMA holds {len(self.shadow)} tensors, the model has {len(targets)} trainable ones")
        for target, shadow in zip(targets, self.shadow, strict=True):
            target.copy_(shadow)

    def to(self, device) -> WeightEMA:
        self.shadow = [s.to(device) for s in self.shadow]
        self.optimization_step = self.optimization_step.to(device)
        return self

    def state_dict(self) -> dict:
        return {
            "optimization_step": self.optimization_step,
            "shadow_params": self.shadow,
            "max_decay": self.max_decay,
            "min_decay": self.min_decay,
            "inv_gamma": self.inv_gamma,
            "power": self.power,
        }

    def load_state_dict(self, state: dict) -> None:
        shadow = state["shadow_params"]
        if len(shadow) != len(self.shadow) or any(a.shape != b.shape for a, b in zip(shadow, self.shadow, strict=True)):
            raise ValueError("the saved EMA weights do not fit this model (another architecture or --train_only)")
        device = self.optimization_step.device
        self.shadow = [s.to(device=device, dtype=t.dtype) for s, t in zip(shadow, self.shadow, strict=True)]
        self.optimization_step = torch.as_tensor(state["optimization_step"], dtype=torch.long).to(device)
        for key in ("max_decay", "min_decay", "inv_gamma", "power"):
            setattr(self, key, float(state.get(key, getattr(self, key))))


def lerp_per_tensor(shadow: list[torch.Tensor], weights: list[torch.Tensor], rate: torch.Tensor) -> None:
    """``shadow += rate * (weights - shadow)`` in one pass per tensor (``rate`` a 0-d device tensor: a Python
    float would need a host read). The choice on a CPU, where foreach ops are per-tensor loops anyway."""
    torch._foreach_lerp_(shadow, weights, [rate] * len(shadow))


def lerp_multi_tensor(shadow: list[torch.Tensor], weights: list[torch.Tensor], rate: torch.Tensor) -> None:
    """The same update as three fused multi-tensor kernels: the choice on a GPU, where a lerp with 0-d tensor
    weights leaves foreach's fused path (one kernel launch per tensor)."""
    differences = torch._foreach_sub(shadow, weights)
    torch._foreach_mul_(differences, rate)
    torch._foreach_sub_(shadow, differences)
