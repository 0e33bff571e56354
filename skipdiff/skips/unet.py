"""``SkipUNet2DModel``: diffusers' ``UNet2DModel`` with a skip specification in its config.

The backbone is diffusers' own; skipdiff adds, per long skip, a gate (see :mod:`skipdiff.skips.gate`)
applied by a :class:`~skipdiff.skips.router.SkipRouter`, and a switch for the residual shortcut inside
the resnet blocks of the down path, the mid block and the up path. Both live in the config, so a
variant round-trips through ``save_pretrained`` / ``from_pretrained`` like any diffusers model.

Skips are indexed in the order the decoder consumes them: skip 0 is the innermost (lowest
resolution, first up block's first resnet), skip K-1 the outermost (``conv_in``'s output, received
by the last resnet of the last up block). ``model.describe_skips()`` lists them.

Three ways to put skips on a UNet, one for each need:

* :meth:`SkipUNet2DModel.from_unet`: a new model, another UNet's architecture and weights with these
  skips (to train, or an inference variant to save);
* :func:`skip_spec_applied`: for the length of a ``with`` block, on any diffusers UNet (a stock one or a
  ``SkipUNet2DModel``), its weights untouched and the model bit for bit the same afterwards;
* :func:`apply_skip_spec`: the attaching step under it, for a stock ``UNet2DModel`` or
  ``UNet2DConditionModel`` (Stable Diffusion's): the gates stay until ``router.detach()``; training uses it
  to give a ``UNet2DConditionModel`` trainable gates, which ``from_unet`` cannot rebuild.
"""

from __future__ import annotations

import contextlib
import json
import logging
from typing import Any

import torch
from diffusers import ModelMixin, UNet2DModel  # noqa: F401  (ModelMixin: see the note in skipdiff/__init__.py)
from diffusers.configuration_utils import register_to_config
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from ..config import SHORTCUT_PARTS
from .gate import SkipSpec
from .router import SkipRouter, discover_skips, format_skip_table

# What a saved config.json says in ``up_block_types`` when the model is not a plain UNet2DModel.
#
# diffusers' ``UNet2DModel.from_pretrained`` on such a checkpoint would ignore ``skips``,
# ``residual_shortcuts`` and ``markov`` (a logged warning, extract_init_dict), build every up block
# without gates and load the weights that fit (gate parameters are "unexpected keys": another
# warning): a different model, silently. Nothing in a config can make that loader call skipdiff's
# code, but its ``get_up_block`` raises ``ValueError(f"{up_block_type} does not exist.")`` for a block
# type it does not know, so the note in the block type name becomes the error the user reads:
#   ValueError: UpBlock2D [skipdiff: load with SkipUNet2DModel or trust_remote_code=True] does not exist.
# SkipUNet2DModel strips the note when it reads the config, and the model's in-memory config never
# holds it (checkpoints and resumed runs compare the plain names). A model that is a plain UNet2DModel
# (every skip ``keep``, every shortcut on: :meth:`SkipUNet2DModel.is_plain_unet`) saves plain names,
# and UNet2DModel loads it correctly (same weights, same outputs).
PLAIN_LOADER_NOTE = " [skipdiff: load with SkipUNet2DModel or trust_remote_code=True]"
# The config keys only SkipUNet2DModel reads. Before that error, UNet2DModel's loader would log that they
# "were passed to UNet2DModel, but are not expected and will be ignored": words that say the opposite of
# the refusal that follows. A saved (non-plain) config therefore lists them under diffusers' own
# ``_use_default_values`` (keys its loader drops silently: how it marks a value that was never passed),
# and SkipUNet2DModel.extract_init_dict takes them back out of that list, so it reads them.
SKIPDIFF_CONFIG_KEYS = ("markov", "residual_shortcuts", "skips")

logger = logging.getLogger(__name__)  # warnings reach stderr unless the application configures logging


