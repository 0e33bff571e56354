"""Classifiers with switchable skip connections, for vanishing-gradient and gating studies.

Two models share one residual block, :class:`ResidualBlock`::

    y = relu(g * F(x) + S(x))        (He et al. 2016, eq. 1; g = 1 unless a gate is given)

* :class:`SkipResNetForImageClassification`: stem conv3x3-BN-ReLU, ``depth`` blocks per stage with
  F = conv3x3-BN-ReLU-conv3x3-BN, stride 2 at the start of every stage after the first, global average
  pool, and a two-layer FC head (as in DLStudio's BMEnet). S is the identity, or a 1x1 projection
  (conv1x1 + BN) whenever the channels *or* the stride change, so a block that halves the resolution
  at constant width keeps its skip (BMEnet silently drops it there).
* :class:`ResidualMLPForClassification`: input projection Linear-BN-ReLU, ``depth`` blocks with
  F = Linear-BN-ReLU-Linear-BN and S = identity, and a linear head; for tabular data (B, features).

The ablation is the config (one round trip through ``save_pretrained`` / ``from_pretrained``):
``skip_connections=False`` removes S (plain blocks ``y = relu(F(x))``, no projections either),
``batch_norm=False`` replaces every BatchNorm by ``nn.Identity`` and gives the conv/linear layers a bias.

Gate hook. ``forward(..., block_gates=G)`` with G of shape (B, num_blocks) multiplies, per example,
either the residual branch F (``gate_target="residual"``: stochastic depth, Huang et al. 2016; g = 0
reduces the block to its shortcut) or the skip S (``gate_target="skip"``: g = 0 makes the block plain).
Columns follow the blocks from input to output, so a :class:`skipdiff.skips.markov.MarkovChain` with
``num_links=model.num_blocks`` gates them with ``block_gates=chain.sample(B, generator)``; at inference
pass soft gates (e.g. ``chain.marginals().expand(B, -1)``) or ``None`` (every gate open).

:func:`reference_resnet` builds the well-kept baseline, ``transformers.ResNetForImageClassification``
with the same widths and depth. :func:`unit_of` groups any of the three models' parameters into stem,
blocks and head for :func:`skipdiff.gradients.grad_norms_by_block` (gradient norm per block);
:func:`first_last_grad_ratio` measures gradient flow after ``backward()``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import transformers.initialization as init
from torch import nn
from torch.nn import functional as F
from transformers import (
    AutoConfig,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    PreTrainedConfig,
    PreTrainedModel,
    ResNetConfig,
    ResNetForImageClassification,
)
from transformers.modeling_outputs import ImageClassifierOutputWithNoAttention, SequenceClassifierOutput
from transformers.utils import can_return_tuple

from .config import GATE_TARGETS
from .gradients import grad_norms_by_block

# Keyword arguments that PreTrainedConfig consumes itself (besides its dataclass fields) or that
# from_pretrained passes along. Any other key that is not a field of the config is rejected, so that
# a typo such as ``skip_conections=False`` cannot silently train the wrong ablation. Keys starting
# with "_" are transformers' private bookkeeping and pass through.
_HF_CONFIG_KWARGS = frozenset(
    {
        "model_type",
        "num_labels",
        "name_or_path",
        "torch_dtype",
        "output_attentions",
        "attn_implementation",
        "experts_implementation",
        "per_layer_config",
        "auto_map",
        "transformers_weights",
    }
)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_positive_int(owner: str, name: str, value) -> None:
    if not (_is_int(value) and value >= 1):
        raise ValueError(f"{owner}: {name} must be an integer >= 1, got {name}={value!r}")


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------


class SkipClassifierConfig(PreTrainedConfig):
    """The ablation switches both classifiers share. Not used on its own (it has no ``model_type``)."""

    depth: int = 2  # residual blocks (per stage, for the ResNet)
    skip_connections: bool = True  # False: plain blocks y = relu(F(x)), no shortcuts and no projections
    batch_norm: bool = True  # False: nn.Identity instead of every BatchNorm; conv/linear layers get a bias
    gate_target: str = "residual"  # what block_gates multiply: "residual" (the branch F) or "skip" (S)

    def __post_init__(self, **kwargs):
        unknown = sorted(key for key in kwargs if key not in _HF_CONFIG_KWARGS and not key.startswith("_"))
        if unknown:
            options = sorted(self.own_options())
            raise ValueError(f"{type(self).__name__} got unknown option(s) {unknown}; its options are {options}")
        super().__post_init__(**kwargs)
        self.check()

    @classmethod
    def own_options(cls) -> tuple[str, ...]:
        """Names of the options this config adds to PreTrainedConfig's."""
        return tuple(name for name in cls.__dataclass_fields__ if name not in PreTrainedConfig.__dataclass_fields__)

    def check(self) -> None:
        """Raise ``ValueError`` naming the first bad option. Models call it again when built."""
        owner = type(self).__name__
        _check_positive_int(owner, "depth", self.depth)
        for name in ("skip_connections", "batch_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{owner}: {name} must be True or False, got {name}={getattr(self, name)!r}")
        if self.gate_target not in GATE_TARGETS:
            raise ValueError(f"{owner}: gate_target must be one of {GATE_TARGETS}, got {self.gate_target!r}")
        if self.num_labels is None or self.num_labels < 2:
            raise ValueError(f"{owner}: a classifier needs num_labels >= 2, got num_labels={self.num_labels!r}")


