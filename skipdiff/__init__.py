"""skipdiff: what skip connections do in diffusion UNets, on the Hugging Face stack.

Names are imported lazily (on first use), so that command-line tools can parse and check their
options, and answer ``--help``, without importing torch and diffusers first.
"""

from __future__ import annotations

from .lazy import lazy_exports

__version__ = "0.1.0"

# name -> module (relative to this package) that defines it.
_EXPORTS = {
    "GATES": ".gates",
    "PRESETS": ".gates",
    "SkipGate": ".gates",
    "SkipInfo": ".gates",
    "register_gate": ".gates",
    "register_preset": ".gates",
    "resolve_spec": ".gates",
    "MarkovChain": ".markov",
    "SkipRouter": ".router",
    "discover_skips": ".router",
    "format_skip_table": ".router",
    "SkipUNet2DModel": ".unet",
    "apply_skip_spec": ".unet",
    "SkipDiffPipeline": ".pipeline",
    "StudyTarget": ".targets",
    "load_target": ".targets",
    "enable_skip_cache": ".caching",
    "disable_skip_cache": ".caching",
    "skip_cache": ".caching",
    "SkipCacheOptions": ".cache_options",
    "load_skip_gates": ".adapters",
    "save_skip_gates": ".adapters",
    "unload_skip_gates": ".adapters",
    # diffusers' pipeline loader looks up its loadable base classes (ModelMixin, SchedulerMixin, ...)
    # in the top-level module of a component's library, so a saved DDPMPipeline holding a
    # SkipUNet2DModel only loads if ``skipdiff.ModelMixin`` exists.
    "ModelMixin": "diffusers",
}

__all__ = sorted(name for name in _EXPORTS if name != "ModelMixin")

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
