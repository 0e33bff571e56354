"""The ``fourier`` (FreeU) gate against diffusers' own ``fourier_filter`` and ``apply_freeu``.

The gate computes the filter as ``x + (s - 1) * L(x)`` with cached matmul operators instead of FFTs;
these tests check it equals diffusers' FFT version for every size (even, odd, H != W, windows that
wrap or clip when H or W < 2t), threshold and scale, in value and in gradient.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from diffusers.utils.torch_utils import apply_freeu, fourier_filter

from skipdiff.skips.fourier import FourierGate, _fourier_window_operator
from skipdiff.skips.gate import SkipInfo
from skipdiff.skips.spec import build_gate

torch.set_num_threads(1)

INFO = SkipInfo(index=0, up_block=0, layer=0, source="conv_in", resolution=8, skip_channels=4, main_channels=6)

SIZES = [1, 2, 3, 4, 5, 7, 8, 12, 16, 17]
THRESHOLDS = [1, 2, 3, 5, 9]
SCALES = [0.0, 0.2, 0.9, 1.6]


def gate(skip: float, threshold: int = 1, backbone: float = 1.0) -> FourierGate:
    return FourierGate(INFO, backbone=backbone, skip=skip, threshold=threshold)


def assert_matches(out: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor) -> None:
    """Equal within 1e-5 relative to the input's magnitude (a filtered value may be near 0)."""
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * float(scale.abs().max()))


@pytest.mark.parametrize("height", SIZES)
def test_filter_equals_diffusers_fourier_filter(height):
    generator = torch.Generator().manual_seed(height)
    for width, threshold, scale in itertools.product(SIZES, THRESHOLDS, SCALES):
        x = torch.randn(2, 3, height, width, generator=generator)
        out = gate(scale, threshold).filter_skip(x)
        assert out.shape == x.shape and out.dtype == x.dtype
        assert_matches(out, fourier_filter(x, threshold=threshold, scale=scale), x)


@pytest.mark.parametrize(
    "shape,threshold",
    [((3, 5, 16, 16), 1), ((2, 4, 8, 12), 2), ((2, 3, 7, 9), 1), ((2, 3, 3, 5), 2), ((1, 2, 2, 2), 3)],
)
@pytest.mark.parametrize("scale", [0.2, 0.9, 1.5])
def test_gradient_equals_autograd_through_fourier_filter(shape, threshold, scale):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator)
    upstream = torch.randn(shape, generator=generator)
    grads = []
    for fn in (gate(scale, threshold).filter_skip, lambda t: fourier_filter(t, threshold, scale)):
        leaf = x.clone().requires_grad_(True)
        (fn(leaf) * upstream).sum().backward()
        grads.append(leaf.grad)
    assert_matches(grads[0], grads[1], upstream)


def test_gate_forward_and_backward_equal_apply_freeu():
    generator = torch.Generator().manual_seed(1)
    main = torch.randn(3, 6, 16, 12, generator=generator)
    skip = torch.randn(3, 4, 16, 12, generator=generator)
    upstream_main = torch.randn(main.shape, generator=generator)
    upstream_skip = torch.randn(skip.shape, generator=generator)
    b, s = 1.3, 0.9
    results = []
    for fn in (
        gate(s, backbone=b),
        lambda m, k: apply_freeu(0, m.clone(), k, b1=b, s1=s, b2=1.0, s2=1.0),
    ):
        leaf_main, leaf_skip = main.clone().requires_grad_(True), skip.clone().requires_grad_(True)
        out_main, out_skip = fn(leaf_main, leaf_skip)
        ((out_main * upstream_main).sum() + (out_skip * upstream_skip).sum()).backward()
        results.append((out_main, out_skip, leaf_main.grad, leaf_skip.grad))
    (main_a, skip_a, gmain_a, gskip_a), (main_b, skip_b, gmain_b, gskip_b) = results
    torch.testing.assert_close(main_a, main_b, atol=0, rtol=0)  # the backbone factor is bit-exact
    torch.testing.assert_close(gmain_a, gmain_b, atol=0, rtol=0)
    assert_matches(skip_a, skip_b, skip)
    assert_matches(gskip_a, gskip_b, upstream_skip)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes_match_diffusers(dtype):
    generator = torch.Generator().manual_seed(2)
    main = torch.randn(2, 5, 8, 8, generator=generator).to(dtype)
    skip = torch.randn(2, 4, 8, 8, generator=generator).to(dtype)
    b, s = 0.9, 0.3  # 0.9 is not representable in half precision: applied in float32, as diffusers
    out_main, out_skip = gate(s, backbone=b)(main, skip)
    assert out_main.dtype == dtype and out_skip.dtype == dtype
    ref_main = main.clone()
    ref_main[:, :2] = ref_main[:, :2] * b
    assert torch.equal(out_main, ref_main)
    # diffusers filters half precision in float32 (float64 too) and casts back: at most one rounding apart.
    ref_skip = fourier_filter(skip, threshold=1, scale=s)
    tolerance = 1e-5 if dtype == torch.float64 else torch.finfo(dtype).eps
    torch.testing.assert_close(out_skip.double(), ref_skip.double(), rtol=tolerance, atol=tolerance * 4)