class SkipResNetConfig(SkipClassifierConfig):
    """Config of :class:`SkipResNetForImageClassification` (plus ``depth``, ``skip_connections``,
    ``batch_norm``, ``gate_target`` and ``num_labels``)."""

    model_type = "skipdiff-skipresnet"

    num_channels: int = 3  # channels of the input images
    widths: list[int] | tuple[int, ...] = (16, 32, 64)  # channels of each stage; the stem outputs widths[0]
    hidden_size: int = 128  # width of the first FC layer; its output is the penultimate feature vector

    def __post_init__(self, **kwargs):
        if isinstance(self.widths, tuple):  # JSON has no tuples: keep the type a round trip gives back
            self.widths = list(self.widths)
        super().__post_init__(**kwargs)

    def check(self) -> None:
        super().check()
        owner = type(self).__name__
        _check_positive_int(owner, "num_channels", self.num_channels)
        _check_positive_int(owner, "hidden_size", self.hidden_size)
        if not isinstance(self.widths, list) or not self.widths:
            raise ValueError(f"{owner}: widths must be a non-empty list of stage widths, got widths={self.widths!r}")
        if not all(_is_int(width) and width >= 1 for width in self.widths):
            raise ValueError(f"{owner}: every stage width must be an integer >= 1, got widths={self.widths!r}")

    @property
    def num_blocks(self) -> int:
        return len(self.widths) * self.depth


class ResidualMLPConfig(SkipClassifierConfig):
    """Config of :class:`ResidualMLPForClassification` (plus ``depth``, ``skip_connections``,
    ``batch_norm``, ``gate_target`` and ``num_labels``)."""

    model_type = "skipdiff-residualmlp"

    num_features: int = 16  # input features per example
    width: int = 64  # width of the input projection and of every block

    def check(self) -> None:
        super().check()
        owner = type(self).__name__
        _check_positive_int(owner, "num_features", self.num_features)
        _check_positive_int(owner, "width", self.width)

    @property
    def num_blocks(self) -> int:
        return self.depth


# --------------------------------------------------------------------------------------------------
# The residual block
# --------------------------------------------------------------------------------------------------


