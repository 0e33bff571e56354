"""Caching UNet features across sampling steps: skip-branch caching and encoder propagation.

Long skips are what make a UNet's deep features reusable from one sampling step to the next: the
shallow path, fed by the outermost skips, carries the detail that changes every step, while the
deep features change slowly. Two ways to exploit that, both for ``UNet2DModel``,
``UNet2DConditionModel`` and :class:`~skipdiff.skips.unet.SkipUNet2DModel`:

- ``skip_branch`` (DeepCache, Ma et al., CVPR 2024): on a refresh step the whole UNet runs; on the
  other steps only the encoder down to the source of skip ``b`` and the decoder from the resnet
  that receives skip ``b`` upwards run, that resnet's backbone input being the one of the last
  refresh step. Branch ``b`` is skipdiff's skip index (:func:`skipdiff.skips.router.discover_skips`):
  skip ``b`` comes from ``source`` (``conv_in``, ``down_blocks.i.resnets.r`` or
  ``down_blocks.i.downsamplers.0``) and enters ``up_blocks[u].resnets[l]``. Reused are every
  encoder module after that source, the mid block, every up block before ``u`` and the first ``l``
  resnets (and attentions) of up block ``u``. ``b = K-1`` (``conv_in``'s skip, the default) is
  DeepCache's branch 0, the cheapest cached step; in general DeepCache's branch id ``i`` is
  ``b = K-1-i``.
- ``encoder_propagation`` (Faster Diffusion, Li et al., NeurIPS 2024): on non-key steps ``conv_in``,
  every down block and the mid block are reused, so every skip tensor and the mid-block output come
  from the last key step, and only the decoder runs. (Its parallel decoding of several non-key steps
  and its prior noise injection are not implemented: steps run one after another, as sampled.)

How compute is skipped: forward pre-hooks cannot skip compute, so each reused module gets, for as long
as the cache is on, a hook in diffusers' own hook system (``diffusers.hooks.HookRegistry``, the way
its first-block and pyramid-attention caches attach) whose ``new_forward`` runs the original and
keeps its output on refresh steps and returns the kept output on cached steps; hooks that other
diffusers features put on the same modules chain with it. The up block that the branch cuts
through runs its own forward on its remaining layers (the ones before the branch are not even
called, so their inputs are not concatenated for nothing). The UNet's own forward runs unchanged
(its glue, the time embedding, still runs), which is why the same code works on every diffusers
UNet and why the router's gates keep working: the resnet that receives skip ``b`` still gets its
pre-hook, with (cached backbone, fresh skip). With the cache off nothing is hooked: the stock
forward, bit for bit (no instance ``forward`` and no empty registry are left behind). Kept outputs
are checked for in-place changes (the version counter, read on the host) before and after they are
reused.

How steps are counted (any scheduler, without reading device values): the cache follows the *scheduler*,
not the timestep values. (diffusers' transformer caches learn the step from the ``cache_context`` their
pipelines enter and from the pipeline's current timestep; no UNet pipeline, Stable Diffusion's included,
enters one, and a timestep read is a device read.) ``enable_skip_cache(pipe)`` watches
``pipe.scheduler``: its ``set_timesteps`` starts a run (step 0, ``len(timesteps)`` steps, the kept
features dropped), its ``step`` ends the current sampling step. Every pipeline calls both, so a new
``pipe(...)`` restarts the schedule, and a refresh decision never needs the timestep tensor (whose value
lives on the GPU). UNet calls between two ``step`` calls belong to one sampling step: classifier-free
guidance with a doubled batch is one call; a pipeline that calls the UNet separately for the conditional
and unconditional halves makes calls 0 and 1 of the step, and each call position (a *slot*) keeps its
own features. A call whose input shape, dtype or device differs from what its slot kept (another batch
size, say) cannot reuse them and refreshes (counted in ``stats``). Second-order schedulers (Heun, DPM2)
call ``step`` after every UNet evaluation, so their steps count evaluations. A bare UNet is driven the
same way through :meth:`SkipCache.watch` or :meth:`SkipCache.start_run` / :meth:`SkipCache.end_step`; a
UNet call outside a run raises instead of guessing.

``torch.compile``: put the cache on first, then compile (a compiled UNet is refused). The step
bookkeeping is kept out of tracing, so dynamo makes one graph for refresh steps and one for cached
steps (checked on a small UNet: no graph break, the eager backend bit-identical to the uncompiled
cached UNet, inductor within 3e-5).

Limitations: the kept features stay in memory between refreshes (:meth:`SkipCache.cached_bytes`);
a pipeline that adds residuals into the UNet's features in place (T2I-Adapter) is refused at the
first reused step; replacing a pipeline's scheduler object after ``enable_skip_cache`` needs
``cache.watch(new_scheduler)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Iterator
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

from .cache_options import SkipCacheOptions, refresh_steps
from .router import discover_skips

_ATTRIBUTE = "_skipdiff_skip_cache"  # where a UNet keeps its handle while the cache is on
_HOOK = "skipdiff_skip_cache"  # the name of the cache's hooks in diffusers' HookRegistry
_SPLITTABLE = {"resnets", "attentions", "downsamplers", "upsamplers"}


# ---- which modules a cached step reuses --------------------------------------------------------


def reused_modules(unet: nn.Module, options: SkipCacheOptions) -> list[str]:
    """Names (``unet.get_submodule`` paths) of the modules whose outputs a cached step reuses.

    Whole blocks where a block is reused whole; inside the block that the branch splits, its
    resnets and attentions one by one (and its down block's downsamplers).
    """
    if options.cache == "encoder_propagation":
        names = ["conv_in", *(f"down_blocks.{i}" for i in range(len(unet.down_blocks)))]
        return names + (["mid_block"] if unet.mid_block is not None else [])
    skips = discover_skips(unet)
    branch = len(skips) - 1 if options.cache_branch is None else options.cache_branch
    if not 0 <= branch < len(skips):
        raise ValueError(
            f"cache_branch {branch} is out of range for this UNet: its {len(skips)} long skips are "
            f"0 (innermost) to {len(skips) - 1} (outermost, from conv_in)"
        )
    info = skips[branch]
    names = _encoder_after(unet, info.source, branch)
    names += ["mid_block"] if unet.mid_block is not None else []
    names += [f"up_blocks.{u}" for u in range(info.up_block)]
    if info.layer:
        block = _splittable(unet, f"up_blocks.{info.up_block}", branch)
        names += _layers(f"up_blocks.{info.up_block}", block, range(info.layer))
    if not names:
        raise ValueError(f"cache_branch {branch} reuses nothing in this UNet (no mid block): choose another")
    return names


def _encoder_after(unet: nn.Module, source: str, branch: int) -> list[str]:
    """The encoder modules that run after ``source`` (a skip's source in discover_skips' naming)."""
    if source == "conv_in":
        return [f"down_blocks.{i}" for i in range(len(unet.down_blocks))]
    _, block_index, kind, index = source.split(".")
    i, j = int(block_index), int(index)
    names = []
    if kind == "resnets":  # the rest of block i: later resnets (with their attentions), its downsamplers
        block = _splittable(unet, f"down_blocks.{i}", branch)
        names += _layers(f"down_blocks.{i}", block, range(j + 1, len(block.resnets)))
        names += [f"down_blocks.{i}.downsamplers.{d}" for d in range(len(block.downsamplers or []))]
    return names + [f"down_blocks.{k}" for k in range(i + 1, len(unet.down_blocks))]


def _layers(prefix: str, block: nn.Module, indices: range) -> list[str]:
    """Resnet ``r`` of a block and, in attention blocks, the attention that follows it, for r in indices."""
    attention = getattr(block, "attentions", None) is not None
    return [
        name
        for r in indices
        for name in [f"{prefix}.resnets.{r}", *([f"{prefix}.attentions.{r}"] if attention else [])]
    ]


def _splittable(unet: nn.Module, name: str, branch: int) -> nn.Module:
    """A block the branch cuts through must be a plain resnet(/attention) stack whose forward we know."""
    block = unet.get_submodule(name)
    children = {child for child, _ in block.named_children()}
    attentions = getattr(block, "attentions", None)
    if not children <= _SPLITTABLE or (attentions is not None and len(attentions) != len(block.resnets)):
        raise ValueError(
            f"cache_branch {branch} splits {name} ({type(block).__name__}, with {sorted(children)}); only "
            f"blocks made of {sorted(_SPLITTABLE)} can be split: choose a branch at a block boundary"
        )
    return block


def _split_up_block(unet: nn.Module, options: SkipCacheOptions) -> tuple[str, int] | None:
    """(name, first layer that runs) of the up block a skip branch cuts through, if it cuts one."""
    if options.cache != "skip_branch":
        return None
    info = discover_skips(unet)[options.cache_branch]
    return (f"up_blocks.{info.up_block}", info.layer) if info.layer else None


# ---- the handle ------------------------------------------------------------------------------


class _ReuseHook(ModelHook):
    """A reused module's forward while the cache is on (a diffusers hook): on refresh calls it runs the module
    and keeps its output, on cached calls it returns the kept output without running the module."""

    def __init__(self, cache: SkipCache, name: str):
        super().__init__()
        self.cache, self.name = cache, name

    def new_forward(self, module: nn.Module, *args, **kwargs):
        cache = self.cache
        if cache._reusing:
            return cache._store[self.name]
        output = self.fn_ref.original_forward(*args, **kwargs)
        if cache._store is not None:  # a refresh call: keep it for the cached steps
            cache._store[self.name] = output
        return output


class _Tail:
    """``self`` for an up block's own forward that runs only its layers from ``start`` on."""

    def __init__(self, block: nn.Module, start: int):
        self._block = block
        self.resnets = block.resnets[start:]  # a ModuleList of the same modules
        if getattr(block, "attentions", None) is not None:
            self.attentions = block.attentions[start:]

    def __getattr__(self, name: str):
        return getattr(self._block, name)


class _SplitUpBlockHook(ModelHook):
    """The forward of the up block that the branch cuts through, while the cache is on (a diffusers hook).

    On cached steps its layers before the branch would only be replayed, yet the block's loop would
    still concatenate their inputs; instead the block's own (class) forward runs on a :class:`_Tail`,
    from the branch resnet on, fed the kept output of the layer before it and the skips that are left.
    """

    def __init__(self, cache: SkipCache, block: nn.Module, start: int, kept: str):
        super().__init__()
        self.cache, self.start, self.kept = cache, start, kept
        self.function = type(block).forward
        self.signature = inspect.signature(block.forward)
        self.tail = _Tail(block, start)

    @staticmethod
    def applies(block: nn.Module) -> bool:
        """The block's forward is its class's, taking ``hidden_states`` and ``res_hidden_states_tuple``."""
        if "forward" in vars(block):  # wrapped by someone else: replaying layer by layer still works
            return False
        parameters = inspect.signature(block.forward).parameters
        return "hidden_states" in parameters and "res_hidden_states_tuple" in parameters

    def new_forward(self, module: nn.Module, *args, **kwargs):
        if not self.cache._reusing:
            return self.fn_ref.original_forward(*args, **kwargs)
        bound = self.signature.bind(*args, **kwargs)
        skips = bound.arguments["res_hidden_states_tuple"]
        bound.arguments["res_hidden_states_tuple"] = skips[: len(skips) - self.start]  # the first layers pop the last
        kept = self.cache._store[self.kept]  # attentions called with return_dict=False answer (hidden,)
        bound.arguments["hidden_states"] = kept if isinstance(kept, torch.Tensor) else kept[0]
        return self.function(self.tail, *bound.args, **bound.kwargs)


def _register(module: nn.Module, hook: ModelHook) -> object:
    """Put ``hook`` on ``module`` through its diffusers :class:`HookRegistry`; returns the forward it installed."""
    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, _HOOK)
    return module.forward


