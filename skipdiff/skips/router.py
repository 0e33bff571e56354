"""The one place where long skips meet the decoder.

Every up block of a diffusers UNet runs, for each of its resnets,
``hidden = torch.cat([hidden, skips.pop()], dim=1); hidden = resnet(hidden, temb)``.
:class:`SkipRouter` registers a forward pre-hook on each of those resnets: it splits the
concatenated input back into (backbone, skip), passes both through the skip's gate and
concatenates again. The UNet's own forward is untouched, so the same router works on
``UNet2DModel``, ``UNet2DConditionModel`` and :class:`~skipdiff.skips.unet.SkipUNet2DModel`, and a
``keep`` gate costs nothing (its hook returns at once).

A second pre-hook on the UNet itself notes the forward's timestep and starts a new forward pass: the
per-example states of stochastic gates (sampled once per forward, so that a Markov chain can sample
all skips of an example jointly) and the (B,) timesteps that timestep-dependent gates need are made
by the first resnet hook that asks for them. That pre-hook does no tensor work on purpose: under
``torch.compile`` a module's own hooks run as separate frames, and any op there would be a graph of
its own, while the resnet hooks are traced inside the UNet's graph.
The sampling itself is :func:`draw_gate_states`, which the classifiers' block gates
(:mod:`skipdiff.training.classifier.gates`) call too: one code path, one RNG discipline.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from ..seeding import rank_share, uniform
from .gate import SkipInfo, SkipSpec
from .markov import MarkovChain, check_options
from .spec import build_gate, format_entry, resolve_spec

INFERENCE_MODES = ("expected", "map", "sample")


def draw_gate_states(
    keep: torch.Tensor,
    batch_size: int,
    mode: str,
    *,
    generator: torch.Generator | None = None,
    chain: MarkovChain | None = None,
    chain_indices: Sequence[int] = (),
    rescale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-example states (B, K) of K gates with keep probabilities ``keep`` (K,), on ``keep``'s device,
    and the chain's unscaled 0/1 path (B, len(chain_indices)) when one was sampled (else None).

    ``mode="sample"``: every gate open with its keep probability, from uniforms (B, K) drawn on the CPU from
    ``generator`` (None: the global torch RNG) for the whole data-parallel batch (:func:`rank_share`);
    then the chain samples the columns ``chain_indices`` jointly from the same generator. ``"map"``: open
    where P(open) >= 0.5, the chain's columns on its Viterbi path. ``"expected"``: each state is its keep
    probability. Where ``rescale`` (K,) is True a state is divided by its keep probability (inverted
    dropout; E[state] = 1). ``sample`` and ``expected`` read nothing from the device (``map`` reads the
    chain's Viterbi path).
    """
    if mode not in INFERENCE_MODES:
        raise ValueError(f"unknown gate sampling mode {mode!r}; choose from {INFERENCE_MODES}")
    device, path = keep.device, None
    if mode == "sample":
        draws = rank_share(lambda n: uniform(n, keep.shape[0], generator), batch_size)  # (B, K)
        states = (draws.to(device) < keep).float()  # (B, K)
        if chain is not None:
            path = chain.sample(batch_size, generator)  # (B, K_chain), unscaled 0/1
            states[:, list(chain_indices)] = path.to(device)
    elif mode == "map":
        states = (keep >= 0.5).float().expand(batch_size, -1).clone()  # (B, K)
        if chain is not None:
            states[:, list(chain_indices)] = chain.map_path().to(device)
    else:  # expected: each gate is its marginal keep probability
        states = keep.expand(batch_size, -1).clone()  # (B, K)
    if rescale is not None:
        states = torch.where(rescale, states / keep.clamp_min(1e-6), states)
    return states, path


