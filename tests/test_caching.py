"""Feature caching across sampling steps (skipdiff.skips.caching): exactness, step bookkeeping, errors."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel, UNet2DModel

from skipdiff import SkipUNet2DModel, apply_skip_spec
from skipdiff.eval.compute import cache_compute, count_flops, flop_counter, speedup_bound
from skipdiff.pipeline import SkipDiffPipeline
from skipdiff.skips.cache_options import FASTER_DIFFUSION_SD_KEY_STEPS, SkipCacheOptions, refresh_steps
from skipdiff.skips.caching import disable_skip_cache, enable_skip_cache, reused_modules, skip_cache, skip_cache_of
from skipdiff.skips.router import discover_skips

# Non-trivial gates on all 9 skips of the DEEP layout: scaled, zeroed, learned (non-zero), FreeU-filtered.
GATES = "keep,scale:0.5,fourier:backbone=1.2:skip=0.5,learned:init=0.7,zero,scale:1.5,keep,learned:init=0.3,scale:0.8"

COND = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(8, 16, 16),
    layers_per_block=1,
    norm_num_groups=4,
    cross_attention_dim=8,
    attention_head_dim=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)


def _model(kind: str, deep_config: dict) -> tuple[torch.nn.Module, dict]:
    """(eval-mode UNet, extra forward kwargs) of each kind the cache must support."""
    torch.manual_seed(0)
    if kind == "unet2d":
        return UNet2DModel(**deep_config).eval(), {}
    if kind == "gated":
        model = SkipUNet2DModel(**deep_config, skips=GATES).eval()
        with torch.no_grad():  # learned gates start at their init; move them so they matter
            for p in model.skip_router.parameters():
                p.add_(0.1)
        return model, {}
    if kind == "classes":
        return UNet2DModel(**deep_config, num_class_embeds=3).eval(), {"class_labels": torch.tensor([0, 2])}
    context = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(7))
    return UNet2DConditionModel(**COND).eval(), {"encoder_hidden_states": context}


def _scheduler() -> DDIMScheduler:
    return DDIMScheduler(num_train_timesteps=1000, clip_sample=False)


def _noise(unet, batch: int = 2, seed: int = 0) -> torch.Tensor:
    size, channels = unet.config.sample_size, unet.config.in_channels
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _sample(unet, scheduler, x: torch.Tensor, steps: int = 9, **kwargs) -> torch.Tensor:
    """A diffusers-style sampling loop: set_timesteps, then UNet + scheduler.step per step."""
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        x = scheduler.step(unet(x, t, **kwargs).sample, t, x).prev_sample
    return x


def _distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# ---- exactness -------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["unet2d", "gated", "classes", "cond"])
def test_interval_one_is_bit_identical_to_no_caching(kind, deep_config):
    unet, kwargs = _model(kind, deep_config)
    scheduler = _scheduler()
    reference = _sample(unet, scheduler, _noise(unet), **kwargs)
    branches = len(discover_skips(unet))
    for options in [dict(cache_branch=b) for b in range(branches)] + [dict(cache="encoder_propagation")]:
        cache = enable_skip_cache(unet, cache_interval=1, **options)
        cache.watch(scheduler)
        assert torch.equal(_sample(unet, scheduler, _noise(unet), **kwargs), reference), options
        assert cache.stats["cached_calls"] == 0 and cache.stats["refresh_calls"] == 9
        cache.disable()


@pytest.mark.parametrize("kind", ["unet2d", "gated", "cond"])
def test_cache_off_is_the_stock_unet_bit_for_bit(kind, deep_config):
    unet, kwargs = _model(kind, deep_config)
    scheduler = _scheduler()
    reference = _sample(unet, scheduler, _noise(unet), **kwargs)
    hooks_before = (dict(unet._forward_pre_hooks), dict(unet._forward_hooks))
    cache = enable_skip_cache(unet, cache_interval=3)
    cache.watch(scheduler)
    cached = _sample(unet, scheduler, _noise(unet), **kwargs)
    assert not torch.equal(cached, reference)
    disable_skip_cache(unet)
    assert torch.equal(_sample(unet, scheduler, _noise(unet), **kwargs), reference)
    # Nothing of the cache is left: no instance forwards, hooks, scheduler wrappers or handle.
    assert not any("forward" in vars(m) for m in unet.modules())
    assert (dict(unet._forward_pre_hooks), dict(unet._forward_hooks)) == hooks_before
    assert "step" not in vars(scheduler) and "set_timesteps" not in vars(scheduler)
    assert skip_cache_of(unet) is None
    with skip_cache(unet, SkipCacheOptions(cache=None), scheduler) as cache:  # options without a mode: off
        assert cache is None and torch.equal(_sample(unet, scheduler, _noise(unet), **kwargs), reference)


def _reference_branch_step(unet, branch: int, first: tuple, second: tuple, kwargs: dict) -> torch.Tensor:
    """The cached step by another route: the full UNet on ``second`` whose resnet receiving skip
    ``branch`` gets, as its backbone input, the one it got on ``first`` (before any gate)."""
    info = discover_skips(unet)[branch]
    kept = {}

    def swap(module, args):
        hidden = args[0]  # (B, main + skip, H, W), as concatenated by the up block
        if "main" not in kept:
            kept["main"] = hidden[:, : info.main_channels].clone()
            return None
        return (torch.cat([kept["main"], hidden[:, info.main_channels :]], dim=1), *args[1:])

    resnet = unet.up_blocks[info.up_block].resnets[info.layer]
    handle = resnet.register_forward_pre_hook(swap, prepend=True)  # before the router's gate
    with torch.no_grad():
        unet(*first, **kwargs)
        out = unet(*second, **kwargs).sample
    handle.remove()
    return out


def _reference_propagation_step(unet, first: tuple, second: tuple, kwargs: dict) -> torch.Tensor:
    """The full UNet on ``second`` with conv_in, every down block and the mid block answering as on ``first``."""
    kept, handles = {}, []
    for name in ["conv_in", *(f"down_blocks.{i}" for i in range(len(unet.down_blocks))), "mid_block"]:

        def replay(module, args, output, name=name):
            if name not in kept:
                kept[name] = output
                return None
            return kept[name]

        handles.append(unet.get_submodule(name).register_forward_hook(replay))
    with torch.no_grad():
        unet(*first, **kwargs)
        out = unet(*second, **kwargs).sample
    for handle in handles:
        handle.remove()
    return out


@pytest.mark.parametrize("kind", ["unet2d", "gated", "classes", "cond"])
def test_cached_step_equals_the_full_unet_fed_the_kept_features(kind, deep_config):
    """A cached step is exactly the UNet whose branch input (or encoder) is the refresh step's."""
    unet, kwargs = _model(kind, deep_config)
    first = (_noise(unet, seed=1), torch.tensor(600))
    second = (_noise(unet, seed=2), torch.tensor(560))

    def cached(**options) -> torch.Tensor:
        cache = enable_skip_cache(unet, cache_interval=2, **options)
        cache.start_run(2)
        with torch.no_grad():
            unet(*first, **kwargs)
            cache.end_step()
            out = unet(*second, **kwargs).sample
        assert [refreshed for _, _, refreshed in cache.history] == [True, False]
        cache.disable()
        return out

    with torch.no_grad():
        fresh = unet(*second, **kwargs).sample
    for branch in range(len(discover_skips(unet))):
        out = cached(cache_branch=branch)
        assert torch.equal(out, _reference_branch_step(unet, branch, first, second, kwargs)), branch
        assert not torch.equal(out, fresh), branch
    out = cached(cache="encoder_propagation")
    assert torch.equal(out, _reference_propagation_step(unet, first, second, kwargs))
    assert not torch.equal(out, fresh)