class ResidualBlock(nn.Module):
    """``y = relu(g * F(x) + S(x))``; ``S`` is ``None`` in a plain block (``y = relu(g * F(x))``).

    Args:
        residual: the branch F.
        shortcut: S: ``nn.Identity``, a projection, or ``None`` for no skip.
        gate_target: what a gate multiplies, ``"residual"`` (F) or ``"skip"`` (S).
    """

    def __init__(self, residual: nn.Module, shortcut: nn.Module | None, gate_target: str = "residual"):
        super().__init__()
        if gate_target not in GATE_TARGETS:
            raise ValueError(f"gate_target must be one of {GATE_TARGETS}, got {gate_target!r}")
        self.residual = residual
        self.shortcut = shortcut
        self.gate_target = gate_target
        self.act = nn.ReLU()

    @property
    def shortcut_kind(self) -> str:
        """``"none"``, ``"identity"`` or ``"projection"``."""
        if self.shortcut is None:
            return "none"
        return "identity" if isinstance(self.shortcut, nn.Identity) else "projection"

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        residual = self.residual(x)  # (B, C_out, ...)
        skip = None if self.shortcut is None else self.shortcut(x)  # (B, C_out, ...)
        if gate is not None:
            gate = gate.to(residual).view(-1, *([1] * (residual.ndim - 1)))  # (B, 1, ...), dtype and device of F(x)
            if self.gate_target == "residual":
                residual = gate * residual
            elif skip is not None:
                skip = gate * skip
            else:
                raise ValueError("gate_target='skip' needs a skip to gate; this block has skip_connections=False")
        return self.act(residual if skip is None else residual + skip)

    def extra_repr(self) -> str:
        return f"shortcut={self.shortcut_kind}, gate_target={self.gate_target}"


def _conv_norm(in_channels: int, out_channels: int, kernel_size: int, stride: int, batch_norm: bool) -> list:
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=not batch_norm)
    return [conv, nn.BatchNorm2d(out_channels) if batch_norm else nn.Identity()]


def _linear_norm(in_features: int, out_features: int, batch_norm: bool) -> list:
    linear = nn.Linear(in_features, out_features, bias=not batch_norm)
    return [linear, nn.BatchNorm1d(out_features) if batch_norm else nn.Identity()]


def conv_block(in_channels: int, out_channels: int, stride: int, config: SkipResNetConfig) -> ResidualBlock:
    """F = conv3x3-BN-ReLU-conv3x3-BN; S = identity, or conv1x1-BN when channels or stride change."""
    residual = nn.Sequential(
        *_conv_norm(in_channels, out_channels, 3, stride, config.batch_norm),
        nn.ReLU(),
        *_conv_norm(out_channels, out_channels, 3, 1, config.batch_norm),
    )
    if not config.skip_connections:
        shortcut = None
    elif in_channels != out_channels or stride != 1:
        shortcut = nn.Sequential(*_conv_norm(in_channels, out_channels, 1, stride, config.batch_norm))
    else:
        shortcut = nn.Identity()
    return ResidualBlock(residual, shortcut, config.gate_target)


def linear_block(width: int, config: ResidualMLPConfig) -> ResidualBlock:
    """F = Linear-BN-ReLU-Linear-BN; S = identity."""
    residual = nn.Sequential(
        *_linear_norm(width, width, config.batch_norm),
        nn.ReLU(),
        *_linear_norm(width, width, config.batch_norm),
    )
    return ResidualBlock(residual, nn.Identity() if config.skip_connections else None, config.gate_target)


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


