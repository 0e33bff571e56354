"""The deterministic gates: each does the same to every example (within its timestep window).

``keep`` (the identity, the baseline), ``zero``, ``remove`` (structural), ``scale``, ``learned``,
``learned_channel``, ``ramp`` (a factor linear in t) and ``adapter`` (SCEdit's SC-Tuner). FreeU's
``fourier`` gate has its own module (:mod:`skipdiff.skips.fourier`); the interface is
:class:`skipdiff.skips.gate.SkipGate`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .gate import SkipGate, SkipInfo, _as_bool, _finite, _integer, register_gate


@register_gate("keep")
class KeepGate(SkipGate):
    """Identity: the skip passes unchanged (the stock UNet)."""

    is_identity = True
    windowable = False  # nothing to switch

    def gate_skip(self, skip, state):
        return skip


@register_gate("zero")
class ZeroGate(SkipGate):
    """The skip tensor is replaced by zeros: same parameters and compute as ``keep``."""

    def gate_skip(self, skip, state):
        return torch.zeros_like(skip)


@register_gate("remove")
class RemoveGate(SkipGate):
    """Structural removal: the receiving resnet is built for the backbone channels only.

    The gate returns an empty (B, 0, H, W) skip, so the block's ``torch.cat`` yields the backbone
    features alone. Only :class:`~skipdiff.skips.unet.SkipUNet2DModel` can rebuild resnets; applying
    ``remove`` to an existing UNet is refused (use ``zero``).
    """

    removes_skip = True
    windowable = False  # structural: the resnet has no skip channels on any timestep

    def gate_skip(self, skip, state):
        return skip[:, :0]


@register_gate("scale")
class ScaleGate(SkipGate):
    """Multiply the skip by a constant (ScaleLong's CS, the 1/sqrt(2) practice).

    GroupNorm caveat: the receiving resnet normalises [main, skip] per group, which cancels a
    constant scale wherever a group lies wholly inside the skip channels.
    """

    def __init__(self, info: SkipInfo, factor: float = 1.0 / math.sqrt(2.0)):
        super().__init__(info)
        self.factor = _finite("scale factor", factor)

    def gate_skip(self, skip, state):
        return skip * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor:.4g}"


@register_gate("learned")
class LearnedScalarGate(SkipGate):
    """A learnable scalar on the skip; ``init=0`` is ReZero/SkipInit style, ``init=1`` the identity."""

    def __init__(self, info: SkipInfo, init: float = 1.0):
        super().__init__(info)
        self.alpha = nn.Parameter(torch.tensor(_finite("learned init", init, minimum=None)))

    def gate_skip(self, skip, state):
        return skip * self.alpha.to(skip.dtype)

    def telemetry(self):
        return {"alpha": float(self.alpha.detach())}


@register_gate("learned_channel")
class LearnedChannelGate(SkipGate):
    """Per-channel learned scaling of the skip.

    ``form="vector"``: a learnable vector (C_skip,) initialised to ``init``.
    ``form="se"``: ScaleLong's LS module as squeeze-excitation over channels: spatial mean ->
    Linear(C, C/r) -> ReLU -> Linear(C/r, C) -> sigmoid, a per-example, per-channel coefficient in
    (0, 1).
    """

    def __init__(self, info: SkipInfo, form: str = "vector", init: float = 1.0, reduction: int = 16):
        super().__init__(info)
        if form not in ("vector", "se"):
            raise ValueError(f"learned_channel form must be 'vector' or 'se', got {form!r}")
        self.form = form
        channels = info.skip_channels
        if form == "vector":
            init = _finite("learned_channel init", init, minimum=None)
            self.weight = nn.Parameter(torch.full((channels,), init))
        else:
            reduction = _integer("learned_channel reduction", reduction)
            if reduction < 1:
                raise ValueError(f"learned_channel reduction must be >= 1, got {reduction}")
            hidden = max(1, channels // reduction)
            self.squeeze = nn.Sequential(
                nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels), nn.Sigmoid()
            )

    def gate_skip(self, skip, state):
        if self.form == "vector":
            return skip * self.weight.to(skip.dtype)[None, :, None, None]
        coefficient = self.squeeze(skip.mean(dim=(2, 3)))  # (B, C_skip)
        return skip * coefficient[:, :, None, None]

    def telemetry(self):
        if self.form == "vector":
            return {"mean_weight": float(self.weight.detach().mean())}
        return {}


@register_gate("ramp")
class RampGate(SkipGate):
    """A skip factor linear in the timestep (Skip-Tuning style, acting along the trajectory).

    ``factor(t) = low + (high - low) * clamp((t - t_low) / (t_high - t_low), 0, 1)``: ``low`` at and
    below ``t_low``, ``high`` at and above ``t_high`` (timesteps in the scheduler's training units;
    the defaults span a 1000-step schedule). ``learned=true`` makes ``low`` and ``high`` two learnable
    scalars initialised to the given values.
    """

    uses_timestep = True

    def __init__(
        self,
        info: SkipInfo,
        low: float = 1.0,
        high: float = 0.5,
        t_low: float = 0.0,
        t_high: float = 999.0,
        learned: bool = False,
    ):
        super().__init__(info)
        self.learned = _as_bool("ramp learned", learned)
        minimum = None if self.learned else 0.0  # a fixed factor is a scale (>= 0); a learned one an init
        self.low, self.high = _finite("ramp low", low, minimum=minimum), _finite("ramp high", high, minimum=minimum)
        self.t_low, self.t_high = _finite("ramp t_low", t_low), _finite("ramp t_high", t_high)
        if not self.t_low < self.t_high:
            raise ValueError(f"ramp needs t_low < t_high, got t_low={t_low}, t_high={t_high}")
        if self.learned:
            self.factors = nn.Parameter(torch.tensor([self.low, self.high]))  # (2,): factor at t_low, at t_high

    def factor(self, timestep: torch.Tensor) -> torch.Tensor:
        """The factor of every example, shape (B,), in float32."""
        fraction = ((timestep.float() - self.t_low) / (self.t_high - self.t_low)).clamp(0.0, 1.0)  # (B,)
        if self.learned:
            low, high = self.factors.float().unbind()
            return low + (high - low) * fraction
        return self.low + (self.high - self.low) * fraction

    def transform(self, main, skip, state, timestep):
        return main, skip * self.factor(timestep).to(skip.dtype)[:, None, None, None]

    def telemetry(self):
        if self.learned:
            low, high = self.factors.detach().tolist()
            return {"low": low, "high": high}
        return {}

    def extra_repr(self) -> str:
        return f"low={self.low:.4g}, high={self.high:.4g}, t_low={self.t_low:g}, t_high={self.t_high:g}"


@register_gate("adapter")
class AdapterGate(SkipGate):
    """A residual bottleneck on the skip, SCEdit's SC-Tuner (Jiang et al., CVPR 2024):
    ``skip + W2 GELU(W1 skip)``, with W1: C -> w and W2: w -> C 1x1 convolutions (with biases).

    W2 and its bias start at zero (``zero_init=false`` leaves them at PyTorch's default init), so a
    freshly attached adapter returns the skip bit for bit and the model's output is unchanged; W1 gets
    a gradient once W2 has moved. The hidden width w is ``width`` if given (> 0), else ``ratio`` times
    the skip's channels (SCEdit's SD 1.5 setting is a ratio of 1). Parameters: 2 C w + w + C.
    """

    def __init__(self, info: SkipInfo, width: int = 0, ratio: float = 1.0, zero_init: bool = True):
        super().__init__(info)
        width = _integer("adapter width", width)
        ratio = _finite("adapter ratio", ratio)
        if width < 0:
            raise ValueError(f"adapter width must be >= 0 (0: ratio x channels), got {width}")
        channels = info.skip_channels
        self.width = width if width > 0 else max(1, round(ratio * channels))
        self.down = nn.Conv2d(channels, self.width, kernel_size=1)
        self.up = nn.Conv2d(self.width, channels, kernel_size=1)
        if _as_bool("adapter zero_init", zero_init):
            with torch.no_grad():  # tensor methods: diffusers' no_init_weights() does not skip them
                self.up.weight.zero_()
                self.up.bias.zero_()

    def gate_skip(self, skip, state):
        return skip + self.up(nn.functional.gelu(self.down(skip)))  # (B, C_skip, H, W)

    def telemetry(self):
        return {"up_weight_norm": float(self.up.weight.detach().norm())}

    def extra_repr(self) -> str:
        return f"width={self.width}"