def test_a_cached_step_runs_nothing_before_the_branch(deep_config):
    """In the up block the branch cuts through, the layers before it are not even called (no wasted
    concatenations); if that block's forward was wrapped by someone else, they are replayed instead."""
    unet, _ = _model("unet2d", deep_config)
    first, second = (_noise(unet, seed=1), torch.tensor(600)), (_noise(unet, seed=2), torch.tensor(560))
    reference = _reference_branch_step(unet, 7, first, second, {})  # skip 7 enters up_blocks.2.resnets.1
    calls = []
    hook = unet.up_blocks[2].resnets[0].register_forward_pre_hook(lambda m, a: calls.append(1))
    for wrapped in (False, True):
        if wrapped:  # an instance forward, as accelerate's hooks install
            unet.up_blocks[2].forward = type(unet.up_blocks[2]).forward.__get__(unet.up_blocks[2])
        cache = enable_skip_cache(unet, cache_branch=7, cache_interval=2)
        cache.start_run(2)
        with torch.no_grad():
            unet(*first)
            cache.end_step()
            calls.clear()
            out = unet(*second).sample
        cache.disable()
        assert torch.equal(out, reference)
        assert len(calls) == (1 if wrapped else 0)
    hook.remove()
    del unet.up_blocks[2].forward