def discover_skips(unet: nn.Module) -> list[SkipInfo]:
    """List the long skips of a diffusers UNet in decoder (consumption) order.

    Works for any UNet whose forward collects ``down_block_res_samples`` as diffusers does:
    ``conv_in``'s output, then every down resnet's output and every downsampler's output; the
    decoder consumes them in reverse.
    """
    sources: list[tuple[str, int]] = [("conv_in", unet.conv_in.out_channels)]
    for b, block in enumerate(unet.down_blocks):
        for r, resnet in enumerate(block.resnets):
            sources.append((f"down_blocks.{b}.resnets.{r}", resnet.out_channels))
        for d, sampler in enumerate(block.downsamplers or []):
            sources.append((f"down_blocks.{b}.downsamplers.{d}", sampler.out_channels))

    sample_size = unet.config.sample_size
    height = sample_size[0] if isinstance(sample_size, list | tuple) else (sample_size or 0)
    height //= 2 ** sum(1 for block in unet.down_blocks if block.downsamplers)

    main_channels = unet.mid_block.resnets[-1].out_channels if unet.mid_block is not None else None
    skips: list[SkipInfo] = []
    for b, block in enumerate(unet.up_blocks):
        for r, resnet in enumerate(block.resnets):
            if main_channels is None:  # no mid block: the last down block's output is the input
                main_channels = sources[-1][1]
            source, channels = sources[-1 - len(skips)]
            # A resnet rebuilt for ``remove`` takes the backbone channels alone.
            if resnet.in_channels not in (main_channels + channels, main_channels):
                raise ValueError(
                    f"up_blocks.{b}.resnets.{r} takes {resnet.in_channels} channels, expected "
                    f"{main_channels} (backbone) + {channels} (skip from {source}); unsupported UNet layout"
                )
            skips.append(SkipInfo(len(skips), b, r, source, height, channels, main_channels))
            main_channels = resnet.out_channels
        if block.upsamplers:
            height *= 2
    if len(skips) != len(sources):
        raise ValueError(f"the decoder consumes {len(skips)} skips but the encoder makes {len(sources)}")
    return skips


def batch_timesteps(timestep, batch_size: int, device: torch.device) -> torch.Tensor:
    """A forward's ``timestep`` argument as a (B,) tensor on ``device``: a number, a 0-d or a (1,) tensor
    is broadcast to the batch, as diffusers' UNets do; a (B,) tensor is kept (no value is read)."""
    if timestep is None:
        raise RuntimeError("a timestep-dependent skip gate needs the UNet's timestep argument, got none")
    if not torch.is_tensor(timestep):
        timestep = torch.tensor(timestep, device=device)
    timestep = timestep.to(device).reshape(-1)  # (1,) or (B,)
    if timestep.shape[0] == 1:
        return timestep.expand(batch_size)
    if timestep.shape[0] != batch_size:
        raise ValueError(f"the timestep has {timestep.shape[0]} values for a batch of {batch_size}")
    return timestep


class _ResnetHook:
    """Forward pre-hook on the resnet that receives skip ``index``: gate (backbone, skip)."""

    def __init__(self, router: SkipRouter, index: int):
        self.router, self.index = router, index

    def __call__(self, module, args, kwargs):
        router, index = self.router, self.index
        gate = router.gates[index]
        if gate.is_identity and not router.record_norms:
            return None
        hidden, *rest = args
        split = router.skips[index].main_channels
        main, skip = hidden[:, :split], hidden[:, split:]
        if gate.is_identity:  # only the norms are wanted: the input goes on as it is (no split and re-cat)
            router.norms[index] = (main.detach().float().norm(), skip.detach().float().norm())
            return None
        state = router.state_of(index, hidden) if gate.stochastic else None
        timestep = router.timesteps_of(hidden) if gate.needs_timestep else None
        main, skip = gate(main, skip, state, timestep)
        if router.record_norms:
            router.norms[index] = (main.detach().float().norm(), skip.detach().float().norm())
        return (torch.cat([main, skip], dim=1), *rest), kwargs


