"""Skip specifications: a written spec (``"freeu"``, ``"keep,zero,scale:0.5,..."``) -> one entry per skip -> gates.

A *skip specification* says which gate each skip gets. It is stored, resolved to one dict per skip,
in the model's config, e.g. ``[{"mode": "keep"}, {"mode": "scale", "factor": 0.5}, ...]``, and can be
written by hand as:

* one mode for every skip: ``"zero"``, ``"scale:0.7071"``, ``"learned:init=0"``;
* one entry per skip, comma-separated or as a list: ``"keep,zero,scale:0.5,..."``;
* a named preset (:data:`PRESETS`): ``"full"``, ``"none"``, ``"scalelong:kappa=0.8"``, ``"freeu"``,
  ``"freeu2"``, ``"linear:outer=1:inner=0.5"``, ...

Entry syntax: ``mode[:value][:key=value]...``; a bare value is the mode's first parameter.

Timestep windows: every gate that can be switched off per example (all but ``keep``, ``remove`` and
the stochastic gates: :attr:`~skipdiff.skips.gate.SkipGate.windowable`) takes the options ``t_min`` and ``t_max``. The gate
then acts on the examples whose timestep t satisfies ``t_min <= t < t_max`` and leaves both tensors
untouched on the others: ``scale:0.5:t_min=500`` scales the skip on the noisier half of a 1000-step
schedule only, ``fourier:backbone=1.5:skip=0.9:t_max=800`` applies FreeU below t = 800,
``learned:init=1:t_min=200:t_max=600`` learns a scalar used inside the window. The window is
half-open, so ``t_max=500`` and ``t_min=500`` split a trajectory in two. A preset takes them too and
puts them on each of its entries that acts (``freeu:t_min=500``, ``linear:inner=0.5:t_max=300``);
``keep`` entries stay ``keep``. Windows are options rather than a wrapper mode so that they compose
with every gate without a nested syntax and the stored config keeps one flat dict per skip. A
factor that varies continuously with t is the ``ramp`` mode.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

from ..config import parse_number
from .deterministic import KeepGate
from .fourier import FourierGate
from .gate import GATES, SkipGate, SkipInfo, SkipSpec, _as_bool, _finite
from .stochastic import BernoulliGate

# Importing a family's module registers its gates in GATES, and the parser must know every built-in
# mode: one gate of each family, so that the imports above are not unused.
BUILTIN_FAMILIES = (KeepGate, FourierGate, BernoulliGate)

# Specification parsing
# --------------------------------------------------------------------------------------------------

PresetFn = Callable[..., list[dict]]
PRESETS: dict[str, PresetFn] = {}


def register_preset(name: str) -> Callable[[PresetFn], PresetFn]:
    """Function decorator: ``fn(skips: list[SkipInfo], **options) -> list[dict]`` under ``name``."""

    def decorator(fn: PresetFn) -> PresetFn:
        if name in PRESETS:
            raise ValueError(f"skip preset {name!r} is already registered")
        PRESETS[name] = fn
        return fn

    return decorator


# Options every windowable gate takes besides its own (see the module docstring).
WINDOW_OPTIONS = ("t_min", "t_max")


def _gate_parameters(mode: str) -> list[str]:
    """The options an entry of ``mode`` may carry: its gate's parameters, then the window's."""
    names = [n for n in inspect.signature(GATES[mode].__init__).parameters if n not in ("self", "info")]
    return names + list(WINDOW_OPTIONS) if GATES[mode].windowable else names


def parse_entry(entry: str | dict) -> dict:
    """Parse one skip entry (``"scale:0.5"`` or ``{"mode": "scale", "factor": 0.5}``) to a dict.

    The mode must be registered and every option must be one of its gate's parameters.
    """
    if isinstance(entry, dict):
        if "mode" not in entry:
            raise ValueError(f"skip entry {entry!r} has no 'mode'")
        parsed = dict(entry)
    elif isinstance(entry, str):
        head, *options = [part.strip() for part in entry.strip().split(":")]
        parsed = {"mode": head}
        # A bare value is the gate's own first parameter, never a window bound ("zero:0.5" is an error).
        positional = [n for n in _gate_parameters(head) if n not in WINDOW_OPTIONS][:1] if head in GATES else []
        for i, option in enumerate(options):
            if "=" in option:
                key, value = option.split("=", 1)
                parsed[key.strip()] = parse_number(value.strip())
            elif i == 0 and positional:
                parsed[positional[0]] = parse_number(option)
            else:
                raise ValueError(f"cannot read option {option!r} of skip entry {entry!r}")
    else:
        raise ValueError(f"a skip entry must be a string or a dict, got {entry!r}")
    mode = parsed["mode"]
    if mode not in GATES:
        raise ValueError(f"unknown skip mode {mode!r}; known modes: {sorted(GATES)}")
    unknown = set(parsed) - {"mode"} - set(_gate_parameters(mode))
    if unknown:
        raise ValueError(f"skip mode {mode!r} has no option(s) {sorted(unknown)}; it takes {_gate_parameters(mode)}")
    return parsed


def resolve_spec(spec: SkipSpec | None, skips: Sequence[SkipInfo]) -> list[dict]:
    """Resolve a specification to one entry dict per skip (validated by building every gate)."""
    count = len(skips)
    if spec is None:
        spec = "full"
    if isinstance(spec, str):
        text = spec.strip()
        if "," in text:
            entries = [parse_entry(part) for part in text.split(",")]
        else:
            name = text.partition(":")[0]
            if name in PRESETS:
                options = _preset_options(text)
                window = {k: options.pop(k) for k in WINDOW_OPTIONS if k in options}
                entries = _with_window(PRESETS[name](list(skips), **options), window, name)
            elif name in GATES:
                entries = [parse_entry(text)] * count
            else:
                raise ValueError(
                    f"unknown skip mode or preset {name!r}; modes: {sorted(GATES)}, presets: {sorted(PRESETS)}"
                )
    else:
        entries = [parse_entry(e) for e in spec]
    if len(entries) != count:
        raise ValueError(f"the skip specification has {len(entries)} entries but the model has {count} skips")
    resolved = [dict(e) for e in entries]
    for info, entry in zip(skips, resolved, strict=True):
        build_gate(entry, info)  # validates option values (NaN, negative, ...) before any work
    return resolved


def _preset_options(text: str) -> dict:
    name, _, option_text = text.partition(":")
    options: dict[str, Any] = {}
    for option in filter(None, option_text.split(":")):
        if "=" not in option:
            raise ValueError(f"preset options are key=value, got {option!r} in {text!r}")
        key, value = option.split("=", 1)
        options[key.strip()] = parse_number(value.strip())
    parameters = list(inspect.signature(PRESETS[name]).parameters.values())[1:]  # after ``skips``
    accepted = [p.name for p in parameters]
    # A preset taking **options passes them to its gate, whose parse_entry names unknown keys.
    unknown = set() if any(p.kind is p.VAR_KEYWORD for p in parameters) else set(options) - set(accepted)
    unknown -= set(WINDOW_OPTIONS)  # every preset takes a timestep window (see _with_window)
    if unknown:
        raise ValueError(
            f"skip preset {name!r} has no option(s) {sorted(unknown)}; it takes {accepted + list(WINDOW_OPTIONS)}"
        )
    return options


def _with_window(entries: list[dict], window: dict, preset: str) -> list[dict]:
    """A preset's entries with the timestep window on each one that acts; ``keep`` entries stay ``keep``."""
    if not window:
        return entries
    windowed = []
    for entry in map(parse_entry, entries):
        gate = GATES[entry["mode"]]
        if not gate.is_identity and not gate.windowable:
            raise ValueError(
                f"skip preset {preset!r} gives skips the mode {entry['mode']!r}, which takes no timestep window"
            )
        windowed.append(entry if gate.is_identity else {**entry, **window})
    return windowed


