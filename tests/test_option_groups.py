"""Options composed of groups: every training option belongs to exactly one group, ``options.<group>`` holds
that group's fields and nothing else, builders take their group, and the command line stays flat."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from skipdiff.config import OptionGroup, build_parser, option, parse_args
from skipdiff.data_options import DataOptions
from skipdiff.eval.options import EvalOptions
from skipdiff.skips.cache_options import SkipCacheOptions
from skipdiff.training import runtime
from skipdiff.training.options import GROUPS, EmaOptions, OptimOptions, RunOptions, TrainOptions


def names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_every_training_option_is_in_exactly_one_group():
    counted = [name for group in GROUPS.values() for name in names(group)]
    assert len(counted) == len(set(counted)), "an option sits in two groups"
    assert set(counted) == names(TrainOptions)


def test_a_group_holds_its_fields_only_and_their_values():
    options = parse_args(TrainOptions, ["--learning_rate", "0.003", "--ema_power", "0.6667", "--output_dir", "x"])
    assert isinstance(options.optim, OptimOptions) and options.optim.learning_rate == 0.003
    assert options.ema == EmaOptions(ema_power=0.6667)
    assert options.run.output_dir == "x"
    assert isinstance(options.data, DataOptions)
    with pytest.raises(AttributeError):
        options.optim.ema_power  # noqa: B018  (another group's option is not there)


def test_a_group_is_a_copy():
    options = TrainOptions(disable_shortcuts=["up"])
    options.unet.disable_shortcuts.append("down")
    assert options.disable_shortcuts == ["up"]


def test_the_command_line_stays_flat_and_names_each_group_in_help():
    parser_help = build_parser(TrainOptions).format_help()
    for group in GROUPS:
        assert f"{group} options:" in parser_help
    options = parse_args(TrainOptions, ["--adam_beta2", "0.99", "--use_ema", "--no-cache_latents"])
    assert (options.adam_beta2, options.use_ema, options.cache_latents) == (0.99, True, False)


def test_builders_take_their_group():
    unet = torch.nn.Linear(2, 2)
    options = TrainOptions(adam_beta2=0.99, ema_max_decay=0.9)
    optimizer = runtime.make_optimizer(options.optim, unet, learning_rate=0.01)
    assert optimizer.defaults["lr"] == 0.01 and optimizer.defaults["betas"] == (0.9, 0.99)
    assert runtime.make_ema(options.ema, unet).max_decay == 0.9
    assert runtime.make_ema(TrainOptions(use_ema=False).ema, unet) is None


def test_eval_options_hand_sampling_the_caching_group():
    options = EvalOptions(checkpoint="runs/x", cache="skip_branch", cache_interval=2)
    assert options.caching == SkipCacheOptions(cache="skip_branch", cache_interval=2)
    assert options.cache == "skip_branch"  # the flag itself is not hidden by its group


def test_a_group_may_not_hide_an_option_or_name_fields_the_options_lack():
    with pytest.raises((TypeError, RuntimeError)) as hidden:

        @dataclasses.dataclass
        class Hiding(SkipCacheOptions):
            cache = OptionGroup(SkipCacheOptions)

    assert "cannot take the name of an option" in str(hidden.value) + str(hidden.value.__cause__)
    with pytest.raises((TypeError, RuntimeError)) as missing:

        @dataclasses.dataclass
        class Partial:
            output_dir: str = option("runs/x", "the folder")
            run = OptionGroup(RunOptions)

    assert "are not options" in str(missing.value) + str(missing.value.__cause__)
