"""Skip gates: what happens to a long (encoder-decoder) skip where it meets the decoder.

Every long skip of a UNet is concatenated with the decoder's backbone features right before a
decoder resnet. skipdiff intercepts that one place (see :mod:`skipdiff.router`) and hands the two
halves to a *gate*::

    main, skip = gate(main, skip, state, timestep)  # main: (B, C_main, H, W), skip: (B, C_skip, H, W)

A gate is a small ``nn.Module`` created by name from one registry (:data:`GATES`). The identity gate
``keep`` is the baseline. A gate declares what it needs and the router hands it that alone:

* ``stochastic`` gates (``bernoulli``, ``markov``) get a per-example ``state`` of shape (B,), sampled
  once per forward pass by the router; every other gate gets ``None``;
* gates whose ``needs_timestep`` is true get the forward's timesteps, shape (B,), in the scheduler's
  training units (0 .. num_train_timesteps - 1; a scalar timestep is broadcast to the batch); every
  other gate gets ``None``.

A *skip specification* says which gate each skip gets. It is stored, resolved to one dict per skip,
in the model's config, e.g. ``[{"mode": "keep"}, {"mode": "scale", "factor": 0.5}, ...]``, and can be
written by hand as:

* one mode for every skip: ``"zero"``, ``"scale:0.7071"``, ``"learned:init=0"``;
* one entry per skip, comma-separated or as a list: ``"keep,zero,scale:0.5,..."``;
* a named preset (:data:`PRESETS`): ``"full"``, ``"none"``, ``"scalelong:kappa=0.8"``, ``"freeu"``,
  ``"freeu2"``, ``"linear:outer=1:inner=0.5"``, ...

Entry syntax: ``mode[:value][:key=value]...``; a bare value is the mode's first parameter.

Timestep windows: every gate that can be switched off per example (all but ``keep``, ``remove`` and
the stochastic gates: :attr:`SkipGate.windowable`) takes the options ``t_min`` and ``t_max``. The gate
then acts on the examples whose timestep t satisfies ``t_min <= t < t_max`` and leaves both tensors
untouched on the others: ``scale:0.5:t_min=500`` scales the skip on the noisier half of a 1000-step
schedule only, ``fourier:backbone=1.5:skip=0.9:t_max=800`` applies FreeU below t = 800,
``learned:init=1:t_min=200:t_max=600`` learns a scalar used inside the window. The window is
half-open, so ``t_max=500`` and ``t_min=500`` split a trajectory in two. A preset takes them too and
puts them on each of its entries that acts (``freeu:t_min=500``, ``linear:inner=0.5:t_max=300``);
``keep`` entries stay ``keep``. Windows are options rather than a wrapper mode so that they compose
with every gate without a nested syntax and the stored config keeps one flat dict per skip. A
factor that varies continuously with t is the ``ramp`` mode.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers.utils.torch_utils import fourier_filter
from torch import nn

from .config import parse_number

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
    features alone. Only :class:`~skipdiff.unet.SkipUNet2DModel` can rebuild resnets; applying
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


# (height, width, threshold, device, dtype) -> the window operator of _fourier_window_operator.
_FOURIER_OPERATORS: dict[tuple, tuple[torch.Tensor, torch.Tensor | None] | None] = {}
# Largest operator (elements) and per-element cost (multiply-adds) worth a matmul instead of an FFT.
_FOURIER_MAX_ELEMENTS = 1 << 22
_FOURIER_MAX_COST = 256


def _fourier_window_operator(
    height: int, width: int, threshold: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The real linear map L with ``fourier_filter(x, threshold, s) == x + (s - 1) * L(x)``.

    diffusers scales the window ``[H//2 - t, H//2 + t) x [W//2 - t, W//2 + t)`` (Python slicing,
    so it may wrap or clip for small sizes) of the fftshifted spectrum, then keeps the real part.
    For each frequency (k, l) in the window, the real part of its rank-one spectral projection is
    ``(c c^T + s s^T) / (H W)`` with ``c, s = cos, sin(2 pi (k n / H + l m / W))`` over the
    flattened pixels (n, m); a conjugate pair in the window shares c and s (weight 2), and a
    self-conjugate frequency has s = 0. So L = U diag(w) U^T / (H W), returned as ``(U, diag(w) U^T
    / (H W))`` (H W x r, r x H W), or as ``(L, None)`` when the dense H W x H W matrix is cheaper,
    or ``None`` when an FFT is cheaper. Built in float64 and cached per argument tuple.
    """
    key = (height, width, threshold, device, dtype)
    if key in _FOURIER_OPERATORS:
        return _FOURIER_OPERATORS[key]
    # The window exactly as diffusers marks it, moved back to unshifted frequency indices.
    window = torch.zeros(height, width, dtype=torch.bool)
    crow, ccol = height // 2, width // 2
    window[crow - threshold : crow + threshold, ccol - threshold : ccol + threshold] = True
    window = torch.fft.ifftshift(window, dim=(-2, -1))
    frequencies = {tuple(f) for f in window.nonzero().tolist()}
    n = torch.arange(height, dtype=torch.float64)[:, None]
    m = torch.arange(width, dtype=torch.float64)[None, :]
    columns, weights, done = [], [], set()
    for fy, fx in sorted(frequencies):
        if (fy, fx) in done:
            continue
        conjugate = ((-fy) % height, (-fx) % width)
        done.update({(fy, fx), conjugate})
        # Phase reduced modulo one period in exact integer arithmetic before the float64 angle.
        angle = 2 * math.pi * (((fy * n) % height) / height + ((fx * m) % width) / width)
        columns.append(torch.cos(angle).flatten())
        if conjugate == (fy, fx):  # sin vanishes on the grid
            weights.append(1.0)
        else:
            columns.append(torch.sin(angle).flatten())
            weight = 2.0 if conjugate in frequencies else 1.0
            weights += [weight, weight]
    pixels = height * width
    basis = torch.stack(columns, dim=1) if columns else torch.zeros(pixels, 0, dtype=torch.float64)
    back = (torch.tensor(weights, dtype=torch.float64)[:, None] / pixels) * basis.T
    rank = basis.shape[1]
    operator: tuple[torch.Tensor, torch.Tensor | None] | None
    if min(2 * rank, pixels) > _FOURIER_MAX_COST or min(2 * rank, pixels) * pixels > _FOURIER_MAX_ELEMENTS:
        operator = None
    else:
        with torch.inference_mode(False):  # cached tensors must stay usable by autograd later
            if 2 * rank >= pixels:
                operator = ((basis @ back).to(device=device, dtype=dtype), None)
            else:
                operator = (basis.to(device=device, dtype=dtype), back.to(device=device, dtype=dtype))
    if len(_FOURIER_OPERATORS) >= 256:
        _FOURIER_OPERATORS.clear()
    _FOURIER_OPERATORS[key] = operator
    return operator


