"""``skipdiff.search``: spec checks, seeded proposals, training and inference searches end to end, pruning,
two workers on one study (SQLite and a real PostgreSQL server), kill -9 of a worker and a relaunch, and a
confirmation on fresh seeds. Tiny models: seconds per trial."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from skipdiff.search.spec import parse_search_spec

ROOT = Path(__file__).resolve().parents[1]
PG_BIN = Path("/usr/lib/postgresql/15/bin")

BASE = {
    "model": "tiny",
    "vae": "none",
    "resolution": 8,
    "max_train_steps": 4,
    "train_batch_size": 16,
    "log_every": 2,
    "validation_every": 0,
    "num_validation_images": 4,
    "validation_inference_steps": 2,
    "checkpointing_steps": 2,
}
TINY = {
    "kind": "training",
    "base": BASE,
    "space": {
        "skips": ["full", "per_skip", "scalelong"],
        "skip": ["keep", "zero", "scale"],
        "skip.scale": {"low": 0.2, "high": 1.0},
        "scalelong.kappa": {"low": 0.5, "high": 0.95},
        "learning_rate": {"low": 1.0e-4, "high": 3.0e-3, "log": True},
    },
    "objectives": ["denoise_mse"],
    "budget": {"trials": 3},
    "enqueue": [{"skips": "full"}],
    "eval": {"denoise_loss": True, "grad_stability": False, "buckets": 2},
}


def spec_file(tmp_path: Path, name: str = "tiny", **changes) -> Path:
    data = copy.deepcopy(TINY)
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run_search(*args: str) -> None:
    """``python -m skipdiff.search ARGS`` run here (its ``cli``: the same parsing, errors and exit status),
    which must exit 0. In this process a search costs its trials only: a new interpreter would import the
    training stack again (~7 s of CPU) for each of the dozen searches below. ``--workers 2`` still starts
    two worker processes, and the kill tests start the command itself as a process."""
    from skipdiff.search.__main__ import cli

    assert cli(list(args)) == 0


def study_trials(out: Path, storage: str | None = None):
    import optuna

    url = storage or f"sqlite:///{out / 'study.db'}"
    summaries = optuna.get_all_study_summaries(url)
    return optuna.load_study(study_name=summaries[0].study_name, storage=url).get_trials(deepcopy=False)


def states(trials) -> dict[str, int]:
    out: dict[str, int] = {}
    for trial in trials:
        out[trial.state.name] = out.get(trial.state.name, 0) + 1
    return out


# --------------------------------------------------------------------------------------------------
# The spec: refused naming the bad value, before anything runs
# --------------------------------------------------------------------------------------------------

BAD_SPECS = [
    ({"colour": 1}, "unknown key(s) ['colour']"),
    ({"kind": "trainig"}, "kind must be one of"),
    ({"space": {"learning_rate": {"low": 1.0e-3, "high": 1.0e-4}}}, "empty or inverted range low=0.001 high=0.0001"),
    ({"space": {"learning_rate": []}}, "has no choices"),
    ({"space": {"skips": ["full", "scalelog"]}}, "unknown skip family ['scalelog']"),
    ({"space": {"skip": ["keep", "zeor"]}}, "'zeor'"),
    ({"space": {"skip": ["keep", "scale"]}}, "needs its factor range"),
    ({"space": {"learning_rat": [1.0e-3]}}, "'learning_rat' is no option"),
    ({"space": {"skips": ["full"], "scalelong.kappa": {"low": 0.5, "high": 0.9}}}, "never chooses"),
    ({"space": {"model.width": [1]}}, "unknown model key 'width'"),
    ({"objectives": ["denoise_mse", "fid_minus_flor"]}, "unknown objective 'fid_minus_flor'"),
    ({"objectives": ["denoise_mse", "flops"], "pruner": "median", "prune": {"steps": [2]}}, "single-objective"),
    ({"pruner": "median"}, "prune steps must be a list"),
    ({"budget": {"trials": 0}}, "budget trials must be an integer >= 1"),
    ({"budget": {"hours": 2}}, "budget needs trials and/or minutes"),
    ({"sampler": "annealing"}, "sampler must be one of"),
    ({"confirm": {"top": 2, "seeds": [0, 7]}}, "confirm seeds [0] were used by the search's trials"),
    ({"confirm": {"seeds": [5, 6], "also": {"reference": {"skips": "zero"}}}}, "label 'reference' is taken"),
    ({"confirm": {"seeds": [5, 6], "also": {"trial-0003": {"skips": "zero"}}}}, "label 'trial-0003' is taken"),
    ({"confirm": {"seeds": [5, 6], "also": {"grid best": {"skips": "zero"}}}}, "label 'grid best' must be"),
    ({"confirm": {"seeds": [5, 6], "also": {"grid": {}}}}, "confirm also grid: empty overrides"),
    ({"base": {**BASE, "output_dir": "x"}}, "base option 'output_dir' is set by the search"),
    ({"base": {**BASE, "max_train_step": 3}}, "max_train_step"),
    (
        {"space": {"prediction_type": ["epsilon", "v_prediction"]}, "enqueue": None},
        "prediction_type cannot be searched",
    ),
    ({"enqueue": [{"skips": "full"}] * 4}, "enqueue lists 4 configurations but budget trials is 3"),
    ({"enqueue": [{"skips": "ful"}]}, "skips: 'ful' is not one of"),
    ({"enqueue": [{"scalelong.kapa": 0.7}]}, "'scalelong.kapa' is no parameter of the space"),
    ({"enqueue": [{"scalelong.kappa": 1.5}]}, "scalelong.kappa: 1.5 is not a number in [0.5, 0.95]"),
    ({"enqueue": [{"skip.12.scale": "x"}]}, "skip.scale: 'x' is not a number"),
]


def test_enqueued_list_choices_reach_the_trial_as_lists():
    """Optuna's categorical choices are scalars, so a list choice (block widths) travels as JSON text: an
    enqueued list must be stored the same way, or Optuna refuses it ("not in choices") at the first trial."""
    import optuna

    from skipdiff.search.space import suggest

    space = {
        "skips": ["full", "per_skip"],
        "skip": ["keep", "zero"],
        "model.block_out_channels": [[16, 32], [8, 16]],
        "model.layers_per_block": [1, 2],
    }
    queued = [{"skips": "per_skip", "skip.0": "zero", "model.block_out_channels": [8, 16], "model.layers_per_block": 2}]
    spec = parse_search_spec({**copy.deepcopy(TINY), "space": space, "enqueue": queued}, "m")
    study = optuna.create_study()
    study.enqueue_trial(spec.enqueue[0])
    suggestion = suggest(study.ask(), spec.space, lambda config: 3, spec.base)
    assert suggestion.model == {"block_out_channels": [8, 16], "layers_per_block": 2}
    assert suggestion.options["skips"].split(",")[0] == "zero"


def test_a_configuration_is_rebuilt_from_its_trials_parameters_alone():
    """What a report records of a trial (its Optuna params) is enough to train its configuration again:
    per-skip modes and factors, a preset's arguments, the chain's options and a UNet of its own."""
    import optuna

    from skipdiff.search.space import suggest
    from skipdiff.search.trial import configuration_of, num_skips_for

    space = {
        "skips": ["per_skip", "linear", "markov"],
        "skip": ["keep", "zero", "scale"],
        "skip.scale": {"low": 0.1, "high": 1.0},
        "linear.outer": {"low": 0.5, "high": 1.5},
        "markov.p_init": {"low": 0.6, "high": 0.9},
        "model.block_out_channels": [[16, 32], [8, 16]],
        "model.layers_per_block": [1, 2],
    }
    spec = parse_search_spec({**copy.deepcopy(TINY), "space": space, "enqueue": None}, "m")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        suggestion = suggest(trial, spec.space, num_skips_for(spec), spec.base)
        study.tell(trial, 0.0)
        assert configuration_of(spec, trial.params) == suggestion
        seen.add(suggestion.options["skips"].split(":")[0] if "," not in suggestion.options["skips"] else "per_skip")
    assert seen == {"per_skip", "linear", "markov"}  # every family was rebuilt at least once
    with pytest.raises(ValueError, match="linear.outer"):
        configuration_of(spec, {"skips": "linear", "model.block_out_channels": "[8, 16]", "model.layers_per_block": 1})


def test_every_committed_search_spec_parses():
    from skipdiff.search.spec import load_search_spec

    paths = sorted((ROOT / "eval" / "searches").glob("*.yaml"))
    assert len(paths) >= 3
    for path in paths:
        spec = load_search_spec(path)
        assert spec.space.params and spec.budget, path


@pytest.mark.parametrize(("changes", "message"), BAD_SPECS)
def test_bad_specs_are_refused_naming_the_value(changes, message):
    data = {**copy.deepcopy(TINY), **changes}
    with pytest.raises(ValueError) as err:
        parse_search_spec(data, "bad")
    assert message in str(err.value)


def test_a_preset_argument_typo_fails_before_any_trial(tmp_path, capsys):
    from skipdiff.search.__main__ import cli

    path = spec_file(tmp_path, space={"skips": ["full", "scalelong"], "scalelong.kapa": {"low": 0.5, "high": 0.9}})
    assert cli([str(path), "--dry_run", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: space (skips scalelong)") and "kapa" in err
    assert not (tmp_path / "out").exists()


def test_a_confirmation_asking_more_fid_samples_than_the_data_holds_fails_before_any_trial(tmp_path, capsys):
    """The atlas's first moon spec asked 500 FID samples of a field with 396 train images: its confirmation
    failed in every cell after training. The search's checks now refuse it up front, naming the split sizes."""
    from skipdiff.search.__main__ import cli

    confirm = {"top": 1, "seeds": [5, 6], "eval": {"fid": True, "num_samples": 5000, "denoise_loss": True}}
    path = spec_file(tmp_path, confirm=confirm)
    assert cli([str(path), "--dry_run", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "confirmation: eval num_samples=5000" in err and "train 1437 / test 360" in err
    assert not (tmp_path / "out").exists()


def test_a_typo_in_a_configuration_confirmed_beside_the_search_fails_before_any_trial(tmp_path, capsys):
    """``confirm.also`` (a grid's winner confirmed beside the search's best) runs after the whole budget: an
    unknown option there must fail at planning, naming the entry, not after hours of trials."""
    from skipdiff.search.__main__ import cli

    path = spec_file(tmp_path, confirm={"top": 1, "seeds": [5, 6], "also": {"grid-best": {"skipz": "zero"}}})
    assert cli([str(path), "--dry_run", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "confirm also grid-best: unknown option(s) ['skipz']" in err
    assert not (tmp_path / "out").exists()


def test_dry_run_prints_space_objectives_budget_and_writes_nothing(tmp_path, capsys):
    from skipdiff.search.__main__ import cli

    assert cli([str(spec_file(tmp_path)), "--dry_run", "--out", str(tmp_path / "out")]) == 0
    text = capsys.readouterr().out
    assert "skip.scale: float in [0.2, 1.0]" in text and "learning_rate: float in [0.0001, 0.003] (log)" in text
    assert "objectives: denoise_mse (minimize)" in text and '"trials": 3' in text
    assert '"skips": "scalelong:kappa=0.5"' in text  # one example per family, each checked
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------
# The space: conditional parameters, reproducible proposals
# --------------------------------------------------------------------------------------------------


def _proposals(tmp_path: Path, name: str, seed: int, n: int = 12) -> list[dict]:
    from skipdiff.search import engine
    from skipdiff.search.space import suggest
    from skipdiff.search.trial import num_skips_for

    spec = parse_search_spec({**copy.deepcopy(TINY), "seed": seed, "budget": {"trials": n}}, name)
    study = engine.open_study(spec, f"sqlite:///{tmp_path / (name + '.db')}")
    proposed = []

    def objective(trial):
        suggestion = suggest(trial, spec.space, num_skips_for(spec), spec.base)
        proposed.append(suggestion.options)
        return float(len(suggestion.options["skips"])) + trial.params.get("learning_rate", 0)

    study.optimize(objective, n_trials=n)
    return proposed


@pytest.mark.slow
def test_a_seeded_search_proposes_the_same_parameters_twice(tmp_path):
    first = _proposals(tmp_path, "a", seed=3)
    assert first == _proposals(tmp_path, "b", seed=3)
    assert first != _proposals(tmp_path, "c", seed=4)
    assert first[0]["skips"] == "full"  # the enqueued configuration comes first
    per_skip = [o["skips"] for o in first if "," in o["skips"]]
    assert per_skip and all(len(s.split(",")) == 4 for s in per_skip)  # the tiny UNet has 4 skips


def test_conditional_parameters_exist_only_under_their_family(tmp_path):
    from skipdiff.search.space import FixedTrial, suggest

    spec = parse_search_spec(copy.deepcopy(TINY), "c")
    full = FixedTrial({"skips": "full", "learning_rate": 1e-3})
    assert suggest(full, spec.space, lambda _: 4).options == {"learning_rate": 1e-3, "skips": "full"}
    per = FixedTrial(
        {
            "skips": "per_skip",
            "learning_rate": 1e-3,
            "skip.0": "zero",
            "skip.1": "scale",
            "skip.1.scale": 0.5,
            "skip.2": "keep",
            "skip.3": "keep",
        }
    )
    assert suggest(per, spec.space, lambda _: 4).options["skips"] == "zero,scale:0.5,keep,keep"
    with pytest.raises(ValueError, match="'scalelong.kappa' is not set"):
        suggest(FixedTrial({"skips": "scalelong", "learning_rate": 1e-3}), spec.space, lambda _: 4)


def test_chain_parameters_are_suggested_only_under_markov(tmp_path):
    """A trial that chose another family must not carry (or be steered by) the chain's parameters."""
    from skipdiff.search import engine
    from skipdiff.search.space import suggest

    space = {
        "skips": ["full", "learned", "markov"],
        "markov.p_init": {"low": 0.6, "high": 0.95},
        "markov.warmup_steps": [1],
    }
    spec = parse_search_spec({**copy.deepcopy(TINY), "space": space, "enqueue": None, "budget": {"trials": 12}}, "m")
    study = engine.open_study(spec, f"sqlite:///{tmp_path / 'm.db'}")
    study.optimize(lambda t: float(len(suggest(t, spec.space, lambda _: 4).options)), n_trials=12)
    for trial in study.trials:
        chain = {n for n in trial.params if n.startswith("markov.")}
        assert chain == ({"markov.p_init", "markov.warmup_steps"} if trial.params["skips"] == "markov" else set())
    markov = next(t for t in study.trials if t.params["skips"] == "markov")
    from skipdiff.search.space import FixedTrial

    options = suggest(FixedTrial(markov.params), spec.space, lambda _: 4).options
    assert options["markov"] == f"p_init={markov.params['markov.p_init']:.6g},warmup_steps=1"


def test_model_parameters_change_the_number_of_per_skip_parameters():
    from skipdiff.search.space import model_config, num_skips_of

    assert num_skips_of(model_config("tiny", {})) == 4
    deeper = model_config("digits", {"layers_per_block": 1, "attention": [False, True, False]})
    assert num_skips_of(deeper) == 6
    assert deeper["down_block_types"] == ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"]
    assert deeper["up_block_types"] == ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]
    with pytest.raises(ValueError, match="not divisible by norm_num_groups 8"):
        model_config("digits", {"block_out_channels": [12, 64, 64]})


# --------------------------------------------------------------------------------------------------
# End to end: a training search, pruning, an inference search, confirmation
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_search(tmp_path_factory) -> Path:
    """A 3-trial training search, run once for the tests below."""
    tmp = tmp_path_factory.mktemp("search")
    out = tmp / "out"
    run_search(str(spec_file(tmp)), "--out", str(out))
    return out


@pytest.mark.slow
def test_a_training_search_runs_its_budget_as_normal_run_folders(finished_search):
    from skipdiff.search.trial import configuration_of

    trials = study_trials(finished_search)
    assert states(trials) == {"COMPLETE": 3}
    folders = sorted(p.name for p in (finished_search / "trials").iterdir())
    assert folders == ["trial-0000", "trial-0001", "trial-0002"]
    for trial in trials:
        folder = Path(trial.user_attrs["folder"])
        record = json.loads((folder / "trial.json").read_text())
        assert record["state"] == "complete" and record["number"] == trial.number
        assert record["params"] == trial.params
        evaluation = json.loads((folder / "eval" / "eval.json").read_text())
        assert record["values"]["denoise_mse"] == pytest.approx(evaluation["denoise"]["mean"]) == trial.value
        assert (folder / "unet" / "config.json").is_file()  # a loadable run folder
        rebuilt = configuration_of(parse_search_spec(TINY, "tiny"), trial.params)
        assert (rebuilt.options, rebuilt.model) == (record["overrides"], record["model"])
    assert (
        json.loads((finished_search / "trials" / "trial-0000" / "trial.json").read_text())["overrides"]["skips"]
        == "full"
    )


@pytest.mark.slow
def test_the_report_of_a_search(finished_search, tmp_path):
    from skipdiff.report.__main__ import main

    path = main([str(finished_search), "--out", str(tmp_path / "report")])
    text = path.read_text()
    summary = json.loads((tmp_path / "report" / "search_summary.json").read_text())
    assert summary["counts"] == {"complete": 3} and len(summary["trials"]) == 3
    best = min(study_trials(finished_search), key=lambda t: t.value)
    assert f"| {best.number} | {best.value:.5g} |" in text  # the best trial heads the table
    assert "winner's curse" in text and "Confirmation" in text
    assert (tmp_path / "report" / "history.png").stat().st_size > 1000


@pytest.mark.slow
def test_a_configuration_proposed_again_reuses_its_values_without_training(tmp_path):
    out = tmp_path / "out"
    path = spec_file(
        tmp_path, space={"skips": ["full"]}, enqueue=None, budget={"trials": 2}
    )  # one point: proposed twice
    run_search(str(path), "--out", str(out))
    first, second = sorted(study_trials(out), key=lambda t: t.number)[:2]
    assert second.user_attrs["duplicate_of"] == first.number and second.value == first.value
    assert "folder" not in second.user_attrs
    assert sorted(p.name for p in (out / "trials").iterdir()) == ["trial-0000"]
    # a repeat does not count against the budget: a one-point space never reaches 2, and the worker stops
    # after 25 repeats in a row instead of looping
    complete = [t for t in study_trials(out) if t.state.name == "COMPLETE"]
    assert len(complete) == 26 and sum("duplicate_of" in t.user_attrs for t in complete) == 25
    from skipdiff.search.report import write_search_report

    write_search_report(out)
    rows = json.loads((out / "report" / "search_summary.json").read_text())["trials"]
    assert [r["duplicate_of"] for r in rows[:3]] == [None, 0, 0]  # the report says which rows were repeats


@pytest.mark.slow
def test_a_pruned_trial_stops_early_and_is_recorded_as_pruned(tmp_path):
    out = tmp_path / "out"
    path = spec_file(
        tmp_path,
        pruner={"name": "threshold", "upper": 0.0},
        prune={"steps": [2], "images": 8, "buckets": 2},
        budget={"trials": 2},
    )
    run_search(str(path), "--out", str(out))
    trials = study_trials(out)
    assert states(trials) == {"PRUNED": 2}
    for trial in trials:
        assert list(trial.intermediate_values) == [2]
        folder = Path(trial.user_attrs["folder"])
        record = json.loads((folder / "trial.json").read_text())
        assert record["state"] == "pruned" and "at step 2" in record["reason"]
        assert (
            trial.user_attrs["seconds"] == pytest.approx(record["seconds"]) and record["seconds"] > 0
        )  # its cost counts
        assert not (folder / "train_metrics.json").exists()  # stopped at step 2 of 4
        assert [p.name for p in folder.glob("checkpoint-*")] == []  # pruned before its step-2 checkpoint


@pytest.mark.slow
def test_an_inference_search_on_a_trained_run(finished_search, tmp_path):
    run = finished_search / "trials" / "trial-0000"
    spec = {
        "kind": "inference",
        "base": {"checkpoint": str(run), "denoise_loss": True, "buckets": 2, "seeds": [0]},
        "space": {
            "skips": ["full", "scalelong", "per_skip"],
            "skip": ["keep", "zero"],
            "scalelong.kappa": {"low": 0.3, "high": 0.9},
        },
        "objectives": ["denoise_mse"],
        "budget": {"trials": 3},
        "enqueue": [{"skips": "full"}],
    }
    path = tmp_path / "inference.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    run_search(str(path), "--out", str(out))
    trials = study_trials(out)
    assert states(trials) == {"COMPLETE": 3}
    full = next(t for t in trials if t.params["skips"] == "full")
    trained = json.loads((run / "eval" / "eval.json").read_text())["denoise"]["mean"]
    assert full.value == pytest.approx(trained, rel=1e-6)  # same weights, same held-out noise


def test_inference_search_refuses_training_only_families():
    spec = {
        "kind": "inference",
        "base": {"checkpoint": "x"},
        "space": {"skips": ["full", "markov"]},
        "objectives": ["denoise_mse"],
        "budget": {"trials": 2},
    }
    with pytest.raises(ValueError, match=r"\['markov'\] need training"):
        parse_search_spec(spec, "inf")


@pytest.mark.slow
def test_confirmation_reruns_the_best_on_fresh_seeds(tmp_path):
    out = tmp_path / "out"
    also = {"grid-best": {"skips": "scalelong:kappa=0.6"}}  # a configuration chosen elsewhere, confirmed beside
    path = spec_file(tmp_path, budget={"trials": 2}, confirm={"top": 1, "seeds": [5, 6], "also": also})
    run_search(str(path), "--out", str(out))
    cells = sorted(p.name for p in (out / "confirm").iterdir() if (p / "cell.json").is_file())
    assert len(cells) == 6  # (the best trial, grid-best, the reference) x 2 seeds
    grid_cells = [c for c in cells if c.startswith("config-grid-best")]
    assert [json.loads((out / "confirm" / c / "cell.json").read_text())["options"]["skips"] for c in grid_cells] == [
        "scalelong:kappa=0.6"
    ] * 2
    trial_seeds = {json.loads(p.read_text())["options"]["seed"] for p in (out / "trials").glob("*/trial.json")}
    confirm_seeds = {json.loads((out / "confirm" / c / "cell.json").read_text())["options"]["seed"] for c in cells}
    assert confirm_seeds == {5, 6} and not confirm_seeds & trial_seeds
    assert any(c.startswith("config-reference") for c in cells)
    assert (out / "confirm" / "report" / "report.md").is_file()
    from skipdiff.report.__main__ import main

    text = main([str(out)]).read_text()
    assert "Confirmation (the result)" in text and "### The search's objective (denoise_mse) on the fresh seeds" in text
    assert '### grid-best (chosen elsewhere: `{"skips": "scalelong:kappa=0.6"}`)' in text
    summary = json.loads((out / "report" / "search_summary.json").read_text())["confirmation"]["ranking"]
    reference = next(r for r in summary["rows"] if r["configuration"] == "reference")
    assert {r["configuration"] for r in summary["rows"]} >= {"reference", "grid-best"}
    assert sorted(int(seed) for seed in reference["values_by_seed"]) == [5, 6]  # paired on the fresh seeds
    chosen = json.loads((out / "confirm" / "chosen.json").read_text())["chosen"]
    best = min(
        study_trials(out), key=lambda t: t.value
    )  # every trial searches the learning rate: none is the reference
    assert chosen[0]["trial"] == best.number


def test_confirmation_never_retrains_the_reference_under_a_trials_name():
    """A search whose best trial is `full` at the base model would confirm the reference against itself
    (every paired difference 0): that trial is passed over and the next best confirmed instead."""
    from types import SimpleNamespace

    from skipdiff.search.confirm import choose, runs_the_reference

    space = {
        "skips": ["full", "scalelong"],
        "scalelong.kappa": {"low": 0.5, "high": 0.9},
        "model.layers_per_block": [1, 2],
    }
    spec = parse_search_spec({**copy.deepcopy(TINY), "space": space, "confirm": {"top": 2, "seeds": [5, 6]}}, "m")
    tiny_layers = 1  # the tiny preset's own depth, so this model override is the base model itself
    records = {
        0: {"overrides": {"skips": "full"}, "model": {"layers_per_block": tiny_layers}},
        1: {"overrides": {"skips": "full"}, "model": {"layers_per_block": 2}},
        2: {"overrides": {"skips": "scalelong:kappa=0.7"}, "model": {}},
        3: {"overrides": {"skips": "full"}, "model": {}},
    }
    assert [runs_the_reference(spec, r) for r in records.values()] == [True, False, False, True]
    ranked = [SimpleNamespace(number=n, user_attrs={"folder": str(n)}) for n in (0, 3, 1, 2)]
    said = []
    chosen = choose(spec, ranked, read=lambda folder: records[int(folder.name)], log=said.append)
    assert [trial.number for _, trial in chosen] == [1, 2] and len(said) == 2


# --------------------------------------------------------------------------------------------------
# Workers: two on one study (SQLite, PostgreSQL), kill -9 and relaunch
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_workers_share_one_study_through_the_default_storage(tmp_path):
    out = tmp_path / "out"
    run_search(str(spec_file(tmp_path, budget={"trials": 4})), "--out", str(out), "--workers", "2")
    trials = study_trials(out)
    assert states(trials) == {"COMPLETE": 4}
    assert len({Path(t.user_attrs["folder"]).name for t in trials}) == 4
    assert sorted(p.name for p in (out / "trials").iterdir()) == [f"trial-{i:04d}" for i in range(4)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def postgres(tmp_path):
    """A PostgreSQL 15 server on 127.0.0.1 and a free port, in a folder of its own; its URL."""
    if not (PG_BIN / "initdb").is_file():
        pytest.fail("PostgreSQL 15 is not installed (/usr/lib/postgresql/15/bin); the search test needs it")
    folder = Path(f"/tmp/skipdiff-pg-{os.getpid()}-{_free_port()}")
    folder.mkdir()
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    port = _free_port()
    subprocess.run(
        [*prefix, PG_BIN / "initdb", "-D", folder / "data", "-A", "trust", "-U", "postgres"],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            *prefix,
            PG_BIN / "pg_ctl",
            "-D",
            folder / "data",
            "-o",
            f"-p {port} -k {folder} -c listen_addresses=127.0.0.1",
            "-l",
            folder / "log",
            "-w",
            "start",
        ],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*prefix, PG_BIN / "pg_ctl", "-D", folder / "data", "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_two_workers_share_one_study_through_postgresql(tmp_path, postgres):
    out = tmp_path / "out"
    run_search(
        str(spec_file(tmp_path, budget={"trials": 4})), "--out", str(out), "--workers", "2", "--storage", postgres
    )
    trials = study_trials(out, postgres)
    assert states(trials) == {"COMPLETE": 4}
    assert not (out / "study.db").exists()  # the study lives in the server
    # a worker joining from "another machine" reads the spec from the study and finds nothing left to do
    from skipdiff.search.worker import cli

    assert cli(["--storage", postgres, "--study", "tiny", "--out", str(out)]) == 0
    assert states(study_trials(out, postgres)) == {"COMPLETE": 4}


@pytest.mark.slow
def test_kill_9_of_a_worker_mid_trial_then_relaunch(tmp_path, capfd):
    """The killed trial is failed by heartbeat and retried in its own folder from its checkpoint; the
    budget is met exactly, no trial counts twice, no folder is orphaned."""
    out = tmp_path / "out"
    base = {**BASE, "max_train_steps": 60, "checkpointing_steps": 5, "log_every": 5}
    path = spec_file(tmp_path, base=base, budget={"trials": 2}, storage={"heartbeat_seconds": 1, "grace_seconds": 2})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    worker = subprocess.Popen(
        [sys.executable, "-m", "skipdiff.search", str(path), "--out", str(out)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    folder = out / "trials" / "trial-0000"
    deadline = time.time() + 120
    while not list(folder.glob("checkpoint-10")) and time.time() < deadline:
        time.sleep(0.2)
    assert list(folder.glob("checkpoint-*")), "the first trial never checkpointed"
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    time.sleep(3)  # past the grace period: the heartbeat is stale
    run_search(str(path), "--out", str(out))
    trials = study_trials(out)
    counted = [t for t in trials if "duplicate_of" not in t.user_attrs]  # a repeat is answered, not counted
    assert states(counted) == {"FAIL": 1, "COMPLETE": 2}
    failed = next(t for t in trials if t.state.name == "FAIL")
    retried = next(t for t in trials if t.system_attrs.get("failed_trial") == failed.number)
    assert retried.state.name == "COMPLETE" and retried.params == failed.params
    assert Path(retried.user_attrs["folder"]) == folder
    # one folder per logical trial, named after its first attempt (trial 1 is the retry of trial 0)
    complete = sorted(Path(t.user_attrs["folder"]).name for t in counted if t.state.name == "COMPLETE")
    assert sorted(p.name for p in (out / "trials").iterdir()) == complete
    assert len(complete) == 2 and complete[0] == "trial-0000"
    assert "resumed from" in "".join(capfd.readouterr())


@pytest.mark.slow
def test_sigterm_to_a_worker_requeues_its_trial_which_resumes(tmp_path, capfd):
    """A scheduler's SIGTERM: the trial checkpoints after its step, is re-queued at once (no heartbeat
    wait), the worker exits 143; a relaunch resumes the trial in its folder and meets the budget."""
    out = tmp_path / "out"
    base = {**BASE, "max_train_steps": 60, "checkpointing_steps": 5, "log_every": 5}
    path = spec_file(tmp_path, base=base, budget={"trials": 1})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    worker = subprocess.Popen(
        [sys.executable, "-m", "skipdiff.search", str(path), "--out", str(out)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    folder = out / "trials" / "trial-0000"
    deadline = time.time() + 120
    while not list(folder.glob("checkpoint-5")) and time.time() < deadline:
        time.sleep(0.2)
    worker.send_signal(signal.SIGTERM)
    _, err = worker.communicate(timeout=120)
    assert worker.returncode == 143, err[-2000:]
    assert states(study_trials(out)) == {"FAIL": 1, "WAITING": 1}
    run_search(str(path), "--out", str(out))
    assert states(study_trials(out)) == {"FAIL": 1, "COMPLETE": 1}
    assert "resumed from" in "".join(capfd.readouterr())
    assert sorted(p.name for p in (out / "trials").iterdir()) == ["trial-0000"]


def test_progress_line_counts_trials_as_the_budget_does():
    """A repeated configuration (answered from its twin) is no trial: the line said "trials 17/16"."""
    import time

    import optuna

    from skipdiff.search.worker import progress_line

    spec = parse_search_spec(copy.deepcopy(TINY), "m")
    study = optuna.create_study()
    for number, attrs in enumerate([{}, {}, {"duplicate_of": 0}]):
        study.add_trial(optuna.trial.create_trial(value=0.3 + 0.01 * number, user_attrs=attrs))
    line = progress_line(study, spec, time.perf_counter(), 0)
    assert line.startswith("trials 2/3 (0 pruned, 0 running, 1 repeated configuration(s) not counted)")
    timed = parse_search_spec({**copy.deepcopy(TINY), "budget": {"minutes": 30}}, "m")
    line = progress_line(study, timed, time.perf_counter() - 600, 2)  # 10 of its 30 minutes spent
    assert line.startswith("trials 2/- (") and line.endswith("; 20 min of this launch's 30 min left")


def test_architecture_constraints_are_set_from_the_model_before_any_pruning():
    """FLOPs are known before training: a pruned trial must carry its constraint too, so the monitor sets it
    at its first report, counted on a fresh copy of the trial's architecture."""
    from skipdiff import SkipUNet2DModel
    from skipdiff.presets import unet_config
    from skipdiff.search.objectives import model_record
    from skipdiff.search.trial import set_model_constraints

    class Recorder:
        def __init__(self):
            self.constraints = {}

        def set_constraint(self, key, value):
            self.constraints[key] = value

    spec = parse_search_spec({**copy.deepcopy(TINY), "constraints": {"flops": 1.0e6, "parameters": 5.0e4}}, "m")
    unet = SkipUNet2DModel(**unet_config("tiny", sample_size=8, channels=1, skips="scale:0.5")).train()
    trial = Recorder()
    set_model_constraints(trial, spec, unet)
    expected = model_record(SkipUNet2DModel(**unet_config("tiny", sample_size=8, channels=1)).eval(), (1, 8, 8))
    assert trial.constraints == {"flops": expected["flops"] - 1.0e6, "parameters": expected["parameters"] - 5.0e4}
    assert unet.training  # the trained model itself is left as it was


def test_a_running_confirmation_is_reported_as_running_not_as_the_result(tmp_path):
    """Ranked on the seeds finished so far, a half-run confirmation would read as the search's result (and the
    atlas would take it for one): the report says how far it is and records no ranking."""
    from skipdiff.search.report import _confirmation_lines

    confirm = tmp_path / "confirm"
    confirm.mkdir()
    chosen = [{"label": "trial-0003", "trial": 3, "params": {}, "search_values": [0.3]}]
    (confirm / "chosen.json").write_text(json.dumps({"reference": {"skips": "full"}, "chosen": chosen}))
    names = ["config-reference__seed-5", "config-trial-0003__seed-5"]
    (confirm / "sweep.json").write_text(json.dumps({"cells": names}))
    cell = confirm / names[0]
    (cell / "eval").mkdir(parents=True)
    (cell / "cell.json").write_text(
        json.dumps({"status": "done", "axes": [{"axis": "config", "label": "reference"}], "options": {"seed": 5}})
    )
    (cell / "eval" / "eval.json").write_text(json.dumps({"denoise": {"mean": 0.3}}))
    summary = {}
    text = "\n".join(_confirmation_lines(tmp_path, summary))
    assert "Running: 1 of 2 runs finished (trial-0003 and the reference" in text
    assert "(the result)" not in text and "confirmation" not in summary


def test_a_study_refuses_another_spec_but_takes_new_confirmation_settings(tmp_path):
    """A relaunch with another space or budget would mix two searches in one study; the confirmation runs
    after the search and no trial reads it, so its settings (seeds, evaluation) may change."""
    from skipdiff.search import engine

    url = f"sqlite:///{tmp_path / 'study.db'}"
    spec = parse_search_spec({**copy.deepcopy(TINY), "confirm": {"top": 1, "seeds": [5, 6]}}, "s")
    engine.open_study(spec, url)
    confirm = parse_search_spec({**copy.deepcopy(TINY), "confirm": {"top": 1, "seeds": [5, 6, 7]}}, "s")
    study = engine.open_study(confirm, url)
    assert study.user_attrs["spec"]["confirm"]["seeds"] == [5, 6, 7]  # workers that join read the new one
    budget = parse_search_spec(
        {**copy.deepcopy(TINY), "budget": {"trials": 2}, "confirm": {"top": 1, "seeds": [5, 6, 7]}}, "s"
    )
    with pytest.raises(ValueError, match=r"created from another spec \(it differs in \['budget'\]\)"):
        engine.open_study(budget, url)
