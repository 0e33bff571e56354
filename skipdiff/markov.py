"""A two-state Markov chain over an ordered sequence of skips (or residual blocks).

Skip k (in decoder order) has a state s_k in {0 = closed, 1 = open}. The chain is

    P(s_1) = pi,        P(s_k | s_{k-1}) = T_k       (T_k a 2x2 row-stochastic matrix)

and every example of a batch samples its own path s_1..s_K. The chain is an ``nn.Module`` whose
state lives in persistent buffers, so it is saved in safetensors with the model that owns it and
round-trips through ``save_pretrained`` / ``from_pretrained``.

The same class gates UNet skips (through :class:`skipdiff.router.SkipRouter`) and classifier
residual blocks.
"""

from __future__ import annotations

import math

import torch
from torch import nn

CLOSED, OPEN = 0, 1


class MarkovChain(nn.Module):
    """Two-state chain over ``num_links`` ordered gates.

    Args:
        num_links: K, the number of gated skips or blocks, in the order they are used.
        p_init: initial P(open) for pi and for every row of every T_k.
        p_min, p_max: bounds that every open probability is clipped to.
    """

    def __init__(self, num_links: int, p_init: float = 0.8, p_min: float = 0.05, p_max: float = 0.95):
        super().__init__()
        if num_links < 1:
            raise ValueError(f"a Markov chain needs at least one link, got num_links={num_links}")
        for name, value in (("p_init", p_init), ("p_min", p_min), ("p_max", p_max)):
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"markov {name} must lie in [0, 1], got {value!r}")
        if not p_min <= p_init <= p_max:
            raise ValueError(f"markov needs p_min <= p_init <= p_max, got {p_min}, {p_init}, {p_max}")
        self.num_links = num_links
        self.p_min, self.p_max = float(p_min), float(p_max)
        # open_prob[0, a] = P(s_1 = open) (both columns equal: s_0 does not exist);
        # open_prob[k, a] = P(s_k = open | s_{k-1} = a) for k >= 1.
        self.register_buffer("open_prob", torch.full((num_links, 2), float(p_init)))

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
        uniforms = torch.rand(batch_size, self.num_links, generator=generator, device="cpu")
        uniforms = uniforms.to(self.open_prob.device)
        states = torch.empty_like(uniforms)
        previous = None
        for k in range(self.num_links):
            row = (
                self.open_prob[k, OPEN].expand(batch_size)
                if previous is None
                else self.open_prob[k, previous]
            )
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
        state = int(score.argmax())
        path = [state]
        for best_from in reversed(backpointers):
            state = int(best_from[state])
            path.append(state)
        return torch.tensor(path[::-1], dtype=torch.float32, device=self.open_prob.device)

    def extra_repr(self) -> str:
        return f"num_links={self.num_links}, p_min={self.p_min}, p_max={self.p_max}"
