"""The report's Markov-chain table: transition probabilities at the chain's clip are marked as the clip."""

from types import SimpleNamespace

from skipdiff.report.markdown import markov_markdown
from skipdiff.report.read import final_chain


def state(p_closed_last: float, with_bounds: bool = True) -> dict:
    state = {
        "skips": [0, 1],
        "marginals": [0.3, 0.7],
        "open_prob": [[0.3, 0.3], [p_closed_last, 0.349]],
    }
    return {**state, "p_min": 0.05, "p_max": 0.95} if with_bounds else state


def test_final_chain_takes_the_bounds_from_the_state_else_the_model_config_else_the_defaults():
    assert final_chain(state(0.9), "skip")["p_max"] == 0.95
    old = final_chain(state(0.9, with_bounds=False), "skip", {"p_max": 0.9, "cost": 0.1})
    assert (old["p_min"], old["p_max"]) == (0.05, 0.9)
    assert final_chain(state(0.9, with_bounds=False), "skip")["p_max"] == 0.95


def test_a_transition_at_the_clip_is_marked_with_how_many_seeds_sit_there():
    rows = [
        SimpleNamespace(chain=final_chain(state(0.95), "skip"), variant=None),
        SimpleNamespace(chain=final_chain(state(0.95), "skip"), variant=None),
        SimpleNamespace(chain=final_chain(state(0.9), "skip"), variant=None),
    ]
    text = "\n".join(markov_markdown("skips=markov", rows))
    assert "| 1 | skip 1 | 0.700 | 0.933 (clip: 2/3) | 0.349 |" in text
    assert "| 0 | skip 0 | 0.300 | 0.300 | 0.300 |" in text
    assert "the value is the clip, not an estimate" in text


def test_no_clip_note_when_nothing_sits_at_a_bound():
    rows = [SimpleNamespace(chain=final_chain(state(0.9), "skip"), variant=None)]
    assert "clip" not in "\n".join(markov_markdown("skips=markov", rows))
