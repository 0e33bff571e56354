"""A search space: typed parameters -> one trial's options (a skip spec, chain options, a UNet config, ...).

Parameters are defined by run (Optuna's define-by-run): what a trial suggests depends on what it
suggested before, so conditional parameters need no extra syntax. A family's parameters exist only
where the trial chose that family (``scalelong.kappa`` only under ``skips: scalelong``, ``markov.cost``
only under ``markov``); a per-skip parameter ``skip.<k>`` exists for each of the trial's own skips
(their number follows the architecture the trial chose), and ``skip.<k>.scale`` only where skip k is
``scale``.

Names in ``space:`` (each a list of choices, or a range ``{low, high[, log, step]}``):

    skips            the skip family: full, none, per_skip or any skip preset (scalelong, linear, freeu, ...)
    skip             per_skip's mode choices for every skip, e.g. [keep, zero, scale]
    skip.<k>         the choices of skip k alone (overrides ``skip`` there)
    skip.scale       the factor of a scaled skip (a range)
    <preset>.<arg>   a preset's argument, e.g. scalelong.kappa, freeu.b1, linear.inner, scalelong.t_max
    markov.<arg>     a Markov-chain option (p_init, cost, warmup_steps, ...), training searches only
    model.<key>      the UNet: block_out_channels, layers_per_block, attention (one bool per level)
    <option>         any other option of a trial (training options, or evaluation options for inference)

Nothing here imports Optuna: a trial is anything with ``suggest_categorical/int/float`` (Optuna's
``Trial`` in a search, :class:`FixedTrial` to rebuild a configuration from its parameters).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from typing import Any

from ..presets import UNET_PRESETS

FAMILY = "skips"
PER_SKIP = "per_skip"
SKIP_MODES = ("keep", "zero", "scale")  # per-skip modes that need no parameters beyond a factor
PREFIXES = ("skip", "markov", "model")
MODEL_KEYS = ("block_out_channels", "layers_per_block", "attention")
TRAINING_ONLY_FAMILIES = ("learned", "rezero", "markov", "stochastic-depth", "learned_channel", "adapter")


@dataclasses.dataclass(frozen=True)
class Param:
    """One searched parameter: categorical ``choices`` or a numeric range."""

    name: str
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    integer: bool = False

    def suggest(self, trial, name: str | None = None) -> Any:
        """The trial's value of this parameter (under ``name``, default its own)."""
        name = name or self.name
        if self.choices is not None:
            encoded = [_encode(c) for c in self.choices]
            return _decode(trial.suggest_categorical(name, encoded))
        if self.integer:
            return trial.suggest_int(name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(name, self.low, self.high, step=self.step, log=self.log)

    def queued(self, value: Any) -> Any:
        """``value`` as Optuna stores it for this parameter (for ``study.enqueue_trial``); ``ValueError``
        naming the value when it is no choice or lies outside the range."""
        if self.choices is not None:
            if _encode(value) not in [_encode(c) for c in self.choices]:
                raise ValueError(f"{self.name}: {value!r} is not one of {list(self.choices)}")
            return _encode(value)
        if isinstance(value, bool) or not isinstance(value, int | float) or not self.low <= value <= self.high:
            raise ValueError(f"{self.name}: {value!r} is not a number in [{self.low}, {self.high}]")
        return value

    def describe(self) -> str:
        if self.choices is not None:
            return f"one of {list(self.choices)}"
        kind = "int" if self.integer else "float"
        return (
            f"{kind} in [{self.low}, {self.high}]"
            + (" (log)" if self.log else "")
            + (f" step {self.step}" if self.step else "")
        )


def _encode(value: Any) -> Any:
    """Optuna's categorical choices are scalars: lists and dicts travel as their JSON text."""
    return json.dumps(value) if isinstance(value, list | dict | tuple) else value


def _decode(value: Any) -> Any:
    if isinstance(value, str) and value[:1] in "[{":
        return json.loads(value)
    return value


def parse_param(name: str, raw: Any) -> Param:
    """A ``space:`` entry -> :class:`Param`; ``ValueError`` naming the parameter on empty or inverted ranges."""
    if isinstance(raw, list):
        if not raw:
            raise ValueError(f"space parameter {name!r} has no choices")
        if len({json.dumps(c, sort_keys=True) for c in raw}) != len(raw):
            raise ValueError(f"space parameter {name!r} lists a choice twice: {raw}")
        return Param(name, choices=tuple(raw))
    if not isinstance(raw, dict):
        raise ValueError(f"space parameter {name!r} must be a list of choices or a range {{low, high}}, got {raw!r}")
    unknown = sorted(set(raw) - {"low", "high", "log", "step", "type"})
    if unknown:
        raise ValueError(
            f"space parameter {name!r}: unknown key(s) {unknown}; a range takes low, high, log, step, type"
        )
    if "low" not in raw or "high" not in raw:
        raise ValueError(f"space parameter {name!r}: a range needs low and high, got {raw!r}")
    low, high = raw["low"], raw["high"]
    for what, value in (("low", low), ("high", high), ("step", raw.get("step", 1))):
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"space parameter {name!r}: {what} must be a finite number, got {value!r}")
    if not low < high:
        raise ValueError(f"space parameter {name!r}: empty or inverted range low={low} high={high}")
    kind = raw.get("type", "int" if isinstance(low, int) and isinstance(high, int) else "float")
    if kind not in ("int", "float"):
        raise ValueError(f"space parameter {name!r}: type must be int or float, got {kind!r}")
    log = raw.get("log", False)
    if not isinstance(log, bool):
        raise ValueError(f"space parameter {name!r}: log must be true or false, got {log!r}")
    if log and low <= 0:
        raise ValueError(f"space parameter {name!r}: a log range needs low > 0, got {low}")
    if log and raw.get("step") is not None:
        raise ValueError(f"space parameter {name!r}: log and step cannot be combined (Optuna refuses them)")
    step = raw.get("step")
    if step is not None and step <= 0:
        raise ValueError(f"space parameter {name!r}: step must be > 0, got {step}")
    return Param(name, low=low, high=high, log=log, step=step, integer=kind == "int")


