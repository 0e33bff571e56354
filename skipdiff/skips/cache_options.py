"""Options of feature caching across sampling steps, and the refresh schedule they define (no torch).

:class:`SkipCacheOptions` is what an entry point inherits (its flags are ``--cache``,
``--cache_branch``, ...) and what :func:`skipdiff.skips.caching.enable_skip_cache` takes. This module
imports nothing heavy, so command lines can check the options and answer ``--help`` at once; the
caching itself is :mod:`skipdiff.skips.caching`.

A *refresh* step (a *key* step in Faster Diffusion's words) runs the whole UNet and keeps its deep
features; the other steps reuse them. Steps are counted from 0 within one sampling run:

- ``uniform``: every ``interval``-th step, ``0, N, 2N, ...`` (DeepCache's uniform schedule);
- ``non_uniform``: as many refreshes as ``uniform`` (``ceil(T / N)``, so the same FLOPs), placed
  densest around ``center`` (a fraction of the run) and sparser towards both ends, the gaps growing
  like ``|s - c| ** (1 - 1/power)``: DeepCache's observation that the features change fastest there,
  in a closed form instead of its search over powers;
- ``key_steps``: an explicit list (Faster Diffusion's for DDIM-50 on Stable Diffusion is
  :data:`FASTER_DIFFUSION_SD_KEY_STEPS`), which overrides both.
"""

from __future__ import annotations

import dataclasses
import math

from ..config import option

MODES = ("skip_branch", "encoder_propagation")
SCHEDULES = ("uniform", "non_uniform")

# Faster Diffusion's key steps for Stable Diffusion with DDIM-50 (their "50ls" setting, Li et al. 2024).
FASTER_DIFFUSION_SD_KEY_STEPS = (0, 1, 2, 3, 5, 10, 15, 25, 35)


@dataclasses.dataclass
class SkipCacheOptions:
    """How a UNet's features are cached across sampling steps; ``cache=None`` leaves the UNet alone."""

    cache: str | None = option(
        None,
        "skip_branch (DeepCache: cached steps run the encoder down to --cache_branch and the decoder from "
        "it upwards) or encoder_propagation (Faster Diffusion: cached steps run only the decoder); "
        "none when unset",
        choices=MODES,
    )
    cache_branch: int | None = option(
        None,
        "skip_branch: the long skip (skipdiff's index, 0 = innermost, K-1 = outermost from conv_in) whose "
        "receiving resnet is the first decoder layer that runs on cached steps; default K-1, DeepCache's "
        "branch 0 (the cheapest cached step)",
    )
    cache_interval: int = option(3, "refresh every N-th step (1 = no reuse, bit-identical to no caching)")
    cache_schedule: str = option("uniform", "where the refreshes fall: uniform or non_uniform", choices=SCHEDULES)
    cache_center: float = option(0.3, "non_uniform: where refreshes are densest, as a fraction of the run")
    cache_power: float = option(1.4, "non_uniform: how strongly refreshes crowd at the center (1 = evenly spread)")
    cache_key_steps: list[int] | None = option(
        None, "explicit refresh (key) steps, counted from 0; must contain 0; overrides interval and schedule"
    )

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad value. The branch's upper bound depends on the UNet
        and is checked when the cache is put on one."""
        if self.cache is not None and self.cache not in MODES:
            raise ValueError(f"--cache must be one of {MODES} or unset, got {self.cache!r}")
        if self.cache_schedule not in SCHEDULES:
            raise ValueError(f"--cache_schedule must be one of {SCHEDULES}, got {self.cache_schedule!r}")
        for name in ("cache_interval", "cache_branch"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"--{name} must be an integer, got {value!r}")
        if self.cache_interval < 1:
            raise ValueError(f"--cache_interval must be >= 1, got {self.cache_interval}")
        if self.cache_branch is not None and self.cache_branch < 0:
            raise ValueError(f"--cache_branch must be >= 0, got {self.cache_branch}")
        if self.cache_branch is not None and self.cache == "encoder_propagation":
            raise ValueError(
                f"--cache_branch {self.cache_branch} is for skip_branch caching; encoder_propagation reuses "
                "every skip and the mid block"
            )
        if not (math.isfinite(self.cache_center) and 0.0 <= self.cache_center <= 1.0):
            raise ValueError(f"--cache_center must lie in [0, 1], got {self.cache_center}")
        if not (math.isfinite(self.cache_power) and self.cache_power >= 1.0):
            raise ValueError(f"--cache_power must be a finite number >= 1, got {self.cache_power}")
        if self.cache_key_steps is not None:
            steps = list(self.cache_key_steps)
            bad = [s for s in steps if isinstance(s, bool) or not isinstance(s, int) or s < 0]
            if bad:
                raise ValueError(f"--cache_key_steps must be step indices >= 0, got {bad}")
            if len(set(steps)) != len(steps):
                raise ValueError(f"--cache_key_steps has repeated steps: {steps}")
            if 0 not in steps:
                # Step 0 has nothing to reuse; refreshing it anyway would silently change the schedule.
                raise ValueError(f"--cache_key_steps must contain step 0 (nothing is cached before it), got {steps}")

    @property
    def enabled(self) -> bool:
        return self.cache is not None


def refresh_steps(options: SkipCacheOptions, num_steps: int) -> list[int]:
    """The steps of a ``num_steps``-step run that run the whole UNet, in increasing order."""
    if num_steps < 1:
        raise ValueError(f"a sampling run needs >= 1 step, got {num_steps}")
    if options.cache_key_steps is not None:
        return sorted(s for s in options.cache_key_steps if s < num_steps)
    if options.cache_schedule == "uniform" or options.cache_interval == 1:
        return list(range(0, num_steps, options.cache_interval))
    count = math.ceil(num_steps / options.cache_interval)
    return non_uniform_steps(num_steps, count, options.cache_center, options.cache_power)


def non_uniform_steps(num_steps: int, count: int, center: float, power: float) -> list[int]:
    """``count`` distinct steps in ``[0, num_steps)``, step 0 first, densest around ``center * num_steps``.

    Points evenly spaced in the warped coordinate ``w(s) = sign(s - c) |s - c| ** (1 / power)`` map
    back to steps whose spacing shrinks near ``c``; ``power = 1`` spreads them evenly. Rounding
    collisions are resolved by pushing later steps forward (and earlier ones back near the end), so
    the count is exact.
    """
    if not 1 <= count <= num_steps:
        raise ValueError(f"cannot place {count} refresh steps in a run of {num_steps}")
    c = center * num_steps

    def warp(s: float) -> float:
        return math.copysign(abs(s - c) ** (1.0 / power), s - c)

    low, high = warp(0.0), warp(float(num_steps))
    steps = []
    for k in range(count):
        w = low + k * (high - low) / count
        steps.append(round(c + math.copysign(abs(w) ** power, w)))
    steps[0] = 0
    for k in range(1, count):  # strictly increasing...
        steps[k] = max(steps[k], steps[k - 1] + 1)
    for k in range(count - 1, 0, -1):  # ...and inside the run
        steps[k] = min(steps[k], num_steps - count + k)
    return steps
