"""The stochastic gates: open or closed per example, with a state the router samples once per forward.

``bernoulli`` (stochastic depth for skips) and ``markov`` (a chain along the decoder, sampled jointly by
the router's :class:`~skipdiff.skips.markov.MarkovChain`).
"""

from __future__ import annotations

from .gate import SkipGate, SkipInfo, _as_bool, _probability, register_gate


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
    """Open or closed according to a Markov chain along the decoder (see :mod:`skipdiff.skips.markov`).

    The gate itself only applies the state; the chain that samples the states of all ``markov``
    skips jointly lives in the router, because skip k's state depends on skip k-1's (its keep
    probability is the chain's marginal, which the router fills in).
    """

    sampled_by_chain = True

    def keep_probability(self) -> float:
        return 1.0  # a placeholder: the router uses the chain's marginal