class SkipClassifierPreTrainedModel(PreTrainedModel):
    """Weight init and the block-gate plumbing both classifiers share."""

    # Explicit, not the ``config: X`` annotation transformers 5 also reads: with
    # ``from __future__ import annotations`` that annotation is a string.
    config_class = SkipClassifierConfig

    def __init__(self, config: SkipClassifierConfig):
        config.check()  # options may have been edited since the config was built
        super().__init__(config)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # He init (He et al. 2015, eq. 10) for every conv and linear layer, zero biases, BN as identity:
        # convs in fan_out mode as transformers' and torchvision's ResNets, linear layers in fan_in
        # mode, so plain and skip variants start from the same, variance-preserving init.
        # ``transformers.initialization`` skips tensors that from_pretrained has already loaded.
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            mode = "fan_out" if isinstance(module, nn.Conv2d) else "fan_in"
            init.kaiming_normal_(module.weight, mode=mode, nonlinearity="relu")
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            init.zeros_(module.num_batches_tracked)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def named_units(self) -> list[tuple[str, nn.Module]]:
        """Every trainable part, from input to output: ``stem``, ``blocks.0`` ... ``blocks.{N-1}``, head."""
        raise NotImplementedError

    def _run_blocks(
        self, hidden: torch.Tensor, block_gates: torch.Tensor | None, hidden_states: list | None
    ) -> torch.Tensor:
        """The blocks in order, block k gated by ``block_gates[:, k]``."""
        if block_gates is not None:
            expected = (hidden.shape[0], self.num_blocks)
            if block_gates.shape != expected:
                raise ValueError(
                    f"block_gates must have shape (batch, num_blocks) = {expected}, got {tuple(block_gates.shape)}"
                )
            if self.config.gate_target == "skip" and not self.config.skip_connections:
                raise ValueError("gate_target='skip' needs skip_connections=True: a plain network has no skips to gate")
        for k, block in enumerate(self.blocks):
            hidden = block(hidden, None if block_gates is None else block_gates[:, k])
            if hidden_states is not None:
                hidden_states.append(hidden)
        return hidden


class SkipResNetForImageClassification(SkipClassifierPreTrainedModel):
    """ResNet with switchable skips and BatchNorm (see the module docstring).

    ``features(pixel_values)`` returns the penultimate features (B, hidden_size), the input of the last
    FC layer: the digits classifier doubles as the FID feature extractor.
    """

    config_class = SkipResNetConfig
    base_model_prefix = "skipresnet"
    main_input_name = "pixel_values"
    input_modalities = ("image",)

    def __init__(self, config: SkipResNetConfig):
        super().__init__(config)
        widths = config.widths
        self.stem = nn.Sequential(*_conv_norm(config.num_channels, widths[0], 3, 1, config.batch_norm), nn.ReLU())
        blocks, in_channels = [], widths[0]
        for stage, width in enumerate(widths):
            for index in range(config.depth):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(conv_block(in_channels, width, stride, config))
                in_channels = width
        self.blocks = nn.ModuleList(blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Linear(widths[-1], config.hidden_size), nn.ReLU())
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def named_units(self) -> list[tuple[str, nn.Module]]:
        blocks = [(f"blocks.{k}", block) for k, block in enumerate(self.blocks)]
        return [("stem", self.stem), *blocks, ("head", self.head), ("classifier", self.classifier)]

    def _encode(
        self, pixel_values: torch.Tensor, block_gates: torch.Tensor | None, output_hidden_states: bool
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """The one trunk pass: (features (B, hidden_size), stem and block outputs if requested)."""
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"{type(self).__name__} takes pixel_values of shape (batch, {self.config.num_channels}, height, "
                f"width), got {tuple(pixel_values.shape)}"
            )
        hidden_states = [] if output_hidden_states else None
        hidden = self.stem(pixel_values)  # (B, widths[0], H, W)
        if hidden_states is not None:
            hidden_states.append(hidden)
        hidden = self._run_blocks(hidden, block_gates, hidden_states)  # (B, widths[-1], H / 2^(S-1), ...)
        features = self.head(self.pool(hidden).flatten(1))  # (B, hidden_size)
        return features, None if hidden_states is None else tuple(hidden_states)

    def features(self, pixel_values: torch.Tensor, block_gates: torch.Tensor | None = None) -> torch.Tensor:
        """Penultimate features (B, hidden_size): the input of the last FC layer.

        As a feature extractor (FID), call ``model.eval()`` first so BatchNorm uses its running statistics.
        """
        return self._encode(pixel_values, block_gates, output_hidden_states=False)[0]

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.LongTensor | None = None,
        block_gates: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
    ) -> ImageClassifierOutputWithNoAttention:
        """
        Args:
            pixel_values: (B, num_channels, H, W).
            labels: (B,) class indices; if given, ``loss`` is the mean cross-entropy.
            block_gates: (B, num_blocks) per-example multipliers, see the module docstring.
            output_hidden_states: also return the stem's and every block's output.
        """
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        features, hidden_states = self._encode(pixel_values, block_gates, output_hidden_states)
        logits = self.classifier(features)  # (B, num_labels)
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return ImageClassifierOutputWithNoAttention(loss=loss, logits=logits, hidden_states=hidden_states)


