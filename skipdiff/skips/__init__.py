"""Everything that decides what a long skip does and how it attaches to a UNet: one room of skipdiff.

The front door: the names below are what the README and the docs use, imported lazily (on first use),
so that command lines can read their options (``skipdiff.skips.cache_options``) without torch.

* :mod:`skipdiff.skips.gate`: the gate interface (:class:`~skipdiff.skips.gate.SkipGate`,
  :class:`~skipdiff.skips.gate.SkipInfo`) and the registry :data:`~skipdiff.skips.gate.GATES`;
* :mod:`skipdiff.skips.deterministic`: keep, zero, remove, scale, learned, learned_channel, ramp, adapter;
* :mod:`skipdiff.skips.fourier`: FreeU's ``fourier`` gate;
* :mod:`skipdiff.skips.stochastic`: bernoulli and markov (a per-example state sampled by the router);
* :mod:`skipdiff.skips.spec`: the skip specification (parsing, the presets :data:`~skipdiff.skips.spec.PRESETS`,
  gates built from entries);
* :mod:`skipdiff.skips.markov`: the Markov chain along the decoder (for UNets and classifiers alike);
* :mod:`skipdiff.skips.router`: where skips meet the decoder (one pre-hook per receiving resnet);
* :mod:`skipdiff.skips.unet`: :class:`~skipdiff.skips.unet.SkipUNet2DModel` (a new model with skips, also
  from an existing UNet) and skips put on any diffusers UNet for a while;
* :mod:`skipdiff.skips.cache_options` (torch-free, for command lines) and :mod:`skipdiff.skips.caching`:
  skip-branch caching and encoder propagation across sampling steps;
* :mod:`skipdiff.skips.adapters`: trained gates saved, loaded and stacked as artefacts (as peft saves LoRA).

The old paths (``skipdiff.gates``, ``skipdiff.router``, ``skipdiff.unet``, ...) still import, with a
``DeprecationWarning``.
"""

from __future__ import annotations

from ..lazy import lazy_exports

# name -> module (relative to this package) that defines it.
_EXPORTS = {
    "SkipGate": ".gate",
    "SkipInfo": ".gate",
    "SkipSpec": ".gate",
    "register_gate": ".gate",
    # GATES is filled as the gate families are imported: .spec imports all of them.
    "GATES": ".spec",
    "PRESETS": ".spec",
    "register_preset": ".spec",
    "parse_entry": ".spec",
    "resolve_spec": ".spec",
    "build_gate": ".spec",
    "format_entry": ".spec",
    "MarkovChain": ".markov",
    "SkipRouter": ".router",
    "discover_skips": ".router",
    "format_skip_table": ".router",
    "SkipUNet2DModel": ".unet",
    "apply_skip_spec": ".unet",
    "skip_spec_applied": ".unet",
    "SkipCacheOptions": ".cache_options",
    "enable_skip_cache": ".caching",
    "disable_skip_cache": ".caching",
    "skip_cache": ".caching",
    "load_skip_gates": ".adapters",
    "save_skip_gates": ".adapters",
    "unload_skip_gates": ".adapters",
    "push_skip_gates": ".adapters",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