def without_note(block_types) -> tuple[str, ...]:
    """``up_block_types`` as diffusers names them (:data:`PLAIN_LOADER_NOTE` removed)."""
    return tuple(t[: -len(PLAIN_LOADER_NOTE)] if t.endswith(PLAIN_LOADER_NOTE) else t for t in block_types)


class ZeroShortcut(nn.Module):
    """Stands in for a resnet's shortcut branch to disable it: the block then outputs only its
    residual branch, ``(0 + F(x)) / output_scale_factor``.

    ``ResnetBlock2D`` computes ``(shortcut(x) + F(x)) / s`` with ``shortcut`` the identity or its
    ``conv_shortcut``; setting ``conv_shortcut`` to this module reuses diffusers' forward unchanged.
    """

    def __init__(self, out_channels: int):
        super().__init__()
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(x.shape[0], self.out_channels, *x.shape[2:])


def resolve_shortcuts(residual_shortcuts: dict | bool | None) -> dict[str, bool]:
    """``{"down": bool, "mid": bool, "up": bool}`` from a dict, one bool for all, or None (all on)."""
    if residual_shortcuts is None or residual_shortcuts is True:
        return {part: True for part in SHORTCUT_PARTS}
    if residual_shortcuts is False:
        return {part: False for part in SHORTCUT_PARTS}
    if not isinstance(residual_shortcuts, dict):
        raise ValueError(f"residual_shortcuts must be a dict, a bool or None, got {residual_shortcuts!r}")
    unknown = set(residual_shortcuts) - set(SHORTCUT_PARTS)
    if unknown:
        raise ValueError(f"residual_shortcuts has unknown part(s) {sorted(unknown)}; parts: {SHORTCUT_PARTS}")
    resolved = {part: residual_shortcuts.get(part, True) for part in SHORTCUT_PARTS}
    for part, value in resolved.items():
        if not isinstance(value, bool):
            raise ValueError(f"residual_shortcuts[{part!r}] must be true or false, got {value!r}")
    return resolved


def _resnets_of(unet: nn.Module, part: str) -> list[ResnetBlock2D]:
    blocks = {
        "down": unet.down_blocks,
        "mid": [unet.mid_block] if unet.mid_block is not None else [],
        "up": unet.up_blocks,
    }[part]
    return [m for block in blocks for m in block.modules() if isinstance(m, ResnetBlock2D)]


def _resnet_without_skip(resnet: ResnetBlock2D, main_channels: int, act_fn: str) -> ResnetBlock2D:
    """A resnet like ``resnet`` but taking only the backbone's ``main_channels`` as input."""
    groups = resnet.norm1.num_groups
    if main_channels % groups:
        raise ValueError(
            f"cannot remove a skip: the backbone's {main_channels} channels do not divide into norm_num_groups={groups}"
        )
    return ResnetBlock2D(
        in_channels=main_channels,
        out_channels=resnet.out_channels,
        temb_channels=resnet.time_emb_proj.in_features if resnet.time_emb_proj is not None else None,
        eps=resnet.norm1.eps,
        groups=groups,
        groups_out=resnet.norm2.num_groups,
        dropout=resnet.dropout.p,
        time_embedding_norm=resnet.time_embedding_norm,
        non_linearity=act_fn,
        output_scale_factor=resnet.output_scale_factor,
        skip_time_act=resnet.skip_time_act,
        pre_norm=True,
    )


