"""torch.compile readiness of the gates, measured on CPU with tiny UNets.

``torch._dynamo.explain`` traces one forward and counts the graphs dynamo makes of it (graph breaks =
graphs - 1). Every deterministic gate (all modes but ``bernoulli`` and ``markov``, timestep windows and
timestep-dependent gates included) traces into one graph with the UNet; so do the stochastic gates in
training and under ``expected`` or ``map`` inference. Seeded sampling at inference
(``set_inference("sample")``) draws from a ``torch.Generator``, which dynamo cannot trace: the router
draws in the UNet's pre-hook, so those breaks stay in that hook's frame (at most
:data:`SAMPLE_MODE_BREAKS`) and the UNet's own graph stays whole.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from skipdiff import SkipUNet2DModel

pytestmark = pytest.mark.slow  # torch.compile: 3-9 s a test here
torch.set_num_threads(1)

# One gate of every deterministic kind on the 9 skips of the deep UNet (resolutions 4, 8 and 16).
DETERMINISTIC = [
    "zero",
    "scale:0.5",
    "learned:init=0.5",
    "learned_channel:init=0.5",
    "learned_channel:form=se",
    "fourier:backbone=1.4:skip=0.3",
    "fourier:backbone=1.4:skip=0.3:structure=true:t_max=800",
    "adapter:t_min=300",
    "ramp:learned=true",
]
STOCHASTIC = ["bernoulli:p=0.6", "markov", "markov", "bernoulli:p=0.3:rescale=true"]
# Graph breaks measured with torch 2.14 (bernoulli alone: 2; markov adds 2 for its chain's draws).
SAMPLE_MODE_BREAKS = 5  # seeded inference draws (torch.Generator calls), since the shared draw_gate_states: 5


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def inputs(config: dict, timesteps: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    size = config["sample_size"]
    sample = torch.randn(len(timesteps), config["in_channels"], size, size, generator=generator)
    return sample, torch.tensor(timesteps)


@pytest.mark.parametrize(
    "spec, training", [(DETERMINISTIC, True), (DETERMINISTIC, False), ("full", True)], ids=["train", "eval", "keep"]
)
def test_every_deterministic_gate_compiles_into_one_graph(spec, training, deep_config):
    model = SkipUNet2DModel(**deep_config, skips=spec).train(training)
    explained = torch._dynamo.explain(model)(*inputs(deep_config, [100, 900]))
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.parametrize("inference", ["train", "expected", "map", "sample"])
def test_stochastic_gates_break_the_graph_only_for_seeded_sampling(inference, tiny_config):
    model = SkipUNet2DModel(**tiny_config, skips=STOCHASTIC, markov={"p_init": 0.5})
    model.train(inference == "train")
    if inference != "train":
        model.skip_router.set_inference(inference, seed=0)
    explained = torch._dynamo.explain(model)(*inputs(tiny_config, [100, 900]))
    if inference == "sample":
        assert 0 < explained.graph_break_count <= SAMPLE_MODE_BREAKS
    else:
        assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]


def test_compiled_timestep_gates_follow_every_forward_timesteps(tiny_config):
    # The timesteps are read from each forward, not baked into the graph at its first call.
    spec = ["ramp:low=2:high=0.1", "scale:0.1:t_min=500", "learned:init=3:t_max=300", "adapter:zero_init=false"]
    model = SkipUNet2DModel(**tiny_config, skips=spec).eval()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    outputs = []
    for timesteps in ([10, 900], [600, 100], [299, 500]):
        sample, t = inputs(tiny_config, timesteps)
        with torch.no_grad():
            out = compiled(sample, t).sample
            assert torch.equal(out, model(sample, t).sample), timesteps
        outputs.append(out)
    assert counter.frame_count == 1  # one graph, no recompilation for new timesteps
    assert not torch.equal(outputs[0], outputs[1])


def test_stochastic_training_compiles_with_a_dynamic_batch_size(tiny_config):
    # torch.rand(n, k, generator=None) used to fail here on a symbolic n (see skipdiff.seeding.uniform).
    model = SkipUNet2DModel(**tiny_config, skips=STOCHASTIC, markov={"p_init": 0.5}).train()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, dynamic=True)
    for batch in (2, 3):
        sample, timesteps = inputs(tiny_config, [500] * batch)
        with torch.no_grad():
            assert compiled(sample, timesteps).sample.shape == sample.shape
        assert sorted(model.skip_router.states) == list(range(model.num_skips))
        assert all(state.shape == (batch,) for state in model.skip_router.states.values())
    assert counter.frame_count == 1


def test_fourier_at_a_size_other_than_the_configured_one_compiles_into_one_graph(tiny_config):
    # Operators are built with the gates for sample_size (8); at 12 x 12 the compiled forward uses
    # diffusers' FFT filter rather than building one, and agrees with the eager forward.
    model = SkipUNet2DModel(**tiny_config, skips="fourier:backbone=1.4:skip=0.3:structure=true").eval()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    sample = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    timesteps = torch.tensor([100, 900])
    with torch.no_grad():
        torch.testing.assert_close(compiled(sample, timesteps).sample, model(sample, timesteps).sample)
    assert counter.frame_count == 1
