"""A two-state Markov chain over an ordered sequence of skips (or residual blocks).

Skip k (in decoder order) has a state s_k in {0 = closed, 1 = open}. The chain is

    P(s_1) = pi,        P(s_k | s_{k-1}) = T_k       (T_k a 2x2 row-stochastic matrix)

and every example of a batch samples its own path s_1..s_K. The chain is an ``nn.Module`` whose
state lives in persistent buffers, so it is saved in safetensors with the model that owns it and
round-trips through ``save_pretrained`` / ``from_pretrained``.

Learning rule (:meth:`MarkovChain.update`, called after every training step with the batch's
paths and per-example losses). For skip k and each state a of skip k-1, the utility of opening
skip k is

    u_{k|a} = E[loss | s_k = closed, s_{k-1} = a] - E[loss | s_k = open, s_{k-1} = a]

(positive when opening helps). Each step estimates it from the batch as a difference of bucket
means d with weight w = n_closed * n_open / (n_closed + n_open) (the inverse variance of d, in
units of one example's variance), and keeps an exponential moving average weighted by those counts:

    W <- beta * W + w,        u <- (beta * W_old * u + w * d) / W

A bucket pair without examples leaves (u, W) unchanged. Skip 1 has no predecessor, so it has one
utility (both columns of row 0 hold the same numbers). After ``warmup_steps`` updates

    P(s_k = open | s_{k-1} = a) = clip(sigmoid((u_{k|a} / scale - c_k) / tau), p_min, p_max)

for every (k, a) whose two buckets have each seen ``min_count`` examples; ``scale`` is the running
standard deviation of the per-example loss (``normalize="std"``, so that c and tau are unitless
effect sizes) or 1 (``normalize="none"``, c and tau in loss units).

With several processes (``torch.distributed`` initialised) the per-bucket loss sums and counts are
all-reduced before any mean is taken, so every rank computes the same update from the same
numbers and all ranks keep identical chains, equal to one process seeing the whole global batch.

The same class gates UNet skips (through :class:`skipdiff.skips.router.SkipRouter`) and classifier
residual blocks.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import torch
from torch import nn

from ..config import MARKOV_P_MAX, MARKOV_P_MIN
from ..seeding import rank_share, uniform

CLOSED, OPEN = 0, 1


NORMALIZATIONS = ("std", "none")


class MarkovChain(nn.Module):
    """Two-state chain over ``num_links`` ordered gates, with the utility learning rule.

    Args:
        num_links: K, the number of gated skips or blocks, in the order they are used.
        p_init: initial P(open) for pi and for every row of every T_k; kept during warm-up. 0.8
            (the stochastic-depth default) keeps skips mostly open while the network learns to use them.
        p_min, p_max: bounds that every open probability is clipped to. 0.05 / 0.95 keep at least
            5% of examples in each state, so that every utility stays estimable and no skip stops
            receiving gradient.
        cost: c, the cost of an open skip: one number, or one per link (e.g. larger for
            high-resolution skips, which cost more compute). In loss standard deviations under
            ``normalize="std"``. 0 (default): open a skip exactly when it helps.
        temperature: tau > 0. 0.1: a utility of 0.3 standard deviations (a strong effect) already
            reaches sigmoid(3) = 0.95, while the estimation noise of the EMA at batch 64 (about
            0.025 sd) moves the logit by about 0.25.
        ema_decay: beta in [0, 1), decay per observed step of the utility EMA and of the loss
            statistics. 0.99: a window of about 100 observations.
        warmup_steps: number of first updates during which the probabilities stay at ``p_init`` while
            utilities are collected. 500: a small fraction of a diffusion run, enough for the
            network to start using its skips before they are judged.
        min_count: examples that each of the two buckets of a (k, a) cell must have seen before its
            utility is trusted; an untrusted row keeps its probability. 32.
        normalize: ``"std"`` divides utilities by the running std of the per-example loss
            (defaults transfer across losses and training phases); ``"none"`` uses raw loss units.
    """

    def __init__(
        self,
        num_links: int,
        p_init: float = 0.8,
        p_min: float = MARKOV_P_MIN,
        p_max: float = MARKOV_P_MAX,
        cost: float | Sequence[float] = 0.0,
        temperature: float = 0.1,
        ema_decay: float = 0.99,
        warmup_steps: int = 500,
        min_count: int = 32,
        normalize: str = "std",
    ):
        super().__init__()
        if num_links < 1:
            raise ValueError(f"a Markov chain needs at least one link, got num_links={num_links}")
        for name, value in (("p_init", p_init), ("p_min", p_min), ("p_max", p_max)):
            if not (_is_number(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"markov {name} must lie in [0, 1], got {value!r}")
        if not p_min <= p_init <= p_max:
            raise ValueError(f"markov needs p_min <= p_init <= p_max, got {p_min}, {p_init}, {p_max}")
        costs = list(cost) if isinstance(cost, list | tuple) else [cost] * num_links
        if len(costs) != num_links or not all(_is_number(c) for c in costs):
            raise ValueError(f"markov cost must be a number or {num_links} numbers (one per link), got {cost!r}")
        if not (_is_number(temperature) and temperature > 0):
            raise ValueError(f"markov temperature must be a positive number, got {temperature!r}")
        if not (_is_number(ema_decay) and 0.0 <= ema_decay < 1.0):
            raise ValueError(f"markov ema_decay must lie in [0, 1), got {ema_decay!r}")
        if not (isinstance(warmup_steps, int) and warmup_steps >= 0):
            raise ValueError(f"markov warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        if not (isinstance(min_count, int) and min_count >= 1):
            raise ValueError(f"markov min_count must be an integer >= 1, got {min_count!r}")
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"markov normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        self.num_links = num_links
        self.p_init, self.p_min, self.p_max = float(p_init), float(p_min), float(p_max)
        self.cost = tuple(float(c) for c in costs)
        self.temperature = float(temperature)
        self.ema_decay = float(ema_decay)
        self.warmup_steps = warmup_steps
        self.min_count = min_count
        self.normalize = normalize
        # All state is in persistent buffers (float or long), so it is saved in safetensors and loads
        # into a model that diffusers first builds on the meta device.
        # open_prob[0, a] = P(s_1 = open) (both columns equal: s_0 does not exist);
        # open_prob[k, a] = P(s_k = open | s_{k-1} = a) for k >= 1.
        self.register_buffer("open_prob", torch.full((num_links, 2), float(p_init)))
        # utility[k, a] = u_{k|a} in loss units, utility_weight[k, a] = W (the EMA of counts).
        self.register_buffer("utility", torch.zeros(num_links, 2))
        self.register_buffer("utility_weight", torch.zeros(num_links, 2))
        # counts[k, a, s]: examples seen with s_{k-1} = a, s_k = s (row 0: both a hold the same numbers).
        self.register_buffer("counts", torch.zeros(num_links, 2, 2, dtype=torch.long))
        # EMA of the per-example loss: [weight, mean, variance].
        self.register_buffer("loss_stats", torch.zeros(3))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("num_nonfinite", torch.zeros((), dtype=torch.long))

    @classmethod
    def from_options(cls, num_links: int, options: dict | None = None) -> MarkovChain:
        """Build a chain from an options dict (a model config's ``markov``), rejecting unknown keys."""
        options = dict(options or {})
        check_options(options)
        return cls(num_links, **options)

    def options(self) -> dict:
        """The resolved options, for writing next to a run's outputs."""
        return {
            "p_init": self.p_init,
            "p_min": self.p_min,
            "p_max": self.p_max,
            "cost": list(self.cost),
            "temperature": self.temperature,
            "ema_decay": self.ema_decay,
            "warmup_steps": self.warmup_steps,
            "min_count": self.min_count,
            "normalize": self.normalize,
        }

    # ---- the chain as matrices -----------------------------------------------------------------

    def initial(self) -> torch.Tensor:
        """pi = [P(s_1 = closed), P(s_1 = open)], shape (2,)."""
        p = self.open_prob[0, OPEN]
        return torch.stack([1 - p, p])

    def transitions(self) -> torch.Tensor:
        """T_k for k = 2..K, shape (K-1, 2, 2); row a is P(s_k = . | s_{k-1} = a)."""
        p = self.open_prob[1:]  # (K-1, 2)
        return torch.stack([1 - p, p], dim=-1)

    # ---- sampling and inference ----------------------------------------------------------------

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample one path per example: a float tensor (batch_size, K) of 0/1 on the chain's device."""
        uniforms = rank_share(lambda n: uniform(n, self.num_links, generator, device="cpu"), batch_size)
        uniforms = uniforms.to(self.open_prob.device)
        states = torch.empty_like(uniforms)
        previous = None
        for k in range(self.num_links):
            row = self.open_prob[k, OPEN].expand(batch_size) if previous is None else self.open_prob[k, previous]
            states[:, k] = (uniforms[:, k] < row).float()
            previous = states[:, k].long()
        return states

    def marginals(self) -> torch.Tensor:
        """P(s_k = open) for every k, shape (K,), by the forward recursion."""
        p_open = [self.open_prob[0, OPEN]]
        for k in range(1, self.num_links):
            p_open.append((1 - p_open[-1]) * self.open_prob[k, CLOSED] + p_open[-1] * self.open_prob[k, OPEN])
        return torch.stack(p_open)

    def map_path(self) -> torch.Tensor:
        """The most likely path (Viterbi), a float tensor (K,) of 0/1."""
        log_pi = torch.log(self.initial().clamp_min(1e-12))
        log_t = torch.log(self.transitions().clamp_min(1e-12))
        score = log_pi  # (2,) best log-probability of a path ending in each state
        backpointers = []
        for k in range(self.num_links - 1):
            candidates = score[:, None] + log_t[k]  # (from, to)
            score, best_from = candidates.max(dim=0)
            backpointers.append(best_from)
        # Backtracking with (1,) tensors, not Python ints: nothing is read to the host, so the MAP path
        # costs no device sync and stays inside a compiled graph.
        state = score.argmax().view(1)  # (1,)
        path = [state]
        for best_from in reversed(backpointers):
            state = best_from.gather(0, state)  # (1,); not best_from[state], which reads the index
            path.append(state)
        return torch.cat(path[::-1]).float()

    # ---- learning from per-example losses ------------------------------------------------------

    @torch.no_grad()
    def update(
        self, paths: torch.Tensor, losses: torch.Tensor, counted: torch.Tensor | None = None, check: bool = True
    ) -> None:
        """One step of the learning rule from a batch's sampled paths and per-example losses.

        Args:
            paths: (B, K) 0/1 states the batch was run with (unscaled, before any rescaling).
            losses: (B,) per-example loss, or any per-example signal where lower is better (e.g. the
                loss divided by its running mean at the example's timestep, which removes most of
                the timestep variance of diffusion losses). Non-finite values are left out and
                counted in ``num_nonfinite``.
            counted: a 0-d bool tensor; False makes the update a no-op (a training step that was skipped
                for a non-finite gradient), decided on the device.
            check: verify that ``paths`` holds only 0 and 1 (reads the device; the router, whose paths are
                the chain's own samples, skips it).

        Everything stays on the device (no host read), so a training step never waits for this update.
        Under ``torch.distributed`` every rank must call this once per step (it all-reduces).
        """
        if paths.ndim != 2 or paths.shape[1] != self.num_links:
            raise ValueError(f"paths must have shape (B, {self.num_links}), got {tuple(paths.shape)}")
        if losses.shape != paths.shape[:1]:
            raise ValueError(f"losses must have shape ({paths.shape[0]},) to match paths, got {tuple(losses.shape)}")
        if check and not bool(((paths == 0) | (paths == 1)).all()):
            raise ValueError(f"paths must hold 0/1 states, got values {paths.unique().tolist()}")
        stats = self._batch_statistics(paths, losses)
        if counted is not None:
            stats = stats * counted.to(stats.device, stats.dtype)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(stats, op=torch.distributed.ReduceOp.SUM)
        self._accumulate(stats)
        step = torch.ones((), dtype=torch.long, device=self.num_updates.device)
        self.num_updates += step if counted is None else counted.to(step.device).long()
        self._refresh_probabilities()

    def _batch_statistics(self, paths: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        """Sums that add up across processes, packed in one float64 vector:
        [bucket loss sums (K*4), bucket counts (K*4), n, sum loss, sum loss^2, non-finite count]."""
        # float64 on the loss's device (CUDA for NCCL); devices without float64 (MPS) use the CPU.
        device = losses.device if losses.device.type in ("cpu", "cuda") else torch.device("cpu")
        losses = losses.detach().to(device, torch.float64)
        finite = torch.isfinite(losses)
        losses = torch.where(finite, losses, torch.zeros_like(losses))
        weight = finite.to(torch.float64)  # (B,)
        current = paths.detach().to(device).long()  # (B, K)
        # s_{k-1} for every k; skip 1 has no predecessor and is filed under a = open, see _accumulate.
        previous = torch.cat([torch.ones_like(current[:, :1]), current[:, :-1]], dim=1)  # (B, K)
        bucket = nn.functional.one_hot(2 * previous + current, 4).to(torch.float64)  # (B, K, 4): 2a + s
        bucket = bucket * weight[:, None, None]
        sums = torch.einsum("bkj,b->kj", bucket, losses)  # (K, 4)
        counts = bucket.sum(dim=0)  # (K, 4)
        moments = torch.stack([weight.sum(), losses.sum(), (losses * losses).sum(), (~finite).sum().double()])
        return torch.cat([sums.flatten(), counts.flatten(), moments])

    def _accumulate(self, stats: torch.Tensor) -> None:
        """Fold all-reduced batch sums into the EMAs (see the module docstring), on the device."""
        K, beta = self.num_links, self.ema_decay
        stats = stats.to(self.utility.device)
        sums = stats[: 4 * K].view(K, 2, 2).clone()  # [k, a, s]
        counts = stats[4 * K : 8 * K].view(K, 2, 2).clone()
        n, total, total_sq, nonfinite = stats[8 * K :].unbind()
        sums[0, CLOSED], counts[0, CLOSED] = sums[0, OPEN], counts[0, OPEN]  # one utility for skip 1

        # Utilities: count-weighted EMA of the per-step difference of bucket means.
        means = sums / counts.clamp_min(1)  # (K, 2, 2)
        n_closed, n_open = counts[..., CLOSED], counts[..., OPEN]  # (K, 2)
        seen = (n_closed > 0) & (n_open > 0)
        difference = means[..., CLOSED] - means[..., OPEN]  # (K, 2): d, > 0 when opening helps
        step_weight = torch.where(seen, n_closed * n_open / (n_closed + n_open).clamp_min(1), 0.0)
        old_u = self.utility.to(torch.float64)
        old_w = self.utility_weight.to(torch.float64)
        new_w = torch.where(seen, beta * old_w + step_weight, old_w)
        new_u = torch.where(seen, (beta * old_w * old_u + step_weight * difference) / new_w.clamp_min(1e-300), old_u)
        self.utility.copy_(new_u)
        self.utility_weight.copy_(new_w)
        self.counts += counts.round().long()
        self.num_nonfinite += nonfinite.round().long()

        # Loss statistics: EMA of weight, mean and variance, combined as two weighted groups.
        old_n, old_mean, old_var = self.loss_stats.double().unbind()
        batch_mean = total / n.clamp_min(1e-300)
        batch_var = (total_sq / n.clamp_min(1e-300) - batch_mean**2).clamp_min(0.0)
        new_n = beta * old_n + n
        new_mean = (beta * old_n * old_mean + n * batch_mean) / new_n.clamp_min(1e-300)
        new_var = (
            beta * old_n * (old_var + (old_mean - new_mean) ** 2) + n * (batch_var + (batch_mean - new_mean) ** 2)
        ) / new_n.clamp_min(1e-300)
        updated = torch.stack([new_n, new_mean, new_var]).to(self.loss_stats.dtype)
        self.loss_stats.copy_(torch.where(n > 0, updated, self.loss_stats))

    def loss_std_tensor(self) -> torch.Tensor:
        """Running standard deviation of the per-example loss (1 before any update), a device tensor."""
        weight, _, variance = self.loss_stats.double().unbind()
        return torch.where(weight > 0, variance.clamp_min(0).sqrt(), torch.ones_like(variance))

    def loss_std(self) -> float:
        """:meth:`loss_std_tensor` as a float (reads the device)."""
        return float(self.loss_std_tensor())

    def scaled_utility(self) -> torch.Tensor:
        """u_{k|a} / scale, shape (K, 2): the utilities in the units of ``cost`` and ``temperature``."""
        if self.normalize == "std":
            return self.utility.double() / self.loss_std_tensor().clamp_min(1e-12)
        return self.utility.double()

    def _refresh_probabilities(self) -> None:
        """After warm-up, every (k, a) whose buckets have seen ``min_count`` examples takes its new P(open)."""
        cost = torch.tensor(self.cost, dtype=torch.float64, device=self.utility.device)  # (K,)
        logits = (self.scaled_utility() - cost[:, None]) / self.temperature  # (K, 2)
        target = torch.sigmoid(logits).clamp(self.p_min, self.p_max)
        trusted = self.counts.min(dim=-1).values >= self.min_count  # (K, 2)
        trusted = trusted & (self.num_updates > self.warmup_steps)
        self.open_prob.copy_(torch.where(trusted, target.to(self.open_prob.dtype), self.open_prob))

    # ---- reporting -----------------------------------------------------------------------------

    def state_summary(self) -> dict:
        """The chain's state as plain Python values, for JSON logs."""
        return {
            "num_updates": int(self.num_updates),
            "learning": int(self.num_updates) > self.warmup_steps,
            "initial": self.initial().tolist(),
            "transitions": self.transitions().tolist(),
            "open_prob": self.open_prob.tolist(),
            "utility": self.utility.tolist(),
            "scaled_utility": self.scaled_utility().tolist(),
            "utility_weight": self.utility_weight.tolist(),
            "counts": self.counts.tolist(),
            "loss_std": self.loss_std(),
            "num_nonfinite": int(self.num_nonfinite),
            "marginals": self.marginals().tolist(),
            "map_path": [int(s) for s in self.map_path().tolist()],
            "p_min": self.p_min,  # the clip: a transition probability equal to one of them is a bound, not learned
            "p_max": self.p_max,
        }

    def extra_repr(self) -> str:
        return (
            f"num_links={self.num_links}, p_min={self.p_min}, p_max={self.p_max}, cost={self.cost}, "
            f"temperature={self.temperature}, ema_decay={self.ema_decay}, warmup_steps={self.warmup_steps}, "
            f"normalize={self.normalize!r}"
        )


MARKOV_OPTIONS = tuple(
    name for name in inspect.signature(MarkovChain.__init__).parameters if name not in ("self", "num_links")
)


def check_options(options: dict | None) -> None:
    """Raise ``ValueError`` naming any key of a ``markov`` options dict that is not an option."""
    unknown = set(options or {}) - set(MARKOV_OPTIONS)
    if unknown:
        raise ValueError(f"unknown markov option(s) {sorted(unknown)}; options: {list(MARKOV_OPTIONS)}")


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