def test_autocast_keeps_the_filter_in_float32():
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gate(0.5).filter_skip(x)
    assert out.dtype == torch.float32
    assert_matches(out, fourier_filter(x, threshold=1, scale=0.5), x)


def test_operator_paths_low_rank_dense_and_fft_fallback():
    cases = {(16, 16, 1): "low-rank", (4, 3, 2): "dense", (64, 64, 16): "fft"}
    for (height, width, threshold), path in cases.items():
        operator = _fourier_window_operator(height, width, threshold, torch.device("cpu"), torch.float32)
        kind = "fft" if operator is None else "dense" if operator[1] is None else "low-rank"
        assert kind == path, (height, width, threshold)
        x = torch.randn(2, 2, height, width, generator=torch.Generator().manual_seed(4))
        assert_matches(gate(0.4, threshold).filter_skip(x), fourier_filter(x, threshold, 0.4), x)
    # FreeU's threshold 1 at 16 x 16: frequencies {-1, 0}^2, 7 real basis functions.
    left, right = _fourier_window_operator(16, 16, 1, torch.device("cpu"), torch.float32)
    assert left.shape == (256, 7) and right.shape == (7, 256)


def test_cache_built_under_inference_mode_serves_training():
    g = gate(0.7, threshold=2, backbone=1.2)
    main, skip = torch.randn(2, 4, 11, 13), torch.randn(2, 4, 11, 13)
    with torch.inference_mode():
        g(main, skip)
    leaf_main, leaf_skip = main.clone().requires_grad_(True), skip.clone().requires_grad_(True)
    out_main, out_skip = g(leaf_main, leaf_skip)
    (out_main.sum() + out_skip.sum()).backward()
    assert leaf_main.grad is not None and leaf_skip.grad is not None


def test_gate_built_under_inference_mode_serves_training():
    with torch.inference_mode():  # e.g. apply_skip_spec inside a sampling loop
        g = gate(0.7, backbone=1.2)
    main, skip = torch.randn(2, 6, 8, 8, requires_grad=True), torch.randn(2, 4, 8, 8, requires_grad=True)
    out_main, out_skip = g(main, skip)  # the constants built at construction, at the configured size
    (out_main.sum() + out_skip.sum()).backward()
    assert main.grad is not None and skip.grad is not None


def test_non_contiguous_input_and_identity_factors():
    x = torch.randn(2, 4, 6, 10).to(memory_format=torch.channels_last)
    assert_matches(gate(0.3).filter_skip(x), fourier_filter(x, 1, 0.3), x)
    main, skip = torch.randn(2, 6, 8, 8), torch.randn(2, 4, 8, 8)
    out_main, out_skip = build_gate({"mode": "fourier"}, INFO)(main, skip)  # b = s = 1
    assert out_main is main and out_skip is skip


def test_operator_for_the_configured_resolution_is_built_with_the_gate():
    # Built at construction (INFO.resolution = 8), so a compiled forward never builds one.
    g = gate(0.4, backbone=1.3)
    assert g.operator_left.shape == (64, 7) and g.operator_right.shape == (7, 64)
    assert g.backbone_factor.shape == (1, INFO.main_channels, 1, 1)
    assert "operator_left" not in g.state_dict()  # derived from the config, never saved
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    assert_matches(g.filter_skip(x), fourier_filter(x, 1, 0.4), x)
    # Factors of 1 need no constants; a model without a sample_size builds them on first use.
    assert gate(1.0).operator_left is None and gate(0.4).backbone_factor is None
    unsized = SkipInfo(index=0, up_block=0, layer=0, source="conv_in", resolution=0, skip_channels=4, main_channels=6)
    g = FourierGate(unsized, skip=0.4)
    assert g.operator_left is None
    assert_matches(g.filter_skip(x), fourier_filter(x, 1, 0.4), x)


def test_casting_the_gate_moves_its_constants_but_keeps_them_float32():
    g = gate(0.4, backbone=0.9).to(torch.bfloat16)
    assert g.operator_left.dtype == g.operator_right.dtype == g.backbone_factor.dtype == torch.float32
    main = torch.randn(2, 6, 8, 8, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    skip = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    out_main, out_skip = g(main, skip)
    ref_main = main.clone()
    ref_main[:, :3] = ref_main[:, :3] * 0.9
    assert torch.equal(out_main, ref_main)
    eps = torch.finfo(torch.bfloat16).eps
    torch.testing.assert_close(out_skip.double(), fourier_filter(skip, 1, 0.4).double(), rtol=eps, atol=4 * eps)