@dataclasses.dataclass(frozen=True)
class Space:
    """The parsed ``space:``: the skip family and its parameters, per-skip modes, chain, model and options."""

    params: dict[str, Param]

    @property
    def families(self) -> tuple:
        if FAMILY in self.params:
            return self.params[FAMILY].choices
        return (PER_SKIP,) if self.per_skip_modes() else ()

    def per_skip_modes(self) -> Param | None:
        return self.params.get("skip")

    def family_params(self, family: str) -> dict[str, Param]:
        """``<family>.<arg>`` parameters (the arguments of that preset), by argument name."""
        prefix = f"{family}."
        return {n[len(prefix) :]: p for n, p in self.params.items() if n.startswith(prefix)}

    def option_params(self) -> dict[str, Param]:
        """Parameters that are plain options of a trial (no prefix, not the family)."""
        return {n: p for n, p in self.params.items() if n != FAMILY and "." not in n and n != "skip"}

    def param_of(self, name: str) -> Param | None:
        """The parameter that decides ``name``: itself, or for a per-skip ``skip.<k>`` / ``skip.<k>.scale``
        the shared ``skip`` / ``skip.scale`` parameter."""
        if name in self.params:
            return self.params[name]
        parts = name.split(".")
        if parts[0] == "skip" and len(parts) in (2, 3) and parts[1].isdigit() and parts[2:] in ([], ["scale"]):
            return self.params.get(".".join(["skip", *parts[2:]]))
        return None

    def describe(self) -> list[str]:
        return [f"  {name}: {param.describe()}" for name, param in self.params.items()]


