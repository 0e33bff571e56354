"""Per-example gates of a classifier's residual blocks, passed to the model as ``block_gates`` (B, K).

``bernoulli``: every gate open independently with ``keep_prob`` (stochastic depth, Huang et al. 2016).
``markov``: one path of a :class:`~skipdiff.skips.markov.MarkovChain` per example, the chain learning from the
per-example losses (:meth:`BlockGates.update`), as it does for a UNet's skips.

The states come from :func:`skipdiff.skips.router.draw_gate_states`, the code the UNet's
:class:`~skipdiff.skips.router.SkipRouter` samples its stochastic skips with: the same draws, in the same order,
for the whole data-parallel batch (each process keeps its slice). The loop seeds the generator per step
with :func:`skipdiff.seeding.derived_seed`, so the same seed gives the same gates and a resumed run
continues them without having saved a generator.
"""

from __future__ import annotations

import torch

from ...skips.markov import MarkovChain
from ...skips.router import draw_gate_states


class BlockGates:
    """The block gates of one run (``kind``: ``none``, ``bernoulli`` or ``markov``) over ``num_blocks`` blocks.

    With ``rescale`` an open gate is ``1 / P(open)`` (the marginal for Markov), so E[gate] = 1 and evaluation
    runs with every gate open (the router's ``expected`` states, which are exactly 1 after rescaling); without
    it, evaluation uses the soft gates ``P(open)``.
    """

    def __init__(self, kind: str, num_blocks: int, keep_prob: float, rescale: bool, markov: dict | None):
        self.kind, self.num_blocks, self.keep_prob, self.rescale = kind, num_blocks, keep_prob, rescale
        self.chain = MarkovChain.from_options(num_blocks, markov) if kind == "markov" else None
        self.last_path: torch.Tensor | None = None  # (B, K) 0/1 path of the last sample, for update()

    def keep_probabilities(self) -> torch.Tensor:
        """P(gate k open), shape (K,), on the chain's device (CPU without a chain); nothing is read."""
        if self.chain is not None:
            return self.chain.marginals().detach().float()
        return torch.full((self.num_blocks,), float(self.keep_prob))

    def sample(self, batch_size: int, generator: torch.Generator) -> torch.Tensor | None:
        """Training gates (B, K) for one step drawn from ``generator``; None for ``none``.

        Remembers a Markov path for :meth:`update`."""
        if self.kind == "none":
            return None
        keep = self.keep_probabilities()  # (K,)
        rescale = torch.full((self.num_blocks,), self.rescale, dtype=torch.bool, device=keep.device)
        chain_indices = range(self.num_blocks) if self.chain is not None else ()
        gates, self.last_path = draw_gate_states(
            keep,
            batch_size,
            "sample",
            generator=generator,
            chain=self.chain,
            chain_indices=chain_indices,
            rescale=rescale,
        )
        return gates  # (B, K)

    def eval_gates(self, batch_size: int) -> torch.Tensor | None:
        """Gates for evaluation: None (every gate open) or the soft gates P(open), (B, K)."""
        if self.kind == "none" or self.rescale:
            return None
        return draw_gate_states(self.keep_probabilities(), batch_size, "expected")[0]

    def update(self, losses: torch.Tensor, counted: torch.Tensor | None = None) -> None:
        """Feed the chain the last sampled paths and their per-example losses (B,); a no-op without a chain.

        ``counted=False`` (0-d bool: the step was skipped) makes it a no-op on the device. No host read: the
        paths are the chain's own samples, so their 0/1 check is skipped."""
        if self.chain is None:
            return
        if self.last_path is None:
            raise RuntimeError("BlockGates.update needs a sample() first (no sampled path is stored)")
        self.chain.update(self.last_path.to(losses.device), losses, counted=counted, check=False)
        self.last_path = None

    def summary(self) -> dict:
        """The gates' state for stats.jsonl: keep probability per block, and the chain's learning state."""
        record = {"keep_prob": {f"blocks.{k}": p for k, p in enumerate(self.keep_probabilities().tolist())}}
        if self.chain is not None:
            updates = int(self.chain.num_updates)
            record["markov_num_updates"] = updates
            record["markov_learning"] = updates > self.chain.warmup_steps
        return record


def gate_kwargs(gates: torch.Tensor | None, device: torch.device) -> dict:
    """The model's ``block_gates`` keyword (on ``device``), or nothing when every gate is open."""
    return {} if gates is None else {"block_gates": gates.to(device)}