class SkipUNet2DModel(UNet2DModel):
    r"""A ``UNet2DModel`` whose long skips and residual shortcuts are controlled by its config.

    Takes every argument of ``UNet2DModel`` plus:

    Args:
        skips: the skip specification: a preset name (``"full"``, ``"none"``, ``"scalelong"``,
            ``"freeu"``, ``"freeu2"``, ``"linear"``, ``"outer-only"``, ``"inner-only"``, ...), one mode
            for all skips (``"zero"``, ``"scale:0.7"``, ``"adapter"``, ``"scale:0.5:t_min=500"``), or one
            entry per skip. Stored resolved, one dict per skip.
        residual_shortcuts: ``{"down": bool, "mid": bool, "up": bool}``; ``False`` disables the
            shortcut of every resnet block in that part (for vanishing-gradient studies).
        markov: options of the Markov chain used by ``markov`` gates (see :mod:`skipdiff.skips.markov`).
    """

    # Every parameter is spelled out: from_pretrained reads this signature and drops unknown keys.
    @register_to_config
    def __init__(
        self,
        sample_size: int | tuple[int, int] | None = None,
        in_channels: int = 3,
        out_channels: int = 3,
        center_input_sample: bool = False,
        time_embedding_type: str = "positional",
        time_embedding_dim: int | None = None,
        freq_shift: int = 0,
        flip_sin_to_cos: bool = True,
        down_block_types: tuple[str, ...] = (
            "DownBlock2D",
            "AttnDownBlock2D",
            "AttnDownBlock2D",
            "AttnDownBlock2D",
        ),
        mid_block_type: str | None = "UNetMidBlock2D",
        up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        block_out_channels: tuple[int, ...] = (224, 448, 672, 896),
        layers_per_block: int = 2,
        mid_block_scale_factor: float = 1,
        downsample_padding: int = 1,
        downsample_type: str = "conv",
        upsample_type: str = "conv",
        dropout: float = 0.0,
        act_fn: str = "silu",
        attention_head_dim: int | None = 8,
        norm_num_groups: int = 32,
        attn_norm_num_groups: int | None = None,
        norm_eps: float = 1e-5,
        resnet_time_scale_shift: str = "default",
        add_attention: bool = True,
        class_embed_type: str | None = None,
        num_class_embeds: int | None = None,
        num_train_timesteps: int | None = None,
        skips: SkipSpec | None = "full",
        residual_shortcuts: dict | None = None,
        markov: dict | None = None,
    ):
        up_block_types = without_note(up_block_types)  # a saved config notes them (see PLAIN_LOADER_NOTE)
        super().__init__(
            sample_size=sample_size,
            in_channels=in_channels,
            out_channels=out_channels,
            center_input_sample=center_input_sample,
            time_embedding_type=time_embedding_type,
            time_embedding_dim=time_embedding_dim,
            freq_shift=freq_shift,
            flip_sin_to_cos=flip_sin_to_cos,
            down_block_types=down_block_types,
            mid_block_type=mid_block_type,
            up_block_types=up_block_types,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            mid_block_scale_factor=mid_block_scale_factor,
            downsample_padding=downsample_padding,
            downsample_type=downsample_type,
            upsample_type=upsample_type,
            dropout=dropout,
            act_fn=act_fn,
            attention_head_dim=attention_head_dim,
            norm_num_groups=norm_num_groups,
            attn_norm_num_groups=attn_norm_num_groups,
            norm_eps=norm_eps,
            resnet_time_scale_shift=resnet_time_scale_shift,
            add_attention=add_attention,
            class_embed_type=class_embed_type,
            num_class_embeds=num_class_embeds,
            num_train_timesteps=num_train_timesteps,
        )
        shortcuts = resolve_shortcuts(residual_shortcuts)
        self.skip_router = SkipRouter(discover_skips(self), skips, markov)
        self._remove_skip_channels()
        self._disable_shortcuts(shortcuts)
        # Store the resolved forms, so that config.json says exactly what each skip does.
        self.register_to_config(skips=self.skip_router.entries, residual_shortcuts=shortcuts, markov=markov or {})
        self.skip_router.attach(self)

    @classmethod
    def from_unet(
        cls,
        unet: nn.Module,
        skips: SkipSpec | None = "full",
        residual_shortcuts: dict | None = None,
        markov: dict | None = None,
        strict: bool = False,
    ) -> SkipUNet2DModel:
        """A new ``SkipUNet2DModel`` with ``unet``'s architecture and weights and the given skips, as
        diffusers' ``ControlNetModel.from_unet`` builds one model from another.

        ``unet``: a ``UNet2DModel`` or a ``SkipUNet2DModel`` (its skip settings are replaced, not merged).
        ``skips``, ``residual_shortcuts``, ``markov``: as in the constructor. The backbone's weights load
        strictly. With ``strict=False`` (a new model to train), where the new model reads fewer channels
        (``remove`` skips) or has no shortcut (``residual_shortcuts`` false), the weights that read what was
        dropped are cut away and a message names them, and gates with parameters start fresh. With
        ``strict=True`` (an inference variant of a trained model) the whole state dict, gates included,
        must fit: ``ValueError`` otherwise. For a temporary change of an existing model's skips use
        :func:`skip_spec_applied` instead."""
        own = ("skips", "residual_shortcuts", "markov")
        config = {k: v for k, v in unet.config.items() if not k.startswith("_") and k not in own}
        model = cls(**config, skips=skips, residual_shortcuts=residual_shortcuts, markov=markov)
        if strict:
            try:
                model.load_state_dict(unet.state_dict(), strict=True)
            except RuntimeError as err:
                raise ValueError(
                    f"the weights do not fit skips {skips!r} (strict: the gates must be parameter-free "
                    f"on both sides or match): {err}"
                ) from err
            return model
        state = {k: v for k, v in unet.state_dict().items() if not k.startswith("skip_router.")}
        target = model.state_dict()
        dropped = []
        for key, value in list(state.items()):
            if key not in target:
                dropped.append(key)
                del state[key]
            elif target[key].shape != value.shape:
                state[key] = _cut_to(value, target[key].shape)
                dropped.append(f"{key} {tuple(value.shape)} -> {tuple(target[key].shape)}")
        state.update({k: v for k, v in target.items() if k.startswith("skip_router.")})
        model.load_state_dict(state, strict=True)
        if dropped:
            logger.warning(
                "pretrained weights: dropped what reads removed skips or disabled shortcuts: %s", "; ".join(dropped)
            )
        return model

    def _remove_skip_channels(self) -> None:
        for gate in self.skip_router.gates:
            if gate.removes_skip:
                info = gate.info
                block = self.up_blocks[info.up_block]
                block.resnets[info.layer] = _resnet_without_skip(
                    block.resnets[info.layer], info.main_channels, self.config.act_fn
                )

    def _disable_shortcuts(self, shortcuts: dict[str, bool]) -> None:
        for part, enabled in shortcuts.items():
            if not enabled:
                for resnet in _resnets_of(self, part):
                    resnet.conv_shortcut = ZeroShortcut(resnet.out_channels)

    # ---- saving --------------------------------------------------------------------------------

    def is_plain_unet(self) -> bool:
        """True when this model computes what diffusers' ``UNet2DModel`` with the same weights computes
        (every skip ``keep``, every residual shortcut on): then it is saved as one."""
        return all(gate.is_identity for gate in self.skip_router.gates) and all(self.config.residual_shortcuts.values())

    def to_json_string(self) -> str:
        """The config as diffusers saves it; unless :meth:`is_plain_unet`, ``up_block_types`` carry
        :data:`PLAIN_LOADER_NOTE`, so that a plain ``UNet2DModel`` refuses the checkpoint by name."""
        text = super().to_json_string()
        if self.is_plain_unet():
            return text
        config = json.loads(text)
        config["up_block_types"] = [t + PLAIN_LOADER_NOTE for t in without_note(config["up_block_types"])]
        config["_use_default_values"] = list(SKIPDIFF_CONFIG_KEYS)  # see SKIPDIFF_CONFIG_KEYS
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        """diffusers' own, except that skipdiff's keys are read even where a saved config lists them under
        ``_use_default_values`` for plain loaders (:data:`SKIPDIFF_CONFIG_KEYS`)."""
        defaults = [k for k in config_dict.get("_use_default_values", []) if k not in SKIPDIFF_CONFIG_KEYS]
        return super().extract_init_dict({**config_dict, "_use_default_values": defaults}, **kwargs)

    # ---- inspection ----------------------------------------------------------------------------

    def describe_skips(self) -> list[dict[str, Any]]:
        """One dict per long skip, in decoder order: index, receiving ``up_block``/``layer``,
        ``source`` module, ``resolution``, ``skip_channels``, ``main_channels``, ``gate``, ``p_open``."""
        return self.skip_router.describe()

    def skip_table(self) -> str:
        """:meth:`describe_skips` as a printable table."""
        return format_skip_table(self.describe_skips())

    @property
    def num_skips(self) -> int:
        return len(self.skip_router.skips)


