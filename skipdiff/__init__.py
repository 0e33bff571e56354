"""skipdiff: what skip connections do in diffusion UNets, on the Hugging Face stack."""

# ``ModelMixin`` is re-exported on purpose: diffusers' pipeline loader looks up its loadable base
# classes (ModelMixin, SchedulerMixin, ...) in the top-level module of a component's library, so a
# saved DDPMPipeline holding a SkipUNet2DModel only loads if ``skipdiff.ModelMixin`` exists.
from diffusers import ModelMixin  # noqa: F401

from .gates import GATES, PRESETS, SkipGate, SkipInfo, register_gate, register_preset, resolve_spec
from .markov import MarkovChain
from .router import SkipRouter, discover_skips, format_skip_table
from .unet import SkipUNet2DModel, apply_skip_spec

__version__ = "0.1.0"

__all__ = [
    "GATES",
    "PRESETS",
    "MarkovChain",
    "SkipGate",
    "SkipInfo",
    "SkipRouter",
    "SkipUNet2DModel",
    "apply_skip_spec",
    "discover_skips",
    "format_skip_table",
    "register_gate",
    "register_preset",
    "resolve_spec",
]
