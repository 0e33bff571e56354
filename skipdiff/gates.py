"""Deprecated: the gates moved to :mod:`skipdiff.skips`, one module per concept (this path warns and will go).

:mod:`skipdiff.skips.gate` (the interface and :data:`~skipdiff.skips.gate.GATES`),
:mod:`skipdiff.skips.deterministic`, :mod:`skipdiff.skips.fourier`, :mod:`skipdiff.skips.stochastic` (the gate
families) and :mod:`skipdiff.skips.spec` (parsing and the presets). This module re-exports what it held.
"""

from __future__ import annotations

import warnings

from .skips.deterministic import (  # noqa: F401
    AdapterGate,
    KeepGate,
    LearnedChannelGate,
    LearnedScalarGate,
    RampGate,
    RemoveGate,
    ScaleGate,
    ZeroGate,
)
from .skips.fourier import FourierGate, _fourier_window_operator  # noqa: F401
from .skips.gate import GATES, SkipGate, SkipInfo, SkipSpec, register_gate  # noqa: F401
from .skips.spec import (  # noqa: F401
    PRESETS,
    WINDOW_OPTIONS,
    PresetFn,
    build_gate,
    format_entry,
    freeu,
    freeu2,
    inner_only,
    linear,
    outer_only,
    parse_entry,
    register_preset,
    resolve_spec,
    scalelong,
    stochastic_depth,
)
from .skips.stochastic import BernoulliGate, MarkovGate, StochasticGate  # noqa: F401

warnings.warn(
    "skipdiff.gates has moved to skipdiff.skips (gate, deterministic, fourier, stochastic, spec); "
    "import from there (the old path will go)",
    DeprecationWarning,
    stacklevel=2,
)