def test_gated_model_cached_equals_same_spec_applied_to_a_stock_unet(deep_config):
    """Caching composes with a skip specification the same way on SkipUNet2DModel and on apply_skip_spec."""
    spec = GATES.replace("learned:init=0.7", "scale:0.7").replace("learned:init=0.3", "scale:0.3")
    torch.manual_seed(0)
    gated = SkipUNet2DModel(**deep_config, skips=spec).eval()
    stock = UNet2DModel(**deep_config).eval()
    stock.load_state_dict(gated.state_dict(), strict=False)
    router = apply_skip_spec(stock, spec)
    outputs = []
    for unet in (gated, stock):
        scheduler = _scheduler()
        enable_skip_cache(unet, cache_interval=3, cache_branch=6).watch(scheduler)
        outputs.append(_sample(unet, scheduler, _noise(unet)))
        disable_skip_cache(unet)
    router.detach()
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-6, rtol=0)


def test_cached_sampling_differs_but_stays_close(deep_config):
    unet, _ = _model("unet2d", deep_config)
    scheduler = _scheduler()
    reference = _sample(unet, scheduler, _noise(unet), steps=20)
    spread = _distance(_sample(unet, scheduler, _noise(unet, seed=1), steps=20), reference)  # another seed: ~1.4
    errors = {}
    for name, options in {
        "outermost": dict(cache_branch=8, cache_interval=3),
        "middle": dict(cache_branch=4, cache_interval=3),
        "propagation": dict(cache="encoder_propagation", cache_interval=2),
    }.items():
        with skip_cache(unet, SkipCacheOptions(**{"cache": "skip_branch", **options}), scheduler):
            errors[name] = _distance(_sample(unet, scheduler, _noise(unet), steps=20), reference)
    assert all(0 < e < 0.03 * spread for e in errors.values()), errors
    # Reusing less (a deeper branch) errs less.
    assert errors["middle"] < errors["outermost"]


# ---- steps: schedules, runs, slots, batches ----------------------------------------------------


@pytest.mark.parametrize(
    "options, steps, expected",
    [
        (dict(cache_interval=3), 10, [0, 3, 6, 9]),
        (dict(cache_interval=1), 4, [0, 1, 2, 3]),
        (dict(cache_interval=5), 3, [0]),
        (dict(cache_key_steps=list(FASTER_DIFFUSION_SD_KEY_STEPS)), 50, [0, 1, 2, 3, 5, 10, 15, 25, 35]),
        (dict(cache_key_steps=[5, 0, 12]), 10, [0, 5]),
        (dict(cache_interval=5, cache_schedule="non_uniform", cache_power=1.0), 50, list(range(0, 50, 5))),
    ],
)
def test_refresh_steps(options, steps, expected):
    assert refresh_steps(SkipCacheOptions(cache="skip_branch", **options), steps) == expected