class ResidualMLPForClassification(SkipClassifierPreTrainedModel):
    """Residual MLP for tabular data (B, num_features) with switchable skips and BatchNorm.

    ``features(input_features)`` returns the input of the linear head, (B, width).
    """

    config_class = ResidualMLPConfig
    base_model_prefix = "residual_mlp"
    main_input_name = "input_features"

    def __init__(self, config: ResidualMLPConfig):
        super().__init__(config)
        self.stem = nn.Sequential(*_linear_norm(config.num_features, config.width, config.batch_norm), nn.ReLU())
        self.blocks = nn.ModuleList(linear_block(config.width, config) for _ in range(config.depth))
        self.classifier = nn.Linear(config.width, config.num_labels)
        self.post_init()

    def named_units(self) -> list[tuple[str, nn.Module]]:
        blocks = [(f"blocks.{k}", block) for k, block in enumerate(self.blocks)]
        return [("stem", self.stem), *blocks, ("classifier", self.classifier)]

    def _encode(
        self, input_features: torch.Tensor, block_gates: torch.Tensor | None, output_hidden_states: bool
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """The one trunk pass: (features (B, width), stem and block outputs if requested)."""
        if input_features.ndim != 2:
            hint = " (got image-like data: flatten it, or use SkipResNetForImageClassification)"
            raise ValueError(
                f"{type(self).__name__} takes input_features of shape (batch, features), got "
                f"{input_features.ndim}-D input of shape {tuple(input_features.shape)}"
                + (hint if input_features.ndim == 4 else "")
            )
        if input_features.shape[1] != self.config.num_features:
            raise ValueError(
                f"{type(self).__name__} was built for num_features={self.config.num_features}, got "
                f"input_features of shape {tuple(input_features.shape)}"
            )
        hidden_states = [] if output_hidden_states else None
        hidden = self.stem(input_features)  # (B, width)
        if hidden_states is not None:
            hidden_states.append(hidden)
        hidden = self._run_blocks(hidden, block_gates, hidden_states)  # (B, width)
        return hidden, None if hidden_states is None else tuple(hidden_states)

    def features(self, input_features: torch.Tensor, block_gates: torch.Tensor | None = None) -> torch.Tensor:
        """Penultimate features (B, width): the input of the linear head."""
        return self._encode(input_features, block_gates, output_hidden_states=False)[0]

    @can_return_tuple
    def forward(
        self,
        input_features: torch.Tensor,
        labels: torch.LongTensor | None = None,
        block_gates: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
    ) -> SequenceClassifierOutput:
        """
        Args:
            input_features: (B, num_features).
            labels: (B,) class indices; if given, ``loss`` is the mean cross-entropy.
            block_gates: (B, num_blocks) per-example multipliers, see the module docstring.
            output_hidden_states: also return the input projection's and every block's output.
        """
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        features, hidden_states = self._encode(input_features, block_gates, output_hidden_states)
        logits = self.classifier(features)  # (B, num_labels)
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=hidden_states)


# With skipdiff imported, AutoConfig / AutoModelFor*Classification load these checkpoints too.
AutoConfig.register(SkipResNetConfig.model_type, SkipResNetConfig)
AutoConfig.register(ResidualMLPConfig.model_type, ResidualMLPConfig)
AutoModelForImageClassification.register(SkipResNetConfig, SkipResNetForImageClassification)
AutoModelForSequenceClassification.register(ResidualMLPConfig, ResidualMLPForClassification)


