"""Options of ``train_scripts/train_classifier.py`` (:class:`ClassifierOptions`): one dataclass, the CLI
generated from it. No heavy imports here: ``--help`` and option errors answer without importing torch.
"""

from __future__ import annotations

import dataclasses

from ...config import (
    GATE_TARGETS,
    LR_SCHEDULERS,
    MIXED_PRECISION,
    check_choice,
    check_finite,
    check_positive,
    option,
    parse_key_values,
)
from ...data_options import DataOptions

# What data each model of the registry (:data:`skipdiff.training.classifier.models.MODELS`) takes.
MODEL_KINDS = {"skipresnet": "image", "mlp": "tabular", "reference": "image"}
GATINGS = ("none", "bernoulli", "markov")
OPTIMIZERS = ("adamw", "sgd")
REPORT_TO = ("tensorboard", "none")


@dataclasses.dataclass
class ClassifierOptions(DataOptions):
    # ---- data: every field of skipdiff.data_options.DataOptions ----------------------------------------
    # ---- model -----------------------------------------------------------------------------------
    model: str = option("skipresnet", "skipresnet / reference (images) or mlp (tabular)", choices=tuple(MODEL_KINDS))
    depth: int = option(2, "residual blocks per stage (skipresnet, reference) or in all (mlp)")
    widths: list[int] = option([16, 32, 64], "channels of each stage (skipresnet, reference)")
    hidden_size: int = option(64, "width of the skipresnet's FC head / of every mlp layer")
    skip_connections: bool = option(True, "residual shortcuts; --no-skip_connections gives the plain network")
    batch_norm: bool = option(True, "BatchNorm after every conv/linear layer (--no-batch_norm: none, biased layers)")
    gating: str = option(
        "none", "per-example block gates: none, bernoulli (stochastic depth) or markov (MarkovChain)", choices=GATINGS
    )
    gate_target: str = option(
        "residual", "what a gate multiplies: the residual branch or the skip", choices=GATE_TARGETS
    )
    gate_keep_prob: float = option(0.8, "--gating bernoulli: probability that a block's gate is open")
    gate_rescale: bool = option(
        True, "divide open gates by their keep probability in training (inverted dropout), so eval uses open gates"
    )
    markov: str = option(
        "", "--gating markov: MarkovChain options, e.g. 'p_init=0.8,warmup_steps=50,min_count=16,cost=0.1'"
    )
    # ---- optimisation ----------------------------------------------------------------------------
    optimizer: str = option("adamw", "adamw, or sgd with Nesterov momentum 0.9", choices=OPTIMIZERS)
    learning_rate: float = option(1e-3, "peak learning rate")
    lr_scheduler: str = option(
        "cosine",
        "learning-rate schedule after warm-up (diffusers' get_scheduler; cosine decays to 0 at the last step)",
        choices=LR_SCHEDULERS,
    )
    lr_warmup_steps: int = option(0, "linear warm-up steps")
    weight_decay: float = option(1e-4, "decoupled (AdamW) or L2 (SGD) weight decay")
    max_grad_norm: float = option(0.0, "gradient clipping norm (0: none, so vanishing/exploding gradients show)")
    train_batch_size: int = option(64, "batch size per process (the last incomplete batch of an epoch is dropped)")
    eval_batch_size: int = option(256, "batch size for test and train-set evaluation")
    num_epochs: int | None = option(10, "epochs (ignored when --max_train_steps is given)")
    max_train_steps: int | None = option(None, "optimizer steps; overrides --num_epochs")
    seed: int = option(0, "seed of weights, data order and gates: the same seed gives the same loss curve on CPU")
    num_threads: int | None = option(None, "torch CPU threads per process (default: torch's choice)")
    mixed_precision: str | None = option(None, "no, fp16 or bf16 (default: the accelerate config's)")
    # ---- outputs, logging, checkpoints -----------------------------------------------------------
    output_dir: str = option("runs/classifier-digits", "the run's folder: model, logs, metrics, checkpoints")
    log_every: int = option(10, "steps between stats.jsonl/tensorboard records (step 1 is always logged)")
    report_to: str = option("tensorboard", "accelerate tracker: tensorboard or none", choices=REPORT_TO)
    checkpointing_steps: int = option(0, "steps between checkpoints (0: none)")
    checkpoints_total_limit: int | None = option(2, "keep at most this many checkpoints")
    resume_from_checkpoint: str | None = option(None, "'latest' or a checkpoint folder to resume from")
    dry_run: bool = option(False, "print the resolved options and exit")

    def markov_options(self) -> dict:
        """The ``--markov`` key=value pairs as a dict (the chain's keyword arguments)."""
        return parse_key_values(self.markov, "--markov")

    def architecture(self) -> dict:
        """What a checkpoint must match to be resumed by this run."""
        names = (
            "dataset",
            "dataset_name",
            "train_data_dir",
            "resolution",
            "model",
            "depth",
            "widths",
            "hidden_size",
            "skip_connections",
            "batch_norm",
            "gating",
            "gate_target",
            "markov",
        )
        return {name: getattr(self, name) for name in names}

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad value (called by ``parse_args``/``from_dict``)."""
        super().validate()
        check_positive(self, ("depth", "hidden_size", "train_batch_size", "eval_batch_size", "log_every"))
        check_positive(self, ("num_epochs", "max_train_steps", "num_threads", "checkpoints_total_limit"), optional=True)
        check_positive(self, ("checkpointing_steps", "lr_warmup_steps"), minimum=0)
        if self.num_epochs is None and self.max_train_steps is None:
            raise ValueError("give --num_epochs or --max_train_steps")
        if not self.widths or any(width < 1 for width in self.widths):
            raise ValueError(f"--widths must be one or more integers >= 1, got {self.widths}")
        check_finite(self, ("learning_rate", "weight_decay", "max_grad_norm"), positive=("learning_rate",))
        if not 0.0 < self.gate_keep_prob <= 1.0:
            raise ValueError(f"--gate_keep_prob must lie in (0, 1], got {self.gate_keep_prob}")
        for name, allowed in (
            ("model", tuple(MODEL_KINDS)),
            ("gating", GATINGS),
            ("gate_target", GATE_TARGETS),
            ("optimizer", OPTIMIZERS),
            ("lr_scheduler", LR_SCHEDULERS),
            ("report_to", REPORT_TO),
        ):
            check_choice(self, name, allowed)
        if self.mixed_precision is not None:
            check_choice(self, "mixed_precision", MIXED_PRECISION)
        self._validate_dataset_and_model()
        self._validate_gating()

    def _validate_dataset_and_model(self) -> None:
        takes = MODEL_KINDS[self.model]
        if takes != self.kind:
            fitting = sorted(name for name, kind in MODEL_KINDS.items() if kind == self.kind)
            source = self.dataset_name or self.train_data_dir or self.dataset
            raise ValueError(
                f"--model {self.model} takes {takes} data, but dataset {source!r} is {self.kind}; "
                f"use --model {' or '.join(fitting)}"
            )
        if self.model == "reference" and not (self.skip_connections and self.batch_norm):
            raise ValueError(
                "--model reference is transformers' ResNet, always with skips and BatchNorm; "
                "use --model skipresnet for --no-skip_connections / --no-batch_norm"
            )

    def _validate_gating(self) -> None:
        if self.gating != "none" and self.model == "reference":
            raise ValueError(f"--gating {self.gating} needs block_gates: use --model skipresnet or mlp, not reference")
        if self.gating != "none" and self.gate_target == "skip" and not self.skip_connections:
            raise ValueError("--gate_target skip needs skips to gate; it cannot go with --no-skip_connections")
        if self.markov and self.gating != "markov":
            raise ValueError(f"--markov {self.markov!r} is only used with --gating markov, got --gating {self.gating}")
        if self.gating == "markov":
            from ...skips.markov import check_options  # torch, but only once the options name a chain

            check_options(self.markov_options())
