"""skipdiff: what skip connections do in diffusion UNets, on the Hugging Face stack.

Names are imported lazily (on first use), so that command-line tools can parse and check their
options, and answer ``--help``, without importing torch and diffusers first.
"""

from __future__ import annotations

from .lazy import lazy_exports

__version__ = "0.1.0"

# name -> module (relative to this package) that defines it; the skip names come through the front door
# of skipdiff.skips, the package that decides what a skip does.
_EXPORTS = {
    "GATES": ".skips",
    "PRESETS": ".skips",
    "SkipGate": ".skips",
    "SkipInfo": ".skips",
    "register_gate": ".skips",
    "register_preset": ".skips",
    "resolve_spec": ".skips",
    "MarkovChain": ".skips",
    "SkipRouter": ".skips",
    "discover_skips": ".skips",
    "format_skip_table": ".skips",
    "SkipUNet2DModel": ".skips",
    "apply_skip_spec": ".skips",
    "skip_spec_applied": ".skips",
    "SkipDiffPipeline": ".pipeline",
    "StudyTarget": ".targets",
    "load_target": ".targets",
    "enable_skip_cache": ".skips",
    "disable_skip_cache": ".skips",
    "skip_cache": ".skips",
    "SkipCacheOptions": ".skips",
    "load_skip_gates": ".skips",
    "save_skip_gates": ".skips",
    "unload_skip_gates": ".skips",
    # diffusers' pipeline loader looks up its loadable base classes (ModelMixin, SchedulerMixin, ...)
    # in the top-level module of a component's library, so a saved DDPMPipeline holding a
    # SkipUNet2DModel only loads if ``skipdiff.ModelMixin`` exists.
    "ModelMixin": "diffusers",
}

__all__ = sorted(name for name in _EXPORTS if name != "ModelMixin")

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