def _unregister(module: nn.Module) -> None:
    """Take the cache's hook off ``module``; a module left with no hook gets its stock forward back (no
    instance ``forward``, no empty registry), as it was before any hook."""
    registry = module._diffusers_hook
    registry.remove_hook(_HOOK, recurse=False)
    if registry.hooks:
        return
    if module.__dict__.get("forward") == type(module).forward.__get__(module):  # the registry's restored copy
        del module.forward
    del module._diffusers_hook


@dataclasses.dataclass
class _Slot:
    """What one call position of a sampling step kept on its last refresh."""

    signature: tuple  # (shape, dtype, device) of the UNet input the features were made from
    store: dict[str, Any]
    versions: list[tuple[str, torch.Tensor, int]] = dataclasses.field(default_factory=list)
    complete: bool = False  # the refresh call that filled ``store`` returned (did not raise)


class SkipCache:
    """A UNet with cached features: made by :func:`enable_skip_cache`, undone by :meth:`disable`.

    Attributes:
        options: the resolved :class:`SkipCacheOptions` (``cache_branch`` filled in).
        modules: names of the modules a cached step reuses.
        stats: ``runs``, ``calls``, ``refresh_calls``, ``cached_calls``, ``forced_refreshes``
            (refreshes a cached step had to make because its slot held nothing usable).
        history: ``(step, slot, refreshed)`` of every UNet call of the current run.
    """

    def __init__(self, unet: nn.Module, options: SkipCacheOptions):
        self.unet = unet
        self.options = options
        self.modules = reused_modules(unet, options)
        self.stats = dict.fromkeys(("runs", "calls", "refresh_calls", "cached_calls", "forced_refreshes"), 0)
        self.history: list[tuple[int, int, bool]] = []
        self.num_steps: int | None = None  # steps of the current run; None: no run
        self.step = 0
        self._slot = 0
        self._refresh: frozenset[int] = frozenset()
        self._slots: dict[int, _Slot] = {}
        self._store: dict[str, Any] | None = None  # the slot being recorded or reused, during a UNet call
        self._reusing = False
        self._hooked: list[tuple[nn.Module, Any]] = []  # (module, the forward its hook installed)
        self._watched: list[tuple[Any, dict[str, Any]]] = []
        self._handles: list = []

    # ---- on and off -------------------------------------------------------------------------

    def _attach(self) -> SkipCache:
        for name in self.modules:  # an instance forward already there (accelerate's hooks) runs inside ours
            module = self.unet.get_submodule(name)
            self._hooked.append((module, _register(module, _ReuseHook(self, name))))
        split = _split_up_block(self.unet, self.options)
        if split is not None and _SplitUpBlockHook.applies(block := self.unet.get_submodule(split[0])):
            name, start = split
            kept = self.modules[-1]  # the last layer before the branch resnet (attention or resnet)
            self._hooked.append((block, _register(block, _SplitUpBlockHook(self, block, start, kept))))
        self._handles.append(self.unet.register_forward_pre_hook(self._begin_call, with_kwargs=True))
        self._handles.append(self.unet.register_forward_hook(self._end_call, always_call=True))
        setattr(self.unet, _ATTRIBUTE, self)
        return self

    def disable(self) -> None:
        """Take the hooks off, restore every watched scheduler and drop the kept features."""
        for module, installed in self._hooked:  # check all before changing any
            registry = module._diffusers_hook
            ours_last = registry._hook_order[-1:] == [_HOOK]  # a later diffusers hook would sit on top
            if ours_last and module.__dict__.get("forward") is not installed:
                raise RuntimeError(
                    f"{type(module).__name__}.forward was replaced after the cache was put on; remove that "
                    "wrapper first (wrappers must come off in the reverse order they went on)"
                )
        for module, _ in reversed(self._hooked):
            _unregister(module)
        self._hooked.clear()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for scheduler, _ in list(self._watched):
            self.unwatch(scheduler)
        self._slots.clear()
        self.num_steps = None
        if getattr(self.unet, _ATTRIBUTE, None) is self:
            delattr(self.unet, _ATTRIBUTE)

    @property
    def enabled(self) -> bool:
        return bool(self._handles)

    # ---- the step clock ---------------------------------------------------------------------

    def watch(self, scheduler) -> None:
        """Follow ``scheduler``: its ``set_timesteps`` starts a run, its ``step`` ends a sampling step."""
        if any(s is scheduler for s, _ in self._watched):
            return
        saved = {method: scheduler.__dict__.get(method) for method in ("set_timesteps", "step")}
        set_timesteps, step = scheduler.set_timesteps, scheduler.step

        def watched_set_timesteps(*args, **kwargs):
            result = set_timesteps(*args, **kwargs)
            self.start_run(len(scheduler.timesteps))  # a shape, not a device value
            return result

        def watched_step(*args, **kwargs):
            result = step(*args, **kwargs)
            self.end_step()
            return result

        scheduler.set_timesteps, scheduler.step = watched_set_timesteps, watched_step
        self._watched.append((scheduler, saved))

    def unwatch(self, scheduler) -> None:
        """Stop following ``scheduler`` (its own methods are back)."""
        for entry in [e for e in self._watched if e[0] is scheduler]:
            for method, previous in entry[1].items():
                if previous is None:
                    delattr(scheduler, method)
                else:
                    setattr(scheduler, method, previous)
            self._watched.remove(entry)

    def start_run(self, num_steps: int) -> None:
        """Begin a sampling run of ``num_steps`` steps: step 0, the schedule for that length, nothing kept."""
        self._refresh = frozenset(refresh_steps(self.options, num_steps))
        self.num_steps, self.step, self._slot = num_steps, 0, 0
        self._slots.clear()
        self.history = []
        self.stats["runs"] += 1

    def end_step(self) -> None:
        """The current sampling step is done; after the last one the kept features are dropped."""
        if self.num_steps is None:
            return
        self.step, self._slot = self.step + 1, 0
        if self.step >= self.num_steps:
            self._slots.clear()

    def refresh_steps(self, num_steps: int) -> list[int]:
        """The steps that run the whole UNet in a run of ``num_steps`` steps."""
        return refresh_steps(self.options, num_steps)

    # ---- one UNet call ----------------------------------------------------------------------

    @torch.compiler.disable  # host bookkeeping: never traced (a compiled UNet guards on its result)
    def _begin_call(self, unet, args, kwargs):
        if self.num_steps is None or self.step >= self.num_steps:
            raise RuntimeError(
                f"skip cache on {type(unet).__name__}: UNet called outside a sampling run "
                f"({'no run started' if self.num_steps is None else f'the {self.num_steps}-step run is over'}). "
                "A run starts when a watched scheduler's set_timesteps is called (enable_skip_cache(pipe) "
                "watches pipe.scheduler; else cache.watch(scheduler)) or with cache.start_run(num_steps)"
            )
        sample = args[0] if args else kwargs["sample"]
        signature = (tuple(sample.shape), sample.dtype, sample.device)
        slot_index, slot = self._slot, self._slots.get(self._slot)
        self._slot += 1
        refresh = self.step in self._refresh
        if not refresh and (slot is None or not slot.complete or slot.signature != signature):
            refresh = True
            self.stats["forced_refreshes"] += 1
        if refresh:
            slot = self._slots[slot_index] = _Slot(signature, {})
        else:
            _check_unchanged(slot)
        self.stats["calls"] += 1
        self.stats["refresh_calls" if refresh else "cached_calls"] += 1
        self.history.append((self.step, slot_index, refresh))
        self._store, self._reusing = slot.store, not refresh
        return None

    @torch.compiler.disable
    def _end_call(self, unet, args, output):
        store, reusing = self._store, self._reusing
        self._store, self._reusing = None, False
        if store is None or output is None:  # the call raised
            return None
        slot = self._slots[self.history[-1][1]]
        if reusing:  # changed in place during this call: its output used a kept feature twice over
            _check_unchanged(slot)
        else:
            slot.versions = [(name, t, t._version) for name, t in _tensors(store) if not t.is_inference()]
            slot.complete = True
        return None

    def cached_bytes(self) -> int:
        """Bytes of the features kept now (each tensor's storage counted once)."""
        seen: dict[int, int] = {}
        for slot in self._slots.values():
            for _, tensor in _tensors(slot.store):
                storage = tensor.untyped_storage()
                seen[storage._cdata] = storage.nbytes()  # the storage itself (meta tensors have no data_ptr)
        return sum(seen.values())


