"""The gate interface and its registry: what a skip gate is, and how a gate joins :data:`GATES`.

Every long skip of a UNet is concatenated with the decoder's backbone features right before a
decoder resnet. skipdiff intercepts that one place (see :mod:`skipdiff.skips.router`) and hands the two
halves to a *gate*::

    main, skip = gate(main, skip, state, timestep)  # main: (B, C_main, H, W), skip: (B, C_skip, H, W)

A gate is a small ``nn.Module`` created by name from one registry (:data:`GATES`). The identity gate
``keep`` is the baseline. A gate declares what it needs and the router hands it that alone:

* ``stochastic`` gates (``bernoulli``, ``markov``) get a per-example ``state`` of shape (B,), sampled
  once per forward pass by the router; every other gate gets ``None``;
* gates whose ``needs_timestep`` is true get the forward's timesteps, shape (B,), in the scheduler's
  training units (0 .. num_train_timesteps - 1; a scalar timestep is broadcast to the batch); every
  other gate gets ``None``.

The built-in gates live one family to a module, as optuna keeps one sampler to a module:
:mod:`skipdiff.skips.deterministic` (keep, zero, remove, scale, learned, learned_channel, ramp, adapter),
:mod:`skipdiff.skips.fourier` (FreeU's fourier) and :mod:`skipdiff.skips.stochastic` (bernoulli, markov).
Each registers its gates when imported; :mod:`skipdiff.skips.spec`, which turns a written skip
specification into gates, imports all three, so any spec can name any built-in mode.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

SkipSpec = str | Sequence[str | dict]


# --------------------------------------------------------------------------------------------------
# Skip geometry: what the router knows about each skip, in decoder (consumption) order.
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SkipInfo:
    """One long skip, indexed in the order the decoder consumes it (0 = innermost, deepest)."""

    index: int
    up_block: int  # index of the receiving up block
    layer: int  # index of the receiving resnet inside that block
    source: str  # module whose output is the skip, e.g. "down_blocks.0.resnets.1"
    resolution: int  # spatial size (height) of the skip tensor for the model's sample_size
    skip_channels: int
    main_channels: int  # backbone channels it is concatenated with


# --------------------------------------------------------------------------------------------------
# Gates
# --------------------------------------------------------------------------------------------------


class SkipGate(nn.Module):
    """Base class. Subclasses set ``mode`` and implement :meth:`gate_skip` (the skip alone) or
    :meth:`transform` (both tensors, the state and the timesteps).

    What a gate needs from the router, it declares: ``stochastic`` gates get a per-example state (B,)
    in {0, 1} (or a probability at inference); gates whose :attr:`needs_timestep` is true get the
    forward's timesteps (B,). ``removes_skip`` gates make the router build the receiving resnet
    without the skip's channels. A timestep window (``t_min``/``t_max``, see the module docstring)
    is applied here, around :meth:`transform`, for every ``windowable`` gate.
    """

    mode: str = ""
    stochastic: bool = False
    removes_skip: bool = False
    is_identity: bool = False  # the router skips an identity gate's split and concatenation
    sampled_by_chain: bool = False  # the router's Markov chain samples this gate's state jointly with others
    uses_timestep: bool = False  # the gate's own transform reads the timesteps (e.g. ``ramp``)
    windowable: bool = True  # accepts t_min / t_max (identity, structural and stochastic gates do not)
    _constants: tuple[str, ...] = ()  # buffers that follow the module's device but keep their dtype

    def keep_probability(self) -> float:
        """P(the skip is open): 1 for deterministic gates; stochastic gates override it."""
        return 1.0

    def __init__(self, info: SkipInfo):
        super().__init__()
        self.info = info
        self.window: tuple[float, float] | None = None  # [t_min, t_max) where the gate acts

    @property
    def needs_timestep(self) -> bool:
        """Whether the router must hand this gate the forward's timesteps."""
        return self.uses_timestep or self.window is not None

    def set_window(self, t_min: float | None = None, t_max: float | None = None) -> None:
        """Make the gate act only where ``t_min <= t < t_max`` (either bound may be left open)."""
        if not self.windowable:
            raise ValueError(f"skip mode {self.mode!r} takes no timestep window (t_min / t_max)")
        low = -math.inf if t_min is None else _finite("t_min", t_min)
        high = math.inf if t_max is None else _finite("t_max", t_max)
        if not low < high:
            raise ValueError(f"a timestep window needs t_min < t_max, got t_min={t_min}, t_max={t_max}")
        self.window = (low, high)

    def forward(
        self,
        main: torch.Tensor,
        skip: torch.Tensor,
        state: torch.Tensor | None = None,
        timestep: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if timestep is None and self.needs_timestep:
            raise RuntimeError(f"skip {self.info.index} ({self.mode}) needs the forward's timesteps, got none")
        out_main, out_skip = self.transform(main, skip, state, timestep)
        if self.window is None:
            return out_main, out_skip
        low, high = self.window
        inside = ((timestep >= low) & (timestep < high))[:, None, None, None]  # (B, 1, 1, 1)
        if out_main is not main:
            out_main = torch.where(inside, out_main, main)
        return out_main, torch.where(inside, out_skip, skip)

    def transform(self, main, skip, state, timestep) -> tuple[torch.Tensor, torch.Tensor]:
        """The gate's effect on (backbone, skip); by default :meth:`gate_skip` on the skip alone."""
        return main, self.gate_skip(skip, state)

    def gate_skip(self, skip: torch.Tensor, state: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def telemetry(self) -> dict[str, float]:
        """Scalar view of the gate for logs (learned values, probabilities, ...)."""
        return {}

    def extra_repr(self) -> str:
        return "" if self.window is None else f"t_min={self.window[0]:g}, t_max={self.window[1]:g}"

    # ---- precomputed constants ------------------------------------------------------------------

    def register_constant(self, name: str, tensor: torch.Tensor | None) -> None:
        """A non-persistent buffer that moves with the module's device but keeps its dtype, so that a
        precomputed operator stays float32 when the model is cast to half precision. Being a buffer,
        it is on the right device before the first forward (nothing is built inside a compiled graph)."""
        if tensor is not None and tensor.is_inference():  # built under inference_mode: usable by autograd later
            with torch.inference_mode(False):
                tensor = tensor.clone()
        self.register_buffer(name, tensor, persistent=False)
        self._constants = (*self._constants, name)

    def _apply(self, fn, recurse=True):
        held = {name: self._buffers.pop(name) for name in self._constants}
        try:
            return super()._apply(fn, recurse)
        finally:
            for name, tensor in held.items():
                if tensor is not None:  # follow the device that fn moves a float tensor to
                    with torch.inference_mode(False):
                        tensor = tensor.to(fn(torch.empty(0, device=tensor.device)).device)
                self._buffers[name] = tensor


GATES: dict[str, type[SkipGate]] = {}


def register_gate(name: str) -> Callable[[type[SkipGate]], type[SkipGate]]:
    """Class decorator that adds a gate to :data:`GATES`; a name may be registered once."""

    def decorator(cls: type[SkipGate]) -> type[SkipGate]:
        if name in GATES:
            raise ValueError(f"skip gate {name!r} is already registered (by {GATES[name].__name__})")
        cls.mode = name
        GATES[name] = cls
        return cls

    return decorator


def _number(name: str, value) -> float:
    """A real number given as a number (spec strings are parsed by :func:`skipdiff.config.parse_number`,
    which reads ASCII decimal literals only); text such as ``"١"`` or ``"1_0"`` is refused, not coerced."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


def _integer(name: str, value) -> int:
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _finite(name: str, value: float, *, minimum: float | None = 0.0) -> float:
    value = _number(name, value)
    if not math.isfinite(value) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r}")
    return value


def _probability(name: str, value: float) -> float:
    value = _finite(name, value)
    if value > 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
    return value


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "1", "yes"):
        return True
    if isinstance(value, str) and value.lower() in ("false", "0", "no"):
        return False
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"{name} must be true or false, got {value!r}")