class SkipRouter(nn.Module):
    """Holds one gate per long skip (and the Markov chain, if any) and hooks them into a UNet.

    Args:
        skips: the UNet's skips, from :func:`discover_skips`.
        spec: a skip specification (see :mod:`skipdiff.skips.spec`).
        markov: options of the Markov chain shared by all ``markov`` gates (``p_init``, ``cost``,
            ``temperature``, ...: see :class:`~skipdiff.skips.markov.MarkovChain`). Unknown keys are refused
            even when no skip is ``markov``.

    Training with ``markov`` skips: after each training forward, call
    :meth:`update_chain` with that forward's per-example losses.
    """

    def __init__(self, skips: list[SkipInfo], spec: SkipSpec | None = "full", markov: dict | None = None):
        super().__init__()
        self.skips = list(skips)
        self.entries = resolve_spec(spec, self.skips)
        self.gates = nn.ModuleList(build_gate(e, info) for e, info in zip(self.entries, self.skips, strict=True))
        self.markov_indices = [g.info.index for g in self.gates if g.sampled_by_chain]
        check_options(markov)
        self.chain = MarkovChain(len(self.markov_indices), **(markov or {})) if self.markov_indices else None
        self.last_path: torch.Tensor | None = None  # (B, K_markov) 0/1 path of the last training forward
        self.inference = "expected"
        self.inference_generator: torch.Generator | None = None
        # Per-example state of each stochastic gate in this forward (None: not sampled yet).
        self.states: dict[int, torch.Tensor] | None = {}
        self._has_stochastic = any(g.stochastic for g in self.gates)
        self.timesteps: torch.Tensor | None = None  # (B,) timesteps of this forward, once a gate asked
        self._timestep = None  # the forward's timestep argument as given (tensor or number)
        self.record_norms = False
        self.norms: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles: list = []

    # ---- hooking into a UNet -------------------------------------------------------------------

    def attach(self, unet: nn.Module) -> SkipRouter:
        """Register the hooks on ``unet``; returns self so that ``detach()`` can undo it."""
        if self._handles:
            raise RuntimeError("this SkipRouter is already attached; call detach() first")
        self._handles.append(unet.register_forward_pre_hook(self._begin_forward, with_kwargs=True))
        for info in self.skips:
            resnet = unet.up_blocks[info.up_block].resnets[info.layer]
            self._handles.append(resnet.register_forward_pre_hook(_ResnetHook(self, info.index), with_kwargs=True))
        return self

    def detach(self) -> None:
        """Remove every hook this router registered."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    # ---- stochastic gates ----------------------------------------------------------------------

    def set_inference(self, mode: str, seed: int | None = None) -> None:
        """How stochastic gates behave in eval mode: ``expected``, ``map`` or ``sample`` (seeded)."""
        if mode not in INFERENCE_MODES:
            raise ValueError(f"unknown inference mode {mode!r}; choose from {INFERENCE_MODES}")
        self.inference = mode
        self.inference_generator = torch.Generator().manual_seed(seed or 0) if mode == "sample" else None

    def _begin_forward(self, unet, args, kwargs):
        # No tensor work here (see the module docstring): only note the inputs of this forward.
        self._timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        self.states = None if self._has_stochastic else {}
        if self._has_stochastic and not self.training and self.inference == "sample":
            # Draws from a torch.Generator cannot be traced: sampled here, the graph break they cost
            # under torch.compile stays in this hook's frame instead of splitting the UNet's graph.
            sample = args[0] if args else kwargs["sample"]
            self.states = self.sample_states(sample.shape[0], sample.device)
        self.timesteps = None
        self.norms = {}
        return None

    def state_of(self, index: int, hidden: torch.Tensor) -> torch.Tensor | None:
        """The state of stochastic skip ``index`` in this forward; the first call samples every skip's."""
        if self.states is None:
            self.states = self.sample_states(hidden.shape[0], hidden.device)
        return self.states.get(index)

    def timesteps_of(self, hidden: torch.Tensor) -> torch.Tensor:
        """This forward's timesteps as a (B,) tensor on ``hidden``'s device (made on the first call)."""
        if self.timesteps is None:
            self.timesteps = batch_timesteps(self._timestep, hidden.shape[0], hidden.device)
        return self.timesteps

    def sample_states(self, batch_size: int, device: torch.device) -> dict[int, torch.Tensor]:
        """Per-example states (B,) of every stochastic gate for one forward pass, made on the device
        without reading it (so a training step never waits for the host).

        Training draws 0/1 states from the global torch RNG; eval mode follows ``self.inference``.
        Rescaling (inverted dropout) divides a kept skip by its keep probability; for ``markov``
        skips that is the marginal P(s_k = open), so E[s_k / P(s_k = open)] = 1 over the chain, and
        ``expected`` inference (state = marginal) gives exactly 1. ``map`` and ``sample`` give 0 or
        1 / P(open), the values the skip took in training.
        """
        stochastic = [g for g in self.gates if g.stochastic]
        if not stochastic:
            return {}
        keep = self.keep_probabilities().to(device)  # (K,)
        rescale = torch.tensor([bool(g.stochastic and g.rescale) for g in self.gates], device=device)
        mode = "sample" if self.training else self.inference
        generator = None if self.training else self.inference_generator
        states, path = draw_gate_states(
            keep,
            batch_size,
            mode,
            generator=generator,
            chain=self.chain,
            chain_indices=self.markov_indices,
            rescale=rescale,
        )
        if self.training and path is not None:
            self.last_path = path  # (B, K_markov), for update_chain
        return {g.info.index: states[:, g.info.index] for g in stochastic}

    def update_chain(self, losses: torch.Tensor, counted: torch.Tensor | None = None) -> None:
        """Update the Markov chain from the per-example losses (B,) of the last training forward.

        Uses the path sampled by that forward (:attr:`last_path`) and then forgets it, so one
        forward feeds the chain once. ``counted=False`` (a 0-d bool tensor: the step was skipped) makes it
        a no-op on the device. Under ``torch.distributed`` every rank must call this each step.
        """
        if self.chain is None:
            raise RuntimeError("update_chain needs markov skips; this router has none")
        if self.last_path is None:
            raise RuntimeError("update_chain needs a training-mode forward first (no sampled path is stored)")
        if losses.shape != self.last_path.shape[:1]:
            raise ValueError(
                f"losses must have shape ({self.last_path.shape[0]},), one per example of the last "
                f"training forward, got {tuple(losses.shape)}"
            )
        self.chain.update(self.last_path, losses, counted=counted, check=False)
        self.last_path = None

    def keep_probabilities(self) -> torch.Tensor:
        """P(open) of every skip, shape (K,): 1 for deterministic gates, each stochastic gate's own keep
        probability, the chain's marginals for Markov gates (a device tensor; nothing is read)."""
        device = self.chain.open_prob.device if self.chain is not None else torch.device("cpu")
        keep = torch.tensor([g.keep_probability() for g in self.gates], dtype=torch.float32, device=device)
        if self.chain is not None:
            keep[self.markov_indices] = self.chain.marginals().to(keep.dtype)
        return keep

    def recommended_spec(self) -> list[dict]:
        """The deterministic configuration this router recommends: stochastic gates under ``map``."""
        keep = self.keep_probabilities().tolist()
        if self.chain is not None:
            for j, state in zip(self.markov_indices, self.chain.map_path().tolist(), strict=True):
                keep[j] = state
        return [
            {"mode": "keep" if keep[g.info.index] >= 0.5 else "zero"} if g.stochastic else dict(e)
            for g, e in zip(self.gates, self.entries, strict=True)
        ]

    # ---- reporting -----------------------------------------------------------------------------

    def describe(self) -> list[dict]:
        """One dict per skip: index, receiving resnet, source, resolution, channels, mode."""
        keep = self.keep_probabilities().tolist()
        return [
            {
                **dataclasses.asdict(info),
                "gate": format_entry(entry),
                "p_open": keep[info.index],
            }
            for info, entry in zip(self.skips, self.entries, strict=True)
        ]

    def telemetry(self) -> dict[str, float]:
        """Flat scalars for logs: every gate's own telemetry and P(open) of stochastic skips."""
        out: dict[str, float] = {}
        for gate in self.gates:
            for key, value in gate.telemetry().items():
                out[f"skip{gate.info.index}/{key}"] = value
        if self.chain is not None:
            marginals = self.chain.marginals().tolist()
            open_prob = self.chain.open_prob.tolist()
            utility = self.chain.scaled_utility().tolist()
            for m, j in enumerate(self.markov_indices):
                out[f"skip{j}/p_open"] = marginals[m]
                out[f"skip{j}/p_open_if_prev_closed"] = open_prob[m][0]
                out[f"skip{j}/p_open_if_prev_open"] = open_prob[m][1]
                out[f"skip{j}/utility_if_prev_closed"] = utility[m][0]
                out[f"skip{j}/utility_if_prev_open"] = utility[m][1]
        return out

    def norm_ratios(self) -> dict[str, float]:
        """|skip| / |backbone| of every skip in the last forward with ``record_norms`` (one host read)."""
        if not self.norms:
            return {}
        ratios = torch.stack([s / m.clamp_min(1e-12) for m, s in self.norms.values()]).tolist()
        return {str(k): r for k, r in zip(self.norms, ratios, strict=True)}

    def markov_summary(self) -> dict | None:
        """The chain's full state for JSON logs (:meth:`MarkovChain.state_summary`) with the UNet
        skip index of each link; None without markov skips."""
        if self.chain is None:
            return None
        return {"skips": list(self.markov_indices), **self.chain.state_summary()}


def format_skip_table(rows: list[dict]) -> str:
    """A fixed-width text table of :meth:`SkipRouter.describe` rows."""
    header = f"{'skip':>4}  {'up block.resnet':<15} {'source':<28} {'res':>4} {'skip ch':>7} {'main ch':>7}  gate"
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row['index']:>4}  {row['up_block']}.{row['layer']:<13} {row['source']:<28} {row['resolution']:>4} "
            f"{row['skip_channels']:>7} {row['main_channels']:>7}  {row['gate']}"
        )
    return "\n".join(lines)