def build_gate(entry: dict, info: SkipInfo) -> SkipGate:
    """Instantiate the gate an entry names for one skip."""
    entry = parse_entry(entry)
    options = {k: v for k, v in entry.items() if k != "mode" and k not in WINDOW_OPTIONS}
    gate = GATES[entry["mode"]](info, **options)
    window = {k: entry[k] for k in WINDOW_OPTIONS if k in entry}
    if window:
        gate.set_window(**window)
    return gate


def format_entry(entry: dict) -> str:
    """The short string form of an entry, e.g. ``scale:factor=0.5``."""
    options = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items() if k != "mode"]
    return ":".join([entry["mode"], *options])


# --------------------------------------------------------------------------------------------------
# Presets (each: skips in decoder order -> one entry per skip)
# --------------------------------------------------------------------------------------------------


def _all(mode: str, **defaults) -> PresetFn:
    """A preset giving every skip the same gate; options (``markov:rescale=true``) go to the gate."""

    def preset(skips: list[SkipInfo], **options) -> list[dict]:
        return [parse_entry({"mode": mode, **defaults, **options}) for _ in skips]

    return preset


register_preset("full")(_all("keep"))
register_preset("none")(_all("zero"))
register_preset("removed")(_all("remove"))
register_preset("inv-sqrt2")(_all("scale", factor=1.0 / math.sqrt(2.0)))
register_preset("rezero")(_all("learned", init=0.0))
register_preset("learned")(_all("learned", init=1.0))
register_preset("markov")(_all("markov"))