@register_gate("fourier")
class FourierGate(SkipGate):
    """FreeU (Si et al., CVPR 2024), as diffusers implements it (``enable_freeu``/``apply_freeu``).

    The first half of the backbone channels is multiplied by ``backbone`` (b) and the skip's lowest
    Fourier frequencies by ``skip`` (s): the window ``[H//2 - t, H//2 + t) x [W//2 - t, W//2 + t)``
    (t = ``threshold``) of the fftshifted spectrum, i.e. frequencies -t .. t-1 on each axis, wrapping
    or clipped as diffusers' slicing does when H or W < 2t. The result equals diffusers'
    ``fourier_filter`` (to float32 rounding, for any H, W and t; half precision is computed in
    float32, as diffusers does) but is computed without FFTs: ``x + (s - 1) * L(x)``, where L, the
    real part of the projection onto the window's 2-D Fourier basis functions, is a low-rank (or
    small dense) matrix applied with matmuls (see :func:`_fourier_window_operator`); large windows
    on large images fall back to ``fourier_filter``. Factors of 1 leave their tensor untouched.

    ``structure=true`` is FreeU v2 (the FreeU README): the backbone factor becomes structure-aware,
    ``h[:, :C//2] *= (b - 1) * minmax(mean_c(h)) + 1``, where ``mean_c`` averages over all backbone
    channels and ``minmax`` rescales each example's (H, W) map to [0, 1] (a constant map, e.g. 1 x 1,
    gets 1: the v1 factor b). Without it the factor is the constant b (v1), one multiply by a
    precomputed (1, C, 1, 1) factor, bit-exact with diffusers.

    The operator for the skip's resolution in the model's config (:attr:`SkipInfo.resolution`, square)
    is built here, so a compiled forward never builds one. Another runtime size (a UNet run at a
    size other than its ``sample_size``) builds and caches its operator on first use in eager mode;
    under ``torch.compile`` it uses diffusers' FFT filter instead, which traces into the graph.
    """

    def __init__(
        self, info: SkipInfo, backbone: float = 1.0, skip: float = 1.0, threshold: int = 1, structure: bool = False
    ):
        super().__init__(info)
        self.backbone = _finite("fourier backbone factor", backbone)
        self.skip = _finite("fourier skip factor", skip)
        self.threshold = _integer("fourier threshold", threshold)
        if self.threshold < 1:
            raise ValueError(f"fourier threshold must be >= 1, got {threshold}")
        self.structure = _as_bool("fourier structure", structure)
        self._build_backbone_factor()
        self._build_operator()

    def _build_backbone_factor(self) -> None:
        """The (1, C, 1, 1) float32 factor [b, ..., b, 1, ..., 1] of v1, and the dtype to multiply in."""
        channels = self.info.main_channels
        factor = None
        if self.backbone != 1.0 and not self.structure and channels > 0:
            factor = torch.ones(1, channels, 1, 1, dtype=torch.float32)
            factor[:, : channels // 2] = self.backbone
        self.register_constant("backbone_factor", factor)
        # A half-precision factor rounds b where diffusers' multiply by the Python float b would not (b
        # is applied in float32 for half dtypes): multiply in that dtype only where b is exact in it.
        self._factor_dtypes = {torch.float32: torch.float32}
        for dtype in (torch.float16, torch.bfloat16):
            exact = float(torch.tensor(self.backbone, dtype=dtype)) == self.backbone
            self._factor_dtypes[dtype] = dtype if exact else torch.float32

    def _build_operator(self) -> None:
        """The filter's operator at the configured resolution, as float32 constants (see the class)."""
        self._operator_size: tuple[int, int] | None = None
        self._operator_is_fft = False
        left = right = None
        resolution = self.info.resolution
        if self.skip != 1.0 and resolution > 0:
            self._operator_size = (resolution, resolution)
            operator = _fourier_window_operator(
                resolution, resolution, self.threshold, torch.device("cpu"), torch.float32
            )
            self._operator_is_fft = operator is None
            left, right = operator if operator is not None else (None, None)
        self.register_constant("operator_left", left)
        self.register_constant("operator_right", right)

    def transform(self, main, skip, state, timestep):
        if self.backbone != 1.0:
            main = self.scale_backbone_structure(main) if self.structure else self.scale_backbone(main)
        if self.skip != 1.0:
            skip = self.filter_skip(skip)
        return main, skip

    def scale_backbone(self, main: torch.Tensor) -> torch.Tensor:
        """``main[:, :C//2] * b`` (v1), bit-exact with diffusers' ``apply_freeu``."""
        factor, dtype = self.backbone_factor, self._factor_dtypes.get(main.dtype)
        if factor is None or dtype is None or factor.shape[1] != main.shape[1] or factor.device != main.device:
            half = main.shape[1] // 2  # float64, or a layout other than the configured one
            return torch.cat([main[:, :half] * self.backbone, main[:, half:]], dim=1)
        return (main * factor.to(dtype)).to(main.dtype)

    def scale_backbone_structure(self, main: torch.Tensor) -> torch.Tensor:
        """FreeU v2: ``main[:, :C//2] * ((b - 1) * minmax(mean_c(main)) + 1)``."""
        mean = main.mean(dim=1, keepdim=True)  # (B, 1, H, W)
        low = mean.amin(dim=(2, 3), keepdim=True)  # (B, 1, 1, 1)
        span = mean.amax(dim=(2, 3), keepdim=True) - low  # (B, 1, 1, 1)
        # A constant map has no structure to follow: 1 there (the v1 factor), without a 0 / 0 in the
        # forward or the backward pass.
        positive = span > 0
        normalized = torch.where(positive, (mean - low) / torch.where(positive, span, 1), 1)  # (B, 1, H, W)
        half = main.shape[1] // 2
        return torch.cat([main[:, :half] * ((self.backbone - 1) * normalized + 1), main[:, half:]], dim=1)

    def filter_skip(self, skip: torch.Tensor) -> torch.Tensor:
        """diffusers' ``fourier_filter(skip, threshold, scale=s)``, as ``skip + (s - 1) * L(skip)``."""
        batch, channels, height, width = skip.shape
        dtype = torch.float64 if skip.dtype == torch.float64 else torch.float32
        if self._operator_size == (height, width) and dtype == torch.float32 and self._constants_on(skip.device):
            operator = None if self._operator_is_fft else (self.operator_left, self.operator_right)
        elif torch.compiler.is_compiling():  # building an operator cannot be traced: the FFT can
            operator = None
        else:  # another size or dtype: built and cached on first use
            operator = _fourier_window_operator(height, width, self.threshold, skip.device, dtype)
        if operator is None:
            return fourier_filter(skip, threshold=self.threshold, scale=self.skip)
        if torch.is_autocast_enabled(skip.device.type):  # the matmuls must stay in float32
            with torch.autocast(skip.device.type, enabled=False):
                return self.filter_skip(skip)
        x = skip.to(dtype).reshape(batch * channels, height * width)
        left, right = operator
        if right is None:  # dense L
            out = torch.addmm(x, x, left, alpha=self.skip - 1.0)
        else:
            out = torch.addmm(x, x @ left, right, alpha=self.skip - 1.0)
        return out.view(batch, channels, height, width).to(skip.dtype)

    def _constants_on(self, device: torch.device) -> bool:
        return self.operator_left is None or self.operator_left.device == device

    def extra_repr(self) -> str:
        structure = ", structure=True" if self.structure else ""
        return f"backbone={self.backbone:.4g}, skip={self.skip:.4g}, threshold={self.threshold}{structure}"


class StochasticGate(SkipGate):
    """A per-example gate: the skip of example b is multiplied by ``state[b]``.

    The router samples the state once per forward: in training from the global torch RNG (which
    Accelerate checkpoints, so resumed runs continue the same stream), at inference according to
    the router's ``inference`` mode (``expected``: the keep probability; ``sample``: seeded draws).
    With ``rescale=True`` a kept skip is divided by its keep probability (inverted dropout), so the
    expected skip equals the kept one.
    """

    stochastic = True
    windowable = False  # the keep probability (expected and MAP inference) would depend on t

    def __init__(self, info: SkipInfo, rescale: bool = False):
        super().__init__(info)
        self.rescale = _as_bool("rescale", rescale)

    def gate_skip(self, skip, state):
        if state is None:
            raise RuntimeError(f"stochastic skip {self.info.index} got no sampled state")
        return skip * state.to(skip.dtype)[:, None, None, None]


@register_gate("bernoulli")
class BernoulliGate(StochasticGate):
    """Stochastic depth for skips: open with a fixed probability ``p``, independently per example."""

    def __init__(self, info: SkipInfo, p: float = 0.8, rescale: bool = False):
        super().__init__(info, rescale=rescale)
        self.p = _probability("bernoulli p", p)

    def keep_probability(self) -> float:
        return self.p

    def telemetry(self):
        return {"p_open": self.p}


@register_gate("markov")
class MarkovGate(StochasticGate):
    """Open or closed according to a Markov chain along the decoder (see :mod:`skipdiff.markov`).

    The gate itself only applies the state; the chain that samples the states of all ``markov``
    skips jointly lives in the router, because skip k's state depends on skip k-1's (its keep
    probability is the chain's marginal, which the router fills in).
    """

    sampled_by_chain = True

    def keep_probability(self) -> float:
        return 1.0  # a placeholder: the router uses the chain's marginal


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


# --------------------------------------------------------------------------------------------------
# Specification parsing
# --------------------------------------------------------------------------------------------------

PresetFn = Callable[..., list[dict]]
PRESETS: dict[str, PresetFn] = {}


def register_preset(name: str) -> Callable[[PresetFn], PresetFn]:
    """Function decorator: ``fn(skips: list[SkipInfo], **options) -> list[dict]`` under ``name``."""

    def decorator(fn: PresetFn) -> PresetFn:
        if name in PRESETS:
            raise ValueError(f"skip preset {name!r} is already registered")
        PRESETS[name] = fn
        return fn

    return decorator


# Options every windowable gate takes besides its own (see the module docstring).
WINDOW_OPTIONS = ("t_min", "t_max")


def _gate_parameters(mode: str) -> list[str]:
    """The options an entry of ``mode`` may carry: its gate's parameters, then the window's."""
    import inspect

    names = [n for n in inspect.signature(GATES[mode].__init__).parameters if n not in ("self", "info")]
    return names + list(WINDOW_OPTIONS) if GATES[mode].windowable else names


def parse_entry(entry: str | dict) -> dict:
    """Parse one skip entry (``"scale:0.5"`` or ``{"mode": "scale", "factor": 0.5}``) to a dict.

    The mode must be registered and every option must be one of its gate's parameters.
    """
    if isinstance(entry, dict):
        if "mode" not in entry:
            raise ValueError(f"skip entry {entry!r} has no 'mode'")
        parsed = dict(entry)
    elif isinstance(entry, str):
        head, *options = [part.strip() for part in entry.strip().split(":")]
        parsed = {"mode": head}
        # A bare value is the gate's own first parameter, never a window bound ("zero:0.5" is an error).
        positional = [n for n in _gate_parameters(head) if n not in WINDOW_OPTIONS][:1] if head in GATES else []
        for i, option in enumerate(options):
            if "=" in option:
                key, value = option.split("=", 1)
                parsed[key.strip()] = parse_number(value.strip())
            elif i == 0 and positional:
                parsed[positional[0]] = parse_number(option)
            else:
                raise ValueError(f"cannot read option {option!r} of skip entry {entry!r}")
    else:
        raise ValueError(f"a skip entry must be a string or a dict, got {entry!r}")
    mode = parsed["mode"]
    if mode not in GATES:
        raise ValueError(f"unknown skip mode {mode!r}; known modes: {sorted(GATES)}")
    unknown = set(parsed) - {"mode"} - set(_gate_parameters(mode))
    if unknown:
        raise ValueError(
            f"skip mode {mode!r} has no option(s) {sorted(unknown)}; it takes {_gate_parameters(mode)}"
        )
    return parsed


def resolve_spec(spec: SkipSpec | None, skips: Sequence[SkipInfo]) -> list[dict]:
    """Resolve a specification to one entry dict per skip (validated by building every gate)."""
    count = len(skips)
    if spec is None:
        spec = "full"
    if isinstance(spec, str):
        text = spec.strip()
        if "," in text:
            entries = [parse_entry(part) for part in text.split(",")]
        else:
            name = text.partition(":")[0]
            if name in PRESETS:
                options = _preset_options(text)
                window = {k: options.pop(k) for k in WINDOW_OPTIONS if k in options}
                entries = _with_window(PRESETS[name](list(skips), **options), window, name)
            elif name in GATES:
                entries = [parse_entry(text)] * count
            else:
                raise ValueError(
                    f"unknown skip mode or preset {name!r}; modes: {sorted(GATES)}, presets: {sorted(PRESETS)}"
                )
    else:
        entries = [parse_entry(e) for e in spec]
    if len(entries) != count:
        raise ValueError(f"the skip specification has {len(entries)} entries but the model has {count} skips")
    resolved = [dict(e) for e in entries]
    for info, entry in zip(skips, resolved, strict=True):
        build_gate(entry, info)  # validates option values (NaN, negative, ...) before any work
    return resolved


def _preset_options(text: str) -> dict:
    name, _, option_text = text.partition(":")
    options: dict[str, Any] = {}
    for option in filter(None, option_text.split(":")):
        if "=" not in option:
            raise ValueError(f"preset options are key=value, got {option!r} in {text!r}")
        key, value = option.split("=", 1)
        options[key.strip()] = parse_number(value.strip())
    import inspect

    parameters = list(inspect.signature(PRESETS[name]).parameters.values())[1:]  # after ``skips``
    accepted = [p.name for p in parameters]
    # A preset taking **options passes them to its gate, whose parse_entry names unknown keys.
    unknown = set() if any(p.kind is p.VAR_KEYWORD for p in parameters) else set(options) - set(accepted)
    unknown -= set(WINDOW_OPTIONS)  # every preset takes a timestep window (see _with_window)
    if unknown:
        raise ValueError(
            f"skip preset {name!r} has no option(s) {sorted(unknown)}; it takes {accepted + list(WINDOW_OPTIONS)}"
        )
    return options


def _with_window(entries: list[dict], window: dict, preset: str) -> list[dict]:
    """A preset's entries with the timestep window on each one that acts; ``keep`` entries stay ``keep``."""
    if not window:
        return entries
    windowed = []
    for entry in map(parse_entry, entries):
        gate = GATES[entry["mode"]]
        if not gate.is_identity and not gate.windowable:
            raise ValueError(
                f"skip preset {preset!r} gives skips the mode {entry['mode']!r}, which takes no timestep window"
            )
        windowed.append(entry if gate.is_identity else {**entry, **window})
    return windowed


def build_gate(entry: dict, info: SkipInfo) -> SkipGate:
    """Instantiate the gate an entry names for one skip."""
    entry = parse_entry(entry)
    options = {k: v for k, v in entry.items() if k != "mode" and k not in WINDOW_OPTIONS}
    gate = GATES[entry["mode"]](info, **options)
    window = {k: entry[k] for k in WINDOW_OPTIONS if k in entry}
    if window:
        gate.set_window(**window)
    return gate


def format_entry(entry: dict) -> str:
    """The short string form of an entry, e.g. ``scale:factor=0.5``."""
    options = [
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items() if k != "mode"
    ]
    return ":".join([entry["mode"], *options])


# --------------------------------------------------------------------------------------------------
# Presets (each: skips in decoder order -> one entry per skip)
# --------------------------------------------------------------------------------------------------


def _all(mode: str, **defaults) -> PresetFn:
    """A preset giving every skip the same gate; options (``markov:rescale=true``) go to the gate."""

    def preset(skips: list[SkipInfo], **options) -> list[dict]:
        return [parse_entry({"mode": mode, **defaults, **options}) for _ in skips]

    return preset


register_preset("full")(_all("keep"))
register_preset("none")(_all("zero"))
register_preset("removed")(_all("remove"))
register_preset("inv-sqrt2")(_all("scale", factor=1.0 / math.sqrt(2.0)))
register_preset("rezero")(_all("learned", init=0.0))
register_preset("learned")(_all("learned", init=1.0))
register_preset("markov")(_all("markov"))


@register_preset("stochastic-depth")
def stochastic_depth(skips: list[SkipInfo], p: float = 0.8, rescale: bool = False) -> list[dict]:
    """Independent Bernoulli gates with keep probability ``p`` (Huang et al., 2016)."""
    return [{"mode": "bernoulli", "p": p, "rescale": rescale} for _ in skips]


@register_preset("scalelong")
def scalelong(skips: list[SkipInfo], kappa: float = 0.7) -> list[dict]:
    """ScaleLong CS: skip k (decoder order, 0 = innermost) is scaled by kappa^(K-1-k).

    The innermost skip is scaled most and the outermost by 1 (Huang et al., NeurIPS 2023).
    """
    kappa = _finite("scalelong kappa", kappa)
    if not 0.0 < kappa <= 1.0:
        raise ValueError(f"scalelong kappa must lie in (0, 1], got {kappa}")
    count = len(skips)
    return [{"mode": "scale", "factor": kappa ** (count - 1 - s.index)} for s in skips]


@register_preset("freeu")
def freeu(
    skips: list[SkipInfo],
    b1: float = 1.5,
    b2: float = 1.6,
    s1: float = 0.9,
    s2: float = 0.2,
    structure: bool = False,
) -> list[dict]:
    """FreeU on the first two up blocks (defaults: the SD1.5 recommendation); other skips kept.

    ``structure=true`` (or the preset ``freeu2``) is FreeU v2's structure-aware backbone factor.
    """
    factors = {0: (b1, s1), 1: (b2, s2)}
    extra = {"structure": True} if _as_bool("freeu structure", structure) else {}
    return [
        {"mode": "fourier", "backbone": factors[s.up_block][0], "skip": factors[s.up_block][1], **extra}
        if s.up_block in factors
        else {"mode": "keep"}
        for s in skips
    ]


@register_preset("freeu2")
def freeu2(skips: list[SkipInfo], b1: float = 1.5, b2: float = 1.6, s1: float = 0.9, s2: float = 0.2) -> list[dict]:
    """FreeU v2 (the FreeU README): ``freeu`` with the structure-aware backbone factor
    ``(b - 1) * minmax(mean_c(h)) + 1`` on the first half of the backbone channels."""
    return freeu(skips, b1=b1, b2=b2, s1=s1, s2=s2, structure=True)


@register_preset("linear")
def linear(skips: list[SkipInfo], outer: float = 1.0, inner: float = 0.5) -> list[dict]:
    """A skip-scale profile linear in depth: skip k (decoder order, 0 = innermost) is scaled by
    ``inner + (outer - inner) * k / (K - 1)``, from ``inner`` at the innermost skip to ``outer`` at the
    outermost (a single skip gets ``outer``). Skip-Tuning (Ma et al., ICML 2024) rescales skips by
    depth at sampling time; add ``t_min``/``t_max`` to act on part of the trajectory only."""
    outer, inner = _finite("linear outer", outer), _finite("linear inner", inner)
    last = len(skips) - 1
    return [
        {"mode": "scale", "factor": inner + (outer - inner) * s.index / last if last else outer} for s in skips
    ]


@register_preset("outer-only")
def outer_only(skips: list[SkipInfo]) -> list[dict]:
    """Keep the skips at the highest resolution (the outermost level), zero the rest."""
    top = max(s.resolution for s in skips)
    return [{"mode": "keep" if s.resolution == top else "zero"} for s in skips]


@register_preset("inner-only")
def inner_only(skips: list[SkipInfo]) -> list[dict]:
    """Keep the skips at the lowest resolution (the innermost level), zero the rest."""
    bottom = min(s.resolution for s in skips)
    return [{"mode": "keep" if s.resolution == bottom else "zero"} for s in skips]