# --------------------------------------------------------------------------------------------------
# The reference baseline
# --------------------------------------------------------------------------------------------------


def reference_resnet(
    num_labels: int, num_channels: int = 3, widths: tuple[int, ...] = (16, 32, 64), depth: int = 2
) -> ResNetForImageClassification:
    """A randomly initialised ``transformers.ResNetForImageClassification`` with basic blocks.

    ``depth`` blocks per stage with the given widths, ``embedding_size=widths[0]``: the residual blocks
    match :class:`SkipResNetForImageClassification` with skips and BatchNorm on, parameter for
    parameter, including where the projections sit. The differences lie outside the blocks: a 7x7
    stride-2 stem conv followed by a stride-2 max pool (the input is downsampled by 4 before the first
    stage, against 1 here) and a single linear head on the pooled features.

    Consequence for small images: a 16x16 input reaches the first stage at 4x4 and the third stage at
    1x1 (28x28 MNIST: 7x7, then 4x4, 2x2); it runs, but the last stages see almost no spatial
    structure. transformers' ResNetConfig has no option for a stride-1 stem, so compare at matched
    blocks, not at matched resolution, or upsample the inputs.
    """
    widths = list(widths)
    config = SkipResNetConfig(num_labels=num_labels, num_channels=num_channels, widths=widths, depth=depth)
    return ResNetForImageClassification(
        ResNetConfig(
            num_channels=config.num_channels,
            embedding_size=widths[0],
            hidden_sizes=widths,
            depths=[depth] * len(widths),
            layer_type="basic",
            hidden_act="relu",
            downsample_in_first_stage=False,
            num_labels=num_labels,
        )
    )


# --------------------------------------------------------------------------------------------------
# Gradient flow
# --------------------------------------------------------------------------------------------------


def unit_of(model: nn.Module) -> Callable[[str], str | None]:
    """The grouping of a classifier's parameters, by name, into its units from input to output: ``stem``,
    ``blocks.0`` ... ``blocks.{N-1}``, then the head (``head`` and/or ``classifier``).

    Pass it to :func:`skipdiff.gradients.grad_norms_by_block` for the gradient norm per unit.
    """
    if isinstance(model, SkipClassifierPreTrainedModel):
        units = model.named_units()
    elif isinstance(model, ResNetForImageClassification):
        layers = [layer for stage in model.resnet.encoder.stages for layer in stage.layers]
        blocks = [(f"blocks.{k}", layer) for k, layer in enumerate(layers)]
        units = [("stem", model.resnet.embedder), *blocks, ("classifier", model.classifier)]
    else:
        raise ValueError(
            f"unit_of supports SkipResNetForImageClassification, ResidualMLPForClassification and "
            f"ResNetForImageClassification, got {type(model).__name__}"
        )
    unit_of_parameter = {id(p): name for name, unit in units for p in unit.parameters()}
    groups = {name: unit_of_parameter.get(id(p)) for name, p in model.named_parameters()}
    return groups.get


def first_last_ratio(norms: dict[str, float]) -> float:
    """Gradient norm of the first residual block over that of the last, from per-unit norms (stem and head
    excluded). Below 1 the gradient shrinks on its way back to the input: the vanishing-gradient signature."""
    blocks = [norm for name, norm in norms.items() if name.startswith("blocks.")]
    if not blocks or blocks[-1] == 0.0:
        raise ValueError("the last block has no or a zero gradient norm: the ratio is undefined")
    return blocks[0] / blocks[-1]


def first_last_grad_ratio(model: nn.Module) -> float:
    """:func:`first_last_ratio` of ``model`` after ``loss.backward()``."""
    norms = grad_norms_by_block(model, unit_of(model))
    if not norms:
        raise ValueError(f"no parameter of {type(model).__name__} has a gradient: call loss.backward() first")
    return first_last_ratio(norms)