@pytest.mark.parametrize("steps, interval", [(50, 5), (50, 3), (30, 2), (10, 3), (7, 7), (25, 4)])
def test_non_uniform_schedule_crowds_refreshes_at_the_center(steps, interval):
    options = SkipCacheOptions(cache="skip_branch", cache_interval=interval, cache_schedule="non_uniform")
    chosen = refresh_steps(options, steps)
    assert len(chosen) == math.ceil(steps / interval)  # the FLOPs of the uniform schedule
    assert chosen[0] == 0 and chosen == sorted(set(chosen)) and chosen[-1] < steps
    if len(chosen) >= 4:
        gaps = [b - a for a, b in zip(chosen, chosen[1:], strict=False)]
        center = options.cache_center * steps
        nearest = min(range(len(gaps)), key=lambda i: abs((chosen[i] + chosen[i + 1]) / 2 - center))
        assert gaps[nearest] == min(gaps) and gaps[-1] > min(gaps)


def test_schedule_is_what_a_run_follows(deep_config):
    unet, _ = _model("unet2d", deep_config)
    scheduler = _scheduler()
    for options in (
        dict(cache_interval=4),
        dict(cache_interval=3, cache_schedule="non_uniform"),
        dict(cache="encoder_propagation", cache_key_steps=[0, 1, 2, 6]),
    ):
        cache = enable_skip_cache(unet, **options)
        cache.watch(scheduler)
        _sample(unet, scheduler, _noise(unet), steps=12)
        assert [s for s, _, refreshed in cache.history if refreshed] == cache.refresh_steps(12)
        assert [s for s, _, _ in cache.history] == list(range(12))
        assert cache.cached_bytes() == 0  # dropped when the run ended
        cache.disable()


def test_every_pipeline_call_restarts_the_schedule_whatever_its_batch(tiny_config):
    torch.manual_seed(0)
    unet = UNet2DModel(**tiny_config).eval()
    pipe = SkipDiffPipeline(unet=unet, scheduler=_scheduler())

    def run(batch: int, seed: int) -> torch.Tensor:
        return pipe(
            batch_size=batch,
            num_inference_steps=7,
            generator=torch.Generator().manual_seed(seed),
            output_type="pt",
            show_progress=False,
        ).images

    cache = enable_skip_cache(pipe, cache_interval=3)  # watches pipe.scheduler
    first = run(3, seed=0)
    assert [r for _, _, r in cache.history] == [True, False, False, True, False, False, True]
    second = run(2, seed=1)  # another batch size: a run of its own, no forced refresh
    assert cache.stats["runs"] == 2 and cache.stats["forced_refreshes"] == 0
    assert torch.equal(run(3, seed=0), first)  # a new call does not reuse the last run's features
    disable_skip_cache(pipe)
    cache = enable_skip_cache(pipe, cache_interval=3)
    assert torch.equal(run(2, seed=1), second)
    cache.disable()


def test_batch_equals_examples_sampled_one_by_one(deep_config):
    unet, kwargs = _model("classes", deep_config)
    scheduler = _scheduler()
    x = _noise(unet, batch=2)
    with skip_cache(unet, SkipCacheOptions(cache="skip_branch", cache_interval=3), scheduler):
        batch = _sample(unet, scheduler, x, **kwargs)
        alone = [_sample(unet, scheduler, x[i : i + 1], class_labels=kwargs["class_labels"][i : i + 1]) for i in (0, 1)]
    torch.testing.assert_close(batch, torch.cat(alone), atol=1e-4, rtol=1e-4)  # float noise of batched kernels
    # The labels reach the cached steps: the same noise under other labels samples something else.
    with skip_cache(unet, SkipCacheOptions(cache="skip_branch", cache_interval=3), scheduler):
        other = _sample(unet, scheduler, x, class_labels=torch.tensor([1, 1]))
    assert _distance(other, batch) > 1e-3


@torch.no_grad()
def _guided(unet, scheduler, x, context, uncond, split: bool, steps: int = 9, scale: float = 4.0):
    """Classifier-free guidance as pipelines do it: one call on a doubled batch, or two calls per step."""
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        if split:
            e_uncond = unet(x, t, encoder_hidden_states=uncond).sample
            e_cond = unet(x, t, encoder_hidden_states=context).sample
        else:
            both = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, context])).sample
            e_uncond, e_cond = both.chunk(2)
        x = scheduler.step(e_uncond + scale * (e_cond - e_uncond), t, x).prev_sample
    return x