@register_preset("stochastic-depth")
def stochastic_depth(skips: list[SkipInfo], p: float = 0.8, rescale: bool = False) -> list[dict]:
    """Independent Bernoulli gates with keep probability ``p`` (Huang et al., 2016)."""
    return [{"mode": "bernoulli", "p": p, "rescale": rescale} for _ in skips]


@register_preset("scalelong")
def scalelong(skips: list[SkipInfo], kappa: float = 0.7) -> list[dict]:
    """ScaleLong CS: skip k (decoder order, 0 = innermost) is scaled by kappa^(K-1-k).

    The innermost skip is scaled most and the outermost by 1 (Huang et al., NeurIPS 2023).
    """
    kappa = _finite("scalelong kappa", kappa)
    if not 0.0 < kappa <= 1.0:
        raise ValueError(f"scalelong kappa must lie in (0, 1], got {kappa}")
    count = len(skips)
    return [{"mode": "scale", "factor": kappa ** (count - 1 - s.index)} for s in skips]


@register_preset("freeu")
def freeu(
    skips: list[SkipInfo],
    b1: float = 1.5,
    b2: float = 1.6,
    s1: float = 0.9,
    s2: float = 0.2,
    structure: bool = False,
) -> list[dict]:
    """FreeU on the first two up blocks (defaults: the SD1.5 recommendation); other skips kept.

    ``structure=true`` (or the preset ``freeu2``) is FreeU v2's structure-aware backbone factor.
    """
    factors = {0: (b1, s1), 1: (b2, s2)}
    extra = {"structure": True} if _as_bool("freeu structure", structure) else {}
    return [
        {"mode": "fourier", "backbone": factors[s.up_block][0], "skip": factors[s.up_block][1], **extra}
        if s.up_block in factors
        else {"mode": "keep"}
        for s in skips
    ]


@register_preset("freeu2")
def freeu2(skips: list[SkipInfo], b1: float = 1.5, b2: float = 1.6, s1: float = 0.9, s2: float = 0.2) -> list[dict]:
    """FreeU v2 (the FreeU README): ``freeu`` with the structure-aware backbone factor
    ``(b - 1) * minmax(mean_c(h)) + 1`` on the first half of the backbone channels."""
    return freeu(skips, b1=b1, b2=b2, s1=s1, s2=s2, structure=True)


@register_preset("linear")
def linear(skips: list[SkipInfo], outer: float = 1.0, inner: float = 0.5) -> list[dict]:
    """A skip-scale profile linear in depth: skip k (decoder order, 0 = innermost) is scaled by
    ``inner + (outer - inner) * k / (K - 1)``, from ``inner`` at the innermost skip to ``outer`` at the
    outermost (a single skip gets ``outer``). Skip-Tuning (Ma et al., ICML 2024) rescales skips by
    depth at sampling time; add ``t_min``/``t_max`` to act on part of the trajectory only."""
    outer, inner = _finite("linear outer", outer), _finite("linear inner", inner)
    last = len(skips) - 1
    return [{"mode": "scale", "factor": inner + (outer - inner) * s.index / last if last else outer} for s in skips]


@register_preset("outer-only")
def outer_only(skips: list[SkipInfo]) -> list[dict]:
    """Keep the skips at the highest resolution (the outermost level), zero the rest."""
    top = max(s.resolution for s in skips)
    return [{"mode": "keep" if s.resolution == top else "zero"} for s in skips]


@register_preset("inner-only")
def inner_only(skips: list[SkipInfo]) -> list[dict]:
    """Keep the skips at the lowest resolution (the innermost level), zero the rest."""
    bottom = min(s.resolution for s in skips)
    return [{"mode": "keep" if s.resolution == bottom else "zero"} for s in skips]