def _cut_to(value: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The leading slice of ``value`` with ``shape`` (the backbone channels come first in the concatenation)."""
    if value.ndim != len(shape) or any(new > old for new, old in zip(shape, value.shape, strict=True)):
        raise ValueError(f"cannot cut pretrained weights of shape {tuple(value.shape)} to {tuple(shape)}")
    return value[tuple(slice(0, n) for n in shape)].clone()


def apply_skip_spec(unet: nn.Module, spec: SkipSpec, markov: dict | None = None) -> SkipRouter:
    """Gate the long skips of an existing ``UNet2DModel`` or ``UNet2DConditionModel``.

    For inference-time ablation (FreeU, ScaleLong scaling, zeroing a skip) of a trained or
    pretrained UNet: its weights and state dict are untouched. Returns the attached router; call
    ``router.detach()`` to restore the original behaviour. ``remove`` needs a rebuilt resnet and is
    refused here (``zero`` has the same effect on the forward pass of an existing model).
    """
    if isinstance(unet, SkipUNet2DModel):
        raise ValueError("this model already routes its skips; change its config's `skips` instead")
    router = SkipRouter(discover_skips(unet), spec, markov)
    removing = [g.info.index for g in router.gates if g.removes_skip]
    if removing:
        raise ValueError(
            f"'remove' rebuilds resnets and cannot be applied to an existing UNet (skips {removing}); use 'zero'"
        )
    first_param = next(unet.parameters())
    router.to(device=first_param.device, dtype=first_param.dtype)
    router.train(unet.training)
    return router.attach(unet)


@contextlib.contextmanager
def skip_spec_applied(unet: nn.Module, spec):
    """``with skip_spec_applied(unet, spec) as router:`` gates ``unet``'s skips with ``spec`` for the length of
    the block, then restores it exactly: the one temporary way to put skips on a UNet (a new model with
    other skips is :meth:`SkipUNet2DModel.from_unet`).

    A stock diffusers UNet gets :func:`apply_skip_spec` and ``detach()``. A
    :class:`SkipUNet2DModel` already routes its skips: its router is set aside and a
    router for ``spec`` takes its place (its trained gates, learned ones included, come back afterwards).
    ``None`` changes nothing and yields the UNet's own router (None for a stock UNet).
    """
    if spec is None:
        yield getattr(unet, "skip_router", None)
        return
    if not isinstance(unet, SkipUNet2DModel):
        router = apply_skip_spec(unet, spec)
        try:
            yield router
        finally:
            router.detach()
        return
    original = unet.skip_router
    replacement = SkipRouter(original.skips, spec, dict(unet.config.markov or {}))
    _check_removed_skips(original, replacement, spec)
    parameter = next(unet.parameters())
    replacement.to(device=parameter.device, dtype=parameter.dtype).train(unet.training)
    replacement.inference = original.inference
    original.detach()
    unet.skip_router = replacement.attach(unet)
    try:
        yield replacement
    finally:
        replacement.detach()
        unet.skip_router = original.attach(unet)


def _check_removed_skips(original, replacement, spec) -> None:
    """A skip removed in training has no channels in its resnet: only ``remove`` fits it, and no other skip
    can be removed without rebuilding the model."""
    was = [g.info.index for g in original.gates if g.removes_skip]
    wants = [g.info.index for g in replacement.gates if g.removes_skip]
    if was != wants:
        raise ValueError(
            f"skips {spec!r} cannot be applied to this model: its removed skips {was} have no channels to gate "
            f"and a skip cannot be removed at inference (the spec removes {wants}); use 'zero' instead of "
            "'remove' and keep 'remove' where the model has it"
        )