def test_classifier_free_guidance_in_one_call_or_two(deep_config):
    unet, kwargs = _model("cond", deep_config)
    context = kwargs["encoder_hidden_states"]
    uncond = torch.zeros_like(context)
    scheduler = _scheduler()
    x = _noise(unet)
    stock = _guided(unet, scheduler, x, context, uncond, split=False)
    results = {}
    for split in (False, True):
        with skip_cache(unet, SkipCacheOptions(cache="skip_branch", cache_interval=3), scheduler) as cache:
            results[split] = _guided(unet, scheduler, x, context, uncond, split)
            slots = sorted({slot for _, slot, _ in cache.history})
            assert slots == ([0, 1] if split else [0]) and cache.stats["forced_refreshes"] == 0
    # Each call position keeps its own features: two calls per step cache what one doubled call does (to the
    # 1e-4 by which the two forms differ without caching too: batched kernels).
    torch.testing.assert_close(results[True], results[False], atol=5e-4, rtol=1e-4)
    assert 0 < _distance(results[False], stock) < 0.05


def test_stable_diffusion_pipeline_with_guidance():
    """One call puts the cache on a diffusers pipeline (here Stable Diffusion, built without text encoder or VAE)."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**COND).eval()
    pipe = StableDiffusionPipeline(
        vae=None,
        text_encoder=None,
        tokenizer=None,
        unet=unet,
        scheduler=DDIMScheduler(clip_sample=False, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    prompt, negative = torch.randn(2, 5, 8, generator=generator), torch.randn(2, 5, 8, generator=generator)

    def run() -> torch.Tensor:
        return pipe(
            prompt_embeds=prompt,
            negative_prompt_embeds=negative,
            height=64,
            width=64,
            num_inference_steps=6,
            guidance_scale=5.0,
            output_type="latent",
            generator=torch.Generator().manual_seed(1),
        ).images

    stock = run()
    cache = enable_skip_cache(pipe, cache_interval=1)
    assert torch.equal(run(), stock)
    disable_skip_cache(pipe)
    cache = enable_skip_cache(pipe, cache_interval=3)
    cached = run()
    assert [r for _, _, r in cache.history] == [True, False, False, True, False, False]
    assert 0 < _distance(cached, stock) < 0.1
    disable_skip_cache(pipe)
    assert torch.equal(run(), stock)


# ---- what is reused, and what it costs -------------------------------------------------------


def test_branch_maps_to_up_and_down_blocks(deep_config):
    unet = UNet2DModel(**deep_config)
    names = {b: reused_modules(unet, SkipCacheOptions(cache_branch=b)) for b in range(9)}
    # The outermost skip (conv_in -> last resnet of the last up block): all but conv_in and that resnet.
    assert names[8] == [
        "down_blocks.0",
        "down_blocks.1",
        "down_blocks.2",
        "mid_block",
        "up_blocks.0",
        "up_blocks.1",
        "up_blocks.2.resnets.0",
        "up_blocks.2.resnets.1",
    ]
    # Skip 4 comes from down_blocks.1.resnets.0 (an attention block) and enters up_blocks.1.resnets.1.
    assert names[4] == [
        "down_blocks.1.resnets.1",
        "down_blocks.1.attentions.1",
        "down_blocks.1.downsamplers.0",
        "down_blocks.2",
        "mid_block",
        "up_blocks.0",
        "up_blocks.1.resnets.0",
        "up_blocks.1.attentions.0",
    ]
    assert names[0] == ["mid_block"]  # the innermost skip: only the mid block is reused
    assert reused_modules(unet, SkipCacheOptions(cache="encoder_propagation")) == [
        "conv_in",
        "down_blocks.0",
        "down_blocks.1",
        "down_blocks.2",
        "mid_block",
    ]


@pytest.mark.parametrize("options", [dict(cache_branch=b) for b in (0, 3, 5)] + [dict(cache="encoder_propagation")])
def test_cached_step_flops_are_the_full_forward_minus_the_reused_modules(options):
    unet = UNet2DConditionModel(**COND).eval()
    options = SkipCacheOptions(**{"cache": "skip_branch", "cache_interval": 4, **options})
    inputs = (_noise(unet), torch.tensor(500))
    kwargs = {"encoder_hidden_states": torch.randn(2, 5, 8)}
    result = cache_compute(unet, options, inputs, kwargs, num_steps=20)

    with torch.no_grad(), flop_counter() as counter:
        unet(*inputs, **kwargs)
    assert result["flops_full"] == counter.get_total_flops()
    per_module = counter.get_flop_counts()
    reused = sum(sum(per_module[f"UNet2DConditionModel.{name}"].values()) for name in reused_modules(unet, options))
    assert 0 < reused < result["flops_full"]
    assert result["flops_cached"] == result["flops_full"] - reused
    f = result["cached_fraction"]
    assert result["bound_interval"] == pytest.approx(speedup_bound(4, f)) == pytest.approx(4 / (1 + 3 * f))
    assert result["refresh_steps"] == 5 and result["bound_run"] == pytest.approx(20 / (5 + 15 * f))
    assert skip_cache_of(unet) is None


def test_flop_count_includes_attention_on_the_cpu():
    query = torch.randn(2, 3, 16, 4)  # (B, heads, tokens, head dim)
    flops = count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(query, query, query))
    assert flops == 2 * (2 * 2 * 3 * 16 * 16 * 4)  # two matmuls: Q K^T and softmax(.) V


def test_shallower_branches_spend_less(deep_config):
    unet = UNet2DModel(**deep_config).eval()
    inputs = (_noise(unet), torch.tensor(500))
    fractions = [cache_compute(unet, SkipCacheOptions(cache_branch=b), inputs)["cached_fraction"] for b in range(9)]
    assert all(a > b for a, b in zip(fractions, fractions[1:], strict=False)) and 0 < fractions[-1] < 0.5


# ---- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(cache_branch=9), "cache_branch 9 is out of range for this UNet: its 9 long skips"),
        (dict(cache_branch=-1), "--cache_branch must be >= 0, got -1"),
        (dict(cache_interval=0), "--cache_interval must be >= 1, got 0"),
        (dict(cache="deepcache"), "--cache must be one of"),
        (dict(cache_schedule="quadratic"), "--cache_schedule must be one of"),
        (dict(cache_key_steps=[1, 5]), "must contain step 0"),
        (dict(cache_key_steps=[0, -2]), "got [-2]"),
        (dict(cache_center=1.5), "--cache_center must lie in [0, 1], got 1.5"),
        (dict(cache_power=0.5), "--cache_power must be a finite number >= 1, got 0.5"),
        (dict(cache="encoder_propagation", cache_branch=3), "--cache_branch 3 is for skip_branch caching"),
    ],
)
def test_bad_options_raise_naming_the_value(deep_config, options, message):
    unet = UNet2DModel(**deep_config)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        enable_skip_cache(unet, **options)
    assert skip_cache_of(unet) is None and not any("forward" in vars(m) for m in unet.modules())


def test_misuse_is_refused(deep_config):
    unet = UNet2DModel(**deep_config).eval()
    with pytest.raises(ValueError, match="needs a UNet or a pipeline"):
        enable_skip_cache(torch.nn.Linear(2, 2))
    cache = enable_skip_cache(unet)
    with pytest.raises(ValueError, match="already has a skip cache"):
        enable_skip_cache(unet)
    with pytest.raises(RuntimeError, match="outside a sampling run .no run started"):
        unet(_noise(unet), 10)
    cache.start_run(1)
    unet(_noise(unet), 10)
    cache.end_step()
    with pytest.raises(RuntimeError, match="the 1-step run is over"):
        unet(_noise(unet), 10)
    cache.disable()


def test_features_changed_in_place_are_not_reused(deep_config):
    unet = UNet2DModel(**deep_config).eval()

    def adapter(module, args, output):  # adds a residual in place, as T2I-Adapter does after a block
        output.add_(1.0)

    handle = unet.mid_block.register_forward_hook(adapter)
    cache = enable_skip_cache(unet, cache_interval=3)
    cache.start_run(3)
    with torch.no_grad():
        unet(_noise(unet), 10)
        cache.end_step()
        with pytest.raises(RuntimeError, match="cached output of mid_block was modified in place"):
            unet(_noise(unet), 9)  # the kept mid-block output got the residual a second time
    handle.remove()
    cache.disable()


def test_a_pipeline_level_cache_follows_a_scheduler_made_per_call(tiny_config):
    """SkipDiffPipeline(sampler="ddim") builds its scheduler per call; skip_cache(unet, None, scheduler)
    lets a cache put on the pipeline follow it for that call."""
    torch.manual_seed(0)
    unet = UNet2DModel(**tiny_config).eval()
    pipe = SkipDiffPipeline(unet=unet, scheduler=_scheduler())
    cache = enable_skip_cache(pipe, cache_interval=2)
    per_call = _scheduler()
    with skip_cache(pipe.unet, None, per_call) as attached:
        assert attached is cache
        _sample(pipe.unet, per_call, _noise(unet), steps=4)
    assert [r for _, _, r in cache.history] == [True, False, True, False]
    assert "step" not in vars(per_call) and "step" in vars(pipe.scheduler)  # unwatched after the block
    with pytest.raises(RuntimeError, match="outside a sampling run"):
        _sample(pipe.unet, per_call, _noise(unet), steps=4)
    cache.disable()
    with skip_cache(pipe.unet, None, per_call) as attached:  # no cache on: the stock UNet
        assert attached is None


def test_skipdiff_pipeline_samples_with_a_cache_for_one_call():
    """SkipDiffPipeline(cache=...): interval 1 equals no cache; interval 3 differs and leaves no cache on."""
    from diffusers import DDPMScheduler

    from skipdiff.pipeline import SkipDiffPipeline
    from skipdiff.skips.cache_options import SkipCacheOptions
    from skipdiff.skips.caching import skip_cache_of

    torch.manual_seed(0)
    unet = SkipUNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=4,
    )
    pipe = SkipDiffPipeline(unet=unet, scheduler=DDPMScheduler())

    def sample(cache):
        return pipe(
            batch_size=2,
            num_inference_steps=6,
            generator=torch.Generator().manual_seed(1),
            sampler="ddim",
            output_type="pt",
            show_progress=False,
            cache=cache,
        ).images

    plain = sample(None)
    assert torch.equal(sample(SkipCacheOptions(cache="skip_branch", cache_interval=1)), plain)
    cached = sample(SkipCacheOptions(cache="skip_branch", cache_interval=3))
    assert not torch.equal(cached, plain) and skip_cache_of(pipe) is None
    assert torch.equal(sample(None), plain)


def test_the_cache_is_a_diffusers_hook_and_chains_with_other_hooks(deep_config):
    """The cache's hooks live in diffusers' HookRegistry: a hook another feature puts on a reused module after
    the cache runs on top of it (only on refresh steps, when the module runs), and outlives the cache."""
    from diffusers.hooks import HookRegistry, ModelHook

    class Counting(ModelHook):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def pre_forward(self, module, *args, **kwargs):
            self.calls += 1
            return args, kwargs

    unet, _ = _model("unet2d", deep_config)
    scheduler = _scheduler()
    reference = _sample(unet, scheduler, _noise(unet))
    cache = enable_skip_cache(unet, cache_interval=3)
    cache.watch(scheduler)
    module = unet.get_submodule(cache.modules[0])
    assert list(module._diffusers_hook.hooks) == ["skipdiff_skip_cache"]
    counting = Counting()
    HookRegistry.check_if_exists_or_initialize(module).register_hook(counting, "counting")
    cached = _sample(unet, scheduler, _noise(unet))
    assert counting.calls == 9  # the outer hook sees every call; the cache answers 6 of them from memory
    assert cache.stats["cached_calls"] == 6
    cache.disable()  # under another hook: the registry unlinks it
    assert list(module._diffusers_hook.hooks) == ["counting"]
    assert torch.equal(_sample(unet, scheduler, _noise(unet)), reference) and counting.calls == 18
    assert not torch.equal(cached, reference)