def parse_space(raw: Any, option_fields: set[str], training: bool) -> Space:
    """``space:`` -> :class:`Space`, every name checked against what a trial can set."""
    # heavy: torch (the gate registry) only when a space is parsed: the search command line answers --help before it
    from ..skips.spec import PRESETS

    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"space must be a non-empty mapping of parameter -> choices or range, got {raw!r}")
    params = {str(name): parse_param(str(name), value) for name, value in raw.items()}
    families = set(PRESETS) | {PER_SKIP}
    for name, param in params.items():
        head, _, tail = name.partition(".")
        if name == FAMILY:
            bad = [f for f in param.choices or () if f not in families]
            if param.choices is None or bad:
                raise ValueError(
                    f"space skips: unknown skip famil{'ies' if len(bad) > 1 else 'y'} {bad or raw[name]!r}; "
                    f"choose from {sorted(families)}"
                )
            if not training:
                stateful = [f for f in param.choices if f in TRAINING_ONLY_FAMILIES]
                if stateful:
                    raise ValueError(
                        f"space skips: {stateful} need training (gates with parameters or a chain); "
                        "an inference search takes parameter-free skips only"
                    )
        elif name == "skip" or (head == "skip" and tail.isdigit()):
            bad = [m for m in param.choices or () if m not in SKIP_MODES]
            if param.choices is None or bad:
                raise ValueError(
                    f"space {name}: per-skip modes must be a list from {list(SKIP_MODES)}, got {raw[name]!r}"
                )
        elif name == "skip.scale":
            if param.choices is None and param.low < 0:
                raise ValueError(f"space skip.scale: factors must be >= 0, got low={param.low}")
        elif head == "markov" and tail:
            if not training:
                raise ValueError(f"space {name}: Markov-chain parameters need a training search")
        elif head == "model" and tail:
            if tail not in MODEL_KEYS:
                raise ValueError(f"space {name}: unknown model key {tail!r}; model keys: {list(MODEL_KEYS)}")
            if not training:
                raise ValueError(f"space {name}: the architecture can only be searched by training")
        elif tail and head in PRESETS:
            pass  # a preset's argument: checked against the preset when a trial's spec is built
        elif tail:
            raise ValueError(
                f"space {name!r}: unknown prefix {head!r}; use skip., markov., model. or a skip preset "
                f"({sorted(PRESETS)})"
            )
        elif name not in option_fields:
            raise ValueError(
                f"space {name!r} is no option of a trial (nor skips, skip, skip.<k>, <preset>.<arg>, "
                "markov.<arg>, model.<key>)"
            )
    space = Space(params)
    uses_per_skip = PER_SKIP in space.families
    if (
        uses_per_skip
        and space.per_skip_modes() is None
        and not any(n.startswith("skip.") and n[5:].isdigit() for n in params)
    ):
        raise ValueError("space skips includes per_skip but no per-skip modes: add skip: [keep, zero, scale]")
    modes = {
        m for n, p in params.items() if n == "skip" or (n.startswith("skip.") and n[5:].isdigit()) for m in p.choices
    }
    if "scale" in modes and "skip.scale" not in params:
        raise ValueError("space: per-skip mode scale needs its factor range, e.g. skip.scale: {low: 0.2, high: 1.0}")
    for name in params:
        head, _, _ = name.partition(".")
        if "." in name and head not in ("skip", "model") and head not in space.families:
            raise ValueError(
                f"space {name!r} belongs to skip family {head!r}, which space skips never chooses "
                f"(families: {list(space.families)})"
            )
    return space


def num_skips_of(config: dict) -> int:
    """Long skips of a UNet2DModel config: blocks x (layers_per_block + 1)."""
    return len(config["block_out_channels"]) * (int(config["layers_per_block"]) + 1)


@dataclasses.dataclass
class Suggestion:
    """What one trial chose: its options (overrides of ``base``), and the UNet config overrides, if any."""

    options: dict
    model: dict


def suggest(trial, space: Space, num_skips: Callable[[dict], int], base: dict | None = None) -> Suggestion:
    """Ask ``trial`` for every parameter that applies to it, in a fixed order (model, options, skips, chain).

    ``num_skips(model overrides)`` gives the number of long skips of the trial's architecture."""
    model = {key: space.params[f"model.{key}"].suggest(trial) for key in MODEL_KEYS if f"model.{key}" in space.params}
    options = {name: param.suggest(trial) for name, param in space.option_params().items()}
    families = space.families
    if families:
        family = space.params[FAMILY].suggest(trial) if FAMILY in space.params else PER_SKIP
        options["skips"] = _skip_spec(trial, space, family, num_skips(model))
        if family == "markov":  # the chain's parameters exist only in trials that chose the chain
            chain = {arg: p.suggest(trial, f"markov.{arg}") for arg, p in space.family_params("markov").items()}
            if chain:
                given = (base or {}).get("markov") or ""
                options["markov"] = ",".join([given, *(f"{k}={_text(v)}" for k, v in chain.items())]).strip(",")
    return Suggestion(options, model)


