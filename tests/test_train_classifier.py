"""The classifier training library and CLI: tiny runs (a few steps, widths (4, 8)), seconds each."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from skipdiff.classifiers import ResidualMLPForClassification, SkipResNetForImageClassification
from skipdiff.config import parse_args
from skipdiff.runfolder import read_stats
from skipdiff.training.classifier import ClassifierOptions, evaluate, load_classifier_data, train_classifier

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train_scripts" / "train_classifier.py"
TINY = dict(
    dataset="digits",
    resolution=8,
    widths=[4, 8],
    depth=1,
    hidden_size=8,
    train_batch_size=16,
    eval_batch_size=512,
    max_train_steps=3,
    log_every=1,
    num_threads=1,
    report_to="none",
)
TINY_ARGS = [
    "--resolution",
    "8",
    "--widths",
    "4",
    "8",
    "--depth",
    "1",
    "--hidden_size",
    "8",
    "--train_batch_size",
    "16",
    "--eval_batch_size",
    "512",
    "--max_train_steps",
    "3",
    "--log_every",
    "1",
    "--num_threads",
    "1",
]


def tiny(tmp_path: Path, name: str = "run", **overrides) -> ClassifierOptions:
    return ClassifierOptions(**{**TINY, "output_dir": str(tmp_path / name), **overrides})


def train_records(output_dir: str | Path) -> list[dict]:
    return [r for r in read_stats(Path(output_dir) / "stats.jsonl") if "train" in r]


def test_tiny_digits_run_writes_stats_metrics_and_a_model_that_reloads(tmp_path):
    options = tiny(tmp_path)
    metrics = train_classifier(options)
    out = Path(options.output_dir)
    assert {"config.json", "model.safetensors", "metrics.json", "stats.jsonl", "training_options.json"} <= {
        p.name for p in out.iterdir()
    }
    assert json.loads((out / "metrics.json").read_text()) == pytest.approx(metrics)
    assert metrics["steps"] == 3 and metrics["num_blocks"] == 2 and metrics["num_nonfinite_steps"] == 0
    assert json.loads((out / "training_options.json").read_text())["widths"] == [4, 8]

    records = read_stats(out / "stats.jsonl")
    train = [r for r in records if "train" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    for record in train:
        assert {
            "step",
            "epoch",
            "train",
            "lr",
            "grad_norm",
            "grad_ratio_first_last",
            "grad_norm_total",
            "seconds_per_step",
            "num_nonfinite",
        } <= set(record)
        assert set(record["train"]) == {"loss", "accuracy"}
        assert list(record["grad_norm"]) == ["stem", "blocks.0", "blocks.1", "head", "classifier"]
        blocks = record["grad_norm"]
        assert record["grad_ratio_first_last"] == pytest.approx(blocks["blocks.0"] / blocks["blocks.1"])
    test = [r for r in records if "test" in r]
    assert len(test) == 1 and set(test[0]["test"]) == {"loss", "accuracy"}
    assert test[0]["test"]["loss"] == pytest.approx(metrics["test_loss"])

    # The saved model gives the trained model's eval-mode test loss and accuracy again, bit for bit.
    model = SkipResNetForImageClassification.from_pretrained(out)
    assert model.config.widths == [4, 8] and model.config.depth == 1
    data = load_classifier_data(options)
    loader = DataLoader(data.test, batch_size=512, collate_fn=data.collate)

    class _Single:  # evaluate() gathers over processes; one process gathers nothing
        @staticmethod
        def gather_for_metrics(tensors):
            return tensors

    from skipdiff.training.classifier import BlockGates

    reloaded = evaluate(model, loader, _Single(), BlockGates("none", 2, 1.0, True, None))
    assert reloaded["loss"] == metrics["test_loss"]
    assert reloaded["accuracy"] == metrics["test_accuracy"]
    # and its logits do not depend on how it was loaded
    batch = next(iter(loader))
    again = SkipResNetForImageClassification.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(model.eval()(batch["pixel_values"]).logits, again(batch["pixel_values"]).logits)


def test_tabular_run_on_wine_with_the_mlp(tmp_path):
    options = tiny(tmp_path, dataset="wine", model="mlp", depth=2, hidden_size=8)
    metrics = train_classifier(options)
    model = ResidualMLPForClassification.from_pretrained(options.output_dir)
    assert model.config.num_features == 13 and model.config.num_labels == 3 and model.config.depth == 2
    assert metrics["num_blocks"] == 2 and 0.0 <= metrics["test_accuracy"] <= 1.0
    assert list(train_records(options.output_dir)[0]["grad_norm"]) == [
        "stem",
        "blocks.0",
        "blocks.1",
        "classifier",
    ]


def test_reference_resnet_trains_and_reports_gradient_flow(tmp_path):
    from transformers import ResNetForImageClassification

    options = tiny(tmp_path, model="reference")
    metrics = train_classifier(options)
    model = ResNetForImageClassification.from_pretrained(options.output_dir)
    assert model.config.hidden_sizes == [4, 8] and model.config.depths == [1, 1]
    assert metrics["num_blocks"] is None and metrics["grad_ratio_init"] > 0
    assert list(train_records(options.output_dir)[0]["grad_norm"]) == [
        "stem",
        "blocks.0",
        "blocks.1",
        "classifier",
    ]


def test_dry_run_prints_the_options_and_writes_nothing(tmp_path, capsys):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import train_classifier as script
    finally:
        sys.path.remove(str(SCRIPT.parent))
    out = tmp_path / "dry"
    script.main(["--dry_run", "--depth", "8", "--no-skip_connections", "--no-batch_norm", "--output_dir", str(out)])
    printed = json.loads(capsys.readouterr().out)
    assert printed["depth"] == 8 and printed["skip_connections"] is False and printed["batch_norm"] is False
    assert printed["output_dir"] == str(out)
    assert not out.exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--depth", "0"], "--depth must be >= 1"),
        (["--dataset", "mnist"], "unknown dataset 'mnist'"),
        (["--model", "mlp"], "--model mlp takes tabular data, but dataset 'digits' is image"),
        (["--dataset", "wine"], "--model skipresnet takes image data, but dataset 'wine' is tabular"),
        (["--widths", "4", "0"], "--widths must be one or more integers >= 1"),
        (["--model", "reference", "--gating", "markov"], "--gating markov needs block_gates"),
        (
            ["--gating", "bernoulli", "--gate_target", "skip", "--no-skip_connections"],
            "--gate_target skip needs skips",
        ),
        (["--markov", "p_init=0.5"], "only used with --gating markov"),
        (["--gating", "markov", "--markov", "p_inti=0.5"], "unknown markov option"),
    ],
)
def test_bad_arguments_raise_a_clear_value_error(argv, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        parse_args(ClassifierOptions, argv)


def test_bad_options_fail_before_anything_is_written(tmp_path):
    for overrides in ({"depth": 0}, {"dataset": "mnist"}, {"model": "mlp"}):
        options = tiny(tmp_path, "bad", **overrides)
        with pytest.raises(ValueError):
            train_classifier(options)
        assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_same_seed_gives_the_same_loss_curve(tmp_path):
    losses = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        options = tiny(tmp_path, name, seed=seed, gating="bernoulli")
        metrics = train_classifier(options)
        losses[name] = ([r["train"]["loss"] for r in train_records(options.output_dir)], metrics["test_loss"])
    assert losses["a"] == losses["b"]
    assert losses["a"][0] != losses["c"][0]


def test_markov_gating_runs_and_updates_the_chain(tmp_path):
    options = tiny(tmp_path, gating="markov", markov="warmup_steps=1,min_count=1", max_train_steps=4)
    metrics = train_classifier(options)
    assert metrics["markov"]["num_updates"] == 4
    assert metrics["markov"]["learning"] is True
    counts = metrics["markov"]["counts"]  # [block][previous state][state]; block 0 has no predecessor
    assert sum(counts[0][1]) == sum(map(sum, counts[1])) == 4 * 16  # every example of every step, once
    gates = train_records(options.output_dir)[-1]["gates"]
    assert gates["markov_num_updates"] == 4 and set(gates["keep_prob"]) == {"blocks.0", "blocks.1"}
    assert (Path(options.output_dir) / "markov_chain.safetensors").is_file()


@pytest.mark.slow
def test_resume_from_a_checkpoint_continues_the_same_loss_curve(tmp_path):
    markov = dict(gating="markov", markov="warmup_steps=1,min_count=1", max_train_steps=6)
    straight = tiny(tmp_path, "straight", **markov)
    train_classifier(straight)
    expected = [r["train"]["loss"] for r in train_records(straight.output_dir)]

    checkpointed = tiny(tmp_path, "resumed", checkpointing_steps=3, **markov)
    train_classifier(checkpointed)
    out = Path(checkpointed.output_dir)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    shutil.rmtree(out / "checkpoint-6")  # as if the run had been killed after step 3
    metrics = train_classifier(tiny(tmp_path, "resumed", resume_from_checkpoint="latest", **markov))
    records = train_records(out)
    assert [r["step"] for r in records[-3:]] == [4, 5, 6]
    assert [r["train"]["loss"] for r in records[-3:]] == expected[-3:]  # same data, gates, weights, chain
    assert metrics["markov"]["num_updates"] == 6

    with pytest.raises(ValueError, match="belongs to another run"):
        train_classifier(
            tiny(
                tmp_path,
                "resumed",
                resume_from_checkpoint="latest",
                **{**markov, "gating": "none", "markov": ""},
            )
        )


@pytest.mark.slow
def test_accelerate_launch_runs_the_cli_end_to_end(tmp_path):
    accelerate = Path(sys.executable).parent / "accelerate"
    launch = (
        [str(accelerate), "launch"] if accelerate.exists() else [sys.executable, "-m", "accelerate.commands.launch"]
    )
    config = REPO / "accelerate_config.yaml"
    if config.exists():
        launch += ["--config_file", str(config), "--num_processes", "1"]
    else:
        launch += [
            "--cpu",
            "--num_processes",
            "1",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
        ]
    out = tmp_path / "launched"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            *launch,
            str(SCRIPT),
            *TINY_ARGS,
            "--depth",
            "2",
            "--no-skip_connections",
            "--no-batch_norm",
            "--output_dir",
            str(out),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test_accuracy" in result.stdout
    model = SkipResNetForImageClassification.from_pretrained(out)
    assert model.config.skip_connections is False and model.config.batch_norm is False and model.config.depth == 2
    assert len(train_records(out)) == 3
    assert list(out.glob("classifier/events.out.tfevents.*")), "no tensorboard events"


# ---- block gates: the router's sampling code, seeded per step ----------------------------------------


def _router(num_skips: int, entry: dict, markov: dict | None = None):
    from skipdiff.skips.gate import SkipInfo
    from skipdiff.skips.router import SkipRouter

    skips = [SkipInfo(k, 0, k, f"source{k}", 4, 2, 2) for k in range(num_skips)]
    return SkipRouter(skips, [dict(entry) for _ in skips], markov=markov).train()


@pytest.mark.parametrize("kind", ["bernoulli", "markov"])
@pytest.mark.parametrize("rescale", [True, False])
def test_block_gates_are_the_routers_states_for_the_same_rng_state(kind, rescale):
    from skipdiff.training.classifier import BlockGates

    markov = {"p_init": 0.6, "warmup_steps": 0, "min_count": 1} if kind == "markov" else None
    entry = (
        {"mode": "bernoulli", "p": 0.7, "rescale": rescale}
        if kind == "bernoulli"
        else {"mode": "markov", "rescale": rescale}
    )
    router = _router(5, entry, markov)
    gates = BlockGates(kind, 5, 0.7, rescale, markov)
    for seed in (3, 11):
        torch.manual_seed(seed)  # the router draws training states from the global RNG
        states = router.sample_states(64, torch.device("cpu"))
        expected = torch.stack([states[k] for k in range(5)], dim=1)  # (B, K)
        sampled = gates.sample(64, torch.Generator().manual_seed(seed))
        assert torch.equal(sampled, expected)
        assert (sampled == 0).any() and (sampled > 0).any()  # a real draw: closed and open gates both occur
        if kind == "markov":
            assert torch.equal(gates.last_path, router.last_path)  # what each chain learns from
            losses = torch.rand(64, generator=torch.Generator().manual_seed(seed))
            gates.update(losses)
            router.update_chain(losses)
            assert torch.equal(gates.chain.open_prob, router.chain.open_prob)


@pytest.mark.parametrize("kind", ["bernoulli", "markov"])
def test_each_process_gets_its_slice_of_the_global_batchs_gates(kind, monkeypatch):
    # As for the UNet's skips: 2 processes x batch 8 draw the gates 1 process x batch 16 draws.
    import skipdiff.seeding
    from skipdiff.training.classifier import BlockGates

    markov = {"p_init": 0.5} if kind == "markov" else None
    whole = BlockGates(kind, 4, 0.5, True, markov).sample(16, torch.Generator().manual_seed(7))
    for rank in (0, 1):
        monkeypatch.setattr(skipdiff.seeding, "world", lambda rank=rank: (2, rank))
        part = BlockGates(kind, 4, 0.5, True, markov).sample(8, torch.Generator().manual_seed(7))
        assert torch.equal(part, whole[8 * rank : 8 * (rank + 1)])


def test_eval_gates_are_open_with_rescaling_and_soft_without():
    from skipdiff.training.classifier import BlockGates

    assert BlockGates("bernoulli", 3, 0.8, True, None).eval_gates(4) is None
    soft = BlockGates("markov", 3, 0.8, False, {"p_init": 0.8}).eval_gates(4)
    assert soft.shape == (4, 3) and torch.allclose(soft, torch.full((4, 3), 0.8))


@pytest.mark.slow
def test_resumed_bernoulli_run_continues_the_same_gates_and_logs_each_step_once(tmp_path):
    gated = dict(gating="bernoulli", gate_keep_prob=0.5, max_train_steps=6)
    straight = tiny(tmp_path, "straight", **gated)
    train_classifier(straight)
    expected = [r["train"]["loss"] for r in train_records(straight.output_dir)]

    resumed = tiny(tmp_path, "resumed", checkpointing_steps=3, **gated)
    train_classifier(resumed)
    shutil.rmtree(Path(resumed.output_dir) / "checkpoint-6")
    train_classifier(tiny(tmp_path, "resumed", resume_from_checkpoint="latest", **gated))
    records = train_records(resumed.output_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]  # the log was cut back to the checkpoint
    assert [r["train"]["loss"] for r in records] == expected


def test_every_registered_model_has_a_data_kind_and_the_options_need_no_torch():
    from skipdiff.training.classifier.models import MODELS
    from skipdiff.training.classifier.options import MODEL_KINDS

    assert set(MODELS) == set(MODEL_KINDS)
    code = (
        "import sys; from skipdiff.cli import train_classifier; "
        "from skipdiff.training.classifier import ClassifierOptions; "
        "from skipdiff.config import parse_args; parse_args(ClassifierOptions, ['--depth', '3']); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr
