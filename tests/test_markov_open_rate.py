"""eval/markov_open_rate.py: the chain's open rate over training, overall and per skip, and the spec of
independent gates at the chain's per-skip rates."""

import json
from pathlib import Path

import pytest
from helpers.eval_scripts import eval_script

from skipdiff.skips.spec import parse_entry


def driver():
    return eval_script("markov_open_rate")


def write_run(folder: Path, steps: list[list[float]]) -> Path:
    """A run folder whose stats.jsonl logs the chain's marginals ``steps[i][k]`` (skip k, step i)."""
    folder.mkdir()
    lines = [json.dumps({"step": 0, "loss": 1.0})]  # a step without the chain is skipped
    for i, rates in enumerate(steps, start=1):
        gates = {f"skip{k}/p_open": rate for k, rate in enumerate(rates)}
        gates.update({f"skip{k}/p_open_if_prev_open": 0.99 for k in range(len(rates))})  # not a marginal
        lines.append(json.dumps({"step": i, "gates": gates}))
    (folder / "stats.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_per_skip_rates_are_means_over_logged_steps(tmp_path):
    module = driver()
    run = write_run(tmp_path / "skips-markov__seed-0", [[0.2, 0.8, 1.0], [0.4, 0.6, 1.0]])
    rates = module.run_skip_open_rates(run)
    assert rates == pytest.approx({0: 0.3, 1: 0.7, 2: 1.0})
    assert module.run_open_rate(run) == pytest.approx((0.3 + 0.7 + 1.0) / 3)


def test_independent_gates_spec_parses_to_one_bernoulli_gate_per_skip():
    spec = driver().independent_gates_spec({0: 0.3, 1: 0.7, 2: 1.0})
    assert spec == "bernoulli:p=0.300,bernoulli:p=0.700,bernoulli:p=1.000"
    entries = [parse_entry(part) for part in spec.split(",")]
    assert [(e["mode"], e["p"]) for e in entries] == [("bernoulli", 0.3), ("bernoulli", 0.7), ("bernoulli", 1.0)]


def test_independent_gates_spec_refuses_a_chain_over_some_skips():
    with pytest.raises(ValueError, match=r"skips \[0, 2\]"):
        driver().independent_gates_spec({0: 0.3, 2: 0.5})


def test_main_averages_runs_per_skip(tmp_path):
    write_run(tmp_path / "skips-markov__seed-0", [[0.2, 0.8]])
    write_run(tmp_path / "skips-markov__seed-1", [[0.4, 0.6]])
    (tmp_path / "skips-full__seed-0").mkdir()
    out = tmp_path / "open_rate.json"
    result = driver().main([str(tmp_path), "--match", "skips-markov", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert result["per_skip_open_rate"] == pytest.approx({"0": 0.3, "1": 0.7})
    assert result["independent_gates_spec"] == "bernoulli:p=0.300,bernoulli:p=0.700"
    assert result["mean_open_rate"] == pytest.approx(0.5)
