"""FreeU's gate (``fourier``): the backbone's first channels scaled, the skip's low frequencies filtered.

The filter is diffusers' ``fourier_filter`` computed as a low-rank real operator (matmuls instead of FFTs);
see :class:`FourierGate` and :func:`_fourier_window_operator`.
"""

from __future__ import annotations

import math

import torch
from diffusers.utils.torch_utils import fourier_filter

from .gate import SkipGate, SkipInfo, _as_bool, _finite, _integer, register_gate

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