def _skip_spec(trial, space: Space, family: str, count: int) -> str:
    """The skip spec string of ``family`` with the trial's arguments (per_skip: one entry per skip)."""
    if family == PER_SKIP:
        entries = []
        for k in range(count):
            param = space.params.get(f"skip.{k}") or space.per_skip_modes()
            mode = param.suggest(trial, f"skip.{k}") if param is not None else "keep"
            if mode == "scale":
                mode = f"scale:{_text(space.params['skip.scale'].suggest(trial, f'skip.{k}.scale'))}"
            entries.append(mode)
        return ",".join(entries)
    if family == "markov":
        return "markov"
    args = {arg: p.suggest(trial, f"{family}.{arg}") for arg, p in space.family_params(family).items()}
    return ":".join([family, *(f"{arg}={_text(value)}" for arg, value in args.items())])


def _text(value: Any) -> str:
    """A number as a skip spec or option string writes it (ASCII decimal, no exponent surprises)."""
    if isinstance(value, float):
        return f"{value:.6g}" if "e" not in f"{value:.6g}" else f"{value:.8f}".rstrip("0")
    return str(value).lower() if isinstance(value, bool) else str(value)


class FixedTrial:
    """A stand-in trial that answers from fixed parameters (to rebuild a configuration, or to check the
    space before a search). A per-skip name it lacks (``skip.3``, ``skip.3.scale``) takes the shared
    ``skip`` / ``skip.scale`` entry; any other missing name raises ``ValueError`` naming it."""

    def __init__(self, params: dict):
        self.params = dict(params)

    def _get(self, name: str):
        if name in self.params:
            return self.params[name]
        head, _, rest = name.partition(".")
        if head == "skip" and rest.endswith(".scale") and "skip.scale" in self.params:
            return self.params["skip.scale"]
        if head == "skip" and rest.isdigit():
            return self.params.get("skip", "keep")
        raise ValueError(f"parameter {name!r} is not set")

    def suggest_categorical(self, name, choices):
        return self._get(name)

    def suggest_int(self, name, low, high, step=1, log=False):
        return self._get(name)

    def suggest_float(self, name, low, high, step=None, log=False):
        return self._get(name)


def first_choices(space: Space, family: str | None = None) -> dict:
    """Every parameter at its first choice or lower end (``family`` as the skip family, when given)."""
    params = {n: _encode(p.choices[0]) if p.choices is not None else p.low for n, p in space.params.items()}
    if family is not None and FAMILY in params:
        params[FAMILY] = family
    return params


def model_config(base_model: str, overrides: dict) -> dict:
    """A UNet preset (or config file) with a trial's model overrides; ``attention`` (one bool per level)
    picks AttnDownBlock2D/AttnUpBlock2D where true. ``ValueError`` when the result cannot be built."""
    if base_model in UNET_PRESETS:
        config = dict(UNET_PRESETS[base_model])
    else:
        config = json.loads(open(base_model).read())
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items() if not k.startswith("_")}
    for key, value in overrides.items():
        if key != "attention":
            config[key] = value
    levels = len(config["block_out_channels"])
    attention = overrides.get("attention")
    if attention is None:  # keep the base's attention levels when only the widths change
        attention = [t.startswith("Attn") for t in config["down_block_types"]][:levels]
        attention += [False] * (levels - len(attention))
    if len(attention) != levels:
        raise ValueError(f"model.attention {attention} needs one entry per level ({levels} levels)")
    config["down_block_types"] = ["AttnDownBlock2D" if a else "DownBlock2D" for a in attention]
    config["up_block_types"] = ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)]
    groups = config.get("norm_num_groups", 32)
    bad = [c for c in config["block_out_channels"] if c % groups]
    if bad:
        raise ValueError(
            f"model.block_out_channels {config['block_out_channels']}: {bad} not divisible by norm_num_groups {groups}"
        )
    return config