def _tensors(store: dict[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in the kept outputs (blocks return tensors, tuples of them, or tuples of tuples)."""

    def walk(name: str, value: Any):
        if isinstance(value, torch.Tensor):
            yield name, value
        elif isinstance(value, tuple | list):
            for item in value:
                yield from walk(name, item)

    for name, value in store.items():
        yield from walk(name, value)


def _check_unchanged(slot: _Slot) -> None:
    for name, tensor, version in slot.versions:
        if tensor._version != version:
            raise RuntimeError(
                f"the cached output of {name} was modified in place after it was kept (e.g. a T2I-Adapter adds "
                "residuals in place); caching cannot reuse it: disable the cache for this pipeline"
            )


# ---- public entry points ---------------------------------------------------------------------


def _unet_of(target) -> nn.Module:
    unet = getattr(target, "unet", target)
    if not isinstance(unet, nn.Module) or not all(hasattr(unet, a) for a in ("conv_in", "down_blocks", "up_blocks")):
        raise ValueError(f"enable_skip_cache needs a UNet or a pipeline with a .unet, got {type(target).__name__}")
    if hasattr(unet, "_orig_mod"):
        raise ValueError("this UNet is torch.compile'd: put the cache on the UNet before compiling it")
    return unet


def enable_skip_cache(target, options: SkipCacheOptions | None = None, **overrides) -> SkipCache:
    """Cache UNet features across sampling steps on a pipeline (anything with ``.unet``) or a bare UNet.

    ``options`` (a :class:`SkipCacheOptions`) and/or keyword overrides of its fields, e.g.
    ``enable_skip_cache(pipe, cache="skip_branch", cache_interval=3)``; the mode defaults to
    ``skip_branch``. A pipeline's ``scheduler`` is watched, so sampling just works; for a bare UNet
    call ``cache.watch(scheduler)`` or ``cache.start_run(num_steps)``. Returns the handle;
    :func:`disable_skip_cache` (or ``cache.disable()``) takes it off. Bad options raise ``ValueError``
    naming the value, before anything is changed.
    """
    unet = _unet_of(target)
    options = dataclasses.replace(options or SkipCacheOptions(), **overrides)
    if options.cache is None:
        options = dataclasses.replace(options, cache="skip_branch")
    options.validate()
    if getattr(unet, _ATTRIBUTE, None) is not None:
        raise ValueError("this UNet already has a skip cache; disable_skip_cache() it first")
    if options.cache == "skip_branch" and options.cache_branch is None:
        options = dataclasses.replace(options, cache_branch=len(discover_skips(unet)) - 1)
    cache = SkipCache(unet, options)._attach()
    scheduler = getattr(target, "scheduler", None)
    if target is not unet and scheduler is not None:
        cache.watch(scheduler)
    return cache


def disable_skip_cache(target) -> None:
    """Take the skip cache off a pipeline or UNet (a no-op when there is none)."""
    cache = getattr(_unet_of(target), _ATTRIBUTE, None)
    if cache is not None:
        cache.disable()


def skip_cache_of(target) -> SkipCache | None:
    """The skip cache on a pipeline's UNet or a bare UNet, or None."""
    return getattr(_unet_of(target), _ATTRIBUTE, None)


@contextlib.contextmanager
def skip_cache(target, options: SkipCacheOptions | None, scheduler=None) -> Iterator[SkipCache | None]:
    """``with skip_cache(unet, options, scheduler):`` caching for one block of sampling code.

    With ``options.cache`` set: the cache is put on for the block (following ``scheduler`` if given)
    and taken off after it. Without: a cache already on the UNet (``enable_skip_cache(pipe)``) follows
    ``scheduler`` during the block, so that a pipeline that builds a scheduler per call still drives
    it; with no cache on, nothing happens (the stock UNet). Yields the cache or None.
    """
    if options is not None and options.cache is not None:
        cache = enable_skip_cache(target, options)
        try:
            if scheduler is not None:
                cache.watch(scheduler)
            yield cache
        finally:
            cache.disable()
        return
    cache = skip_cache_of(target)
    if cache is None or scheduler is None or any(s is scheduler for s, _ in cache._watched):
        yield cache
        return
    cache.watch(scheduler)
    try:
        yield cache
    finally:
        cache.unwatch(scheduler)
