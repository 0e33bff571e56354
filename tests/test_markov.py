"""The Markov chain over skips: structure, learning rule, persistence and multi-process agreement."""

from __future__ import annotations

import itertools
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from skipdiff import SkipUNet2DModel
from skipdiff.skips.markov import MarkovChain, check_options

torch.set_num_threads(1)

BUFFERS = ("open_prob", "utility", "utility_weight", "counts", "loss_stats", "num_updates", "num_nonfinite")


def tiny_unet(**kwargs) -> SkipUNet2DModel:
    config = dict(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(4, 8),
        layers_per_block=1,
        norm_num_groups=2,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        skips="markov",
    )
    return SkipUNet2DModel(**{**config, **kwargs})


def simulated_losses(paths: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per-example losses of a synthetic task with K = 3 gated paths (B, 3) -> (B,).

    Path 0 carries the signal (closing it costs 1.0), path 1 carries only noise (opening it adds
    |noise|), path 2 does nothing; every example has its own irreducible noise.
    """
    batch = paths.shape[0]
    noise = torch.randn(batch, generator=generator).abs()
    irreducible = 0.3 * torch.randn(batch, generator=generator)
    return 1.0 + 1.0 * (1 - paths[:, 0]) + 0.5 * paths[:, 1] * noise + irreducible


def run_simulation(chain: MarkovChain, steps: int, seed: int, batch_size: int = 64) -> MarkovChain:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        paths = chain.sample(batch_size, generator)
        chain.update(paths, simulated_losses(paths, generator))
    return chain


def path_probability(chain: MarkovChain, path: tuple[int, ...]) -> float:
    p = chain.open_prob.double()
    prob = p[0, 1] if path[0] else 1 - p[0, 1]
    for k in range(1, len(path)):
        row = p[k, path[k - 1]]
        prob = prob * (row if path[k] else 1 - row)
    return float(prob)


# ---- structure -----------------------------------------------------------------------------------


def test_marginals_and_map_match_enumeration():
    generator = torch.Generator().manual_seed(0)
    for num_links in (1, 2, 4):
        chain = MarkovChain(num_links, p_min=0.0, p_max=1.0)
        for _ in range(5):
            chain.open_prob.copy_(torch.rand(num_links, 2, generator=generator))
            chain.open_prob[0, 0] = chain.open_prob[0, 1]  # s_0 does not exist
            paths = list(itertools.product((0, 1), repeat=num_links))
            probs = torch.tensor([path_probability(chain, path) for path in paths], dtype=torch.float64)
            states = torch.tensor(paths, dtype=torch.float64)  # (2^K, K)
            assert probs.sum().item() == pytest.approx(1.0)
            torch.testing.assert_close(chain.marginals().double(), probs @ states, rtol=0, atol=1e-6)
            assert chain.map_path().tolist() == list(paths[int(probs.argmax())])


def test_sampling_matches_enumeration():
    chain = MarkovChain(3, p_min=0.0, p_max=1.0)
    chain.open_prob.copy_(torch.tensor([[0.7, 0.7], [0.2, 0.9], [0.6, 0.1]]))
    samples = chain.sample(40_000, torch.Generator().manual_seed(1))  # (N, 3)
    codes = (samples.long() * torch.tensor([4, 2, 1])).sum(dim=1)
    frequencies = torch.bincount(codes, minlength=8).double() / len(codes)
    expected = torch.tensor([path_probability(chain, p) for p in itertools.product((0, 1), repeat=3)])
    torch.testing.assert_close(frequencies, expected.double(), rtol=0, atol=0.01)


def test_rows_stay_stochastic_and_bounded_under_random_updates():
    generator = torch.Generator().manual_seed(2)
    chain = MarkovChain(4, p_min=0.1, p_max=0.8, p_init=0.5, cost=[0.0, 0.5, -0.5, 2.0], warmup_steps=0, min_count=1)
    for step in range(300):
        batch = int(torch.randint(1, 40, (), generator=generator))
        paths = chain.sample(batch, generator)
        if step % 7 == 0:
            paths = torch.ones_like(paths)  # some buckets empty
        scale = 10.0 ** float(torch.randint(-3, 4, (), generator=generator))
        losses = scale * torch.randn(batch, generator=generator) ** 3  # heavy tails, any scale
        chain.update(paths, losses)
        p = chain.open_prob
        assert bool(((p >= chain.p_min - 1e-7) & (p <= chain.p_max + 1e-7)).all()), p
        torch.testing.assert_close(chain.initial().sum(), torch.tensor(1.0))
        torch.testing.assert_close(chain.transitions().sum(dim=-1), torch.ones(3, 2))
        assert bool((chain.transitions() >= 0).all())
        assert torch.equal(p[0, 0], p[0, 1])


# ---- the learning rule ---------------------------------------------------------------------------


def test_update_matches_hand_computation():
    chain = MarkovChain(2, warmup_steps=0, min_count=1, normalize="none", temperature=0.5, cost=0.1)
    paths = torch.tensor([[0, 0], [0, 1], [1, 1], [1, 1], [1, 0], [1, 0]], dtype=torch.float32)
    losses = torch.tensor([3.0, 2.0, 1.0, 2.0, 4.0, 6.0])
    chain.update(paths, losses)
    # Skip 1: closed mean 2.5 (n=2), open mean 3.25 (n=4): d = -0.75, w = 2 * 4 / 6.
    # Skip 2 | skip 1 closed: closed 3 (n=1), open 2 (n=1): d = 1, w = 1/2.
    # Skip 2 | skip 1 open: closed 5 (n=2), open 1.5 (n=2): d = 3.5, w = 1.
    torch.testing.assert_close(chain.utility, torch.tensor([[-0.75, -0.75], [1.0, 3.5]]))
    torch.testing.assert_close(chain.utility_weight, torch.tensor([[4 / 3, 4 / 3], [0.5, 1.0]]))
    assert chain.counts.tolist() == [[[2, 4], [2, 4]], [[1, 1], [2, 2]]]
    expected = torch.sigmoid((chain.utility - 0.1) / 0.5).clamp(0.05, 0.95)
    torch.testing.assert_close(chain.open_prob, expected)
    torch.testing.assert_close(chain.loss_stats[1], losses.mean())
    torch.testing.assert_close(chain.loss_stats[2], losses.var(unbiased=False))

    # A second batch: u <- (beta * W * u + w * d) / (beta * W + w) on every observed cell.
    chain.update(paths, losses + torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 3.0]))
    beta = chain.ema_decay
    # Skip 1: open mean becomes 4.0, d = -1.5; skip 2 | open: closed mean 6.5, d = 5.
    assert chain.utility[0, 0].item() == pytest.approx((beta * -0.75 - 1.5) / (beta + 1), abs=1e-6)
    assert chain.utility[1, 1].item() == pytest.approx((beta * 3.5 + 5.0) / (beta + 1), abs=1e-6)


def test_empty_buckets_keep_their_utility():
    chain = run_simulation(MarkovChain(3, warmup_steps=0, min_count=1, normalize="none"), steps=20, seed=3)
    before = {name: getattr(chain, name).clone() for name in BUFFERS}
    chain.update(torch.ones(16, 3), torch.rand(16))  # every skip open: no closed bucket anywhere
    assert torch.equal(chain.utility, before["utility"])
    assert torch.equal(chain.utility_weight, before["utility_weight"])
    assert torch.equal(chain.open_prob, before["open_prob"])
    added = chain.counts - before["counts"]
    assert added[:, 1, 1].tolist() == [16, 16, 16] and int(added.sum()) == 16 * 4  # row 0 counted in both columns


def test_warmup_keeps_initial_probabilities_and_min_count_gates_rows():
    chain = run_simulation(MarkovChain(3, p_init=0.6, warmup_steps=30), steps=30, seed=4)
    assert torch.equal(chain.open_prob, torch.full((3, 2), 0.6))
    assert chain.utility.abs().sum() > 0  # utilities are collected during warm-up
    run_simulation(chain, steps=1, seed=5)
    assert not torch.equal(chain.open_prob, torch.full((3, 2), 0.6))

    strict = MarkovChain(2, p_init=0.6, warmup_steps=0, min_count=10**9)
    strict.update(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([5.0, 0.0]))
    assert torch.equal(strict.open_prob, torch.full((2, 2), 0.6))


def test_nonfinite_losses_are_left_out_and_counted():
    chain = MarkovChain(2, warmup_steps=0, min_count=1)
    paths = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    chain.update(paths, torch.tensor([1.0, float("nan"), float("inf")]))
    assert int(chain.num_nonfinite) == 2 and int(chain.counts.sum()) == 3  # one example, row 0 twice
    assert bool(torch.isfinite(chain.utility).all() & torch.isfinite(chain.loss_stats).all())


def test_bad_input_and_options_raise():
    chain = MarkovChain(2)
    with pytest.raises(ValueError, match="paths must have shape"):
        chain.update(torch.ones(4, 3), torch.ones(4))
    with pytest.raises(ValueError, match="losses must have shape"):
        chain.update(torch.ones(4, 2), torch.ones(5))
    with pytest.raises(ValueError, match="0/1"):
        chain.update(torch.full((4, 2), 0.5), torch.ones(4))
    for options in (
        {"temperature": 0.0},
        {"ema_decay": 1.0},
        {"warmup_steps": -1},
        {"min_count": 0},
        {"cost": [0.1, 0.2, 0.3]},
        {"normalize": "rank"},
        {"p_min": 0.9},
    ):
        with pytest.raises(ValueError):
            MarkovChain(2, **options)
    with pytest.raises(ValueError, match="unknown markov option"):
        check_options({"tau": 0.1})
    with pytest.raises(ValueError, match="unknown markov option"):
        tiny_unet(markov={"tau": 0.1})


def test_synthetic_task_keeps_the_essential_skip_open_and_the_noise_skip_closed():
    chain = run_simulation(MarkovChain(3, warmup_steps=50), steps=300, seed=7)
    marginals = chain.marginals()
    assert marginals[0] > 0.9, chain.state_summary()
    assert marginals[1] < 0.3, chain.state_summary()
    assert chain.map_path()[:2].tolist() == [1.0, 0.0]


class GatedRegressor(nn.Module):
    """y = w.x from two gated paths: ``signal`` sees x, ``noise`` sees an independent noise input."""

    def __init__(self, dim: int = 8, hidden: int = 16):
        super().__init__()
        self.signal, self.noise, self.head = (
            nn.Linear(dim, hidden),
            nn.Linear(dim, hidden),
            nn.Linear(hidden, 1),
        )

    def forward(self, x, z, states):  # x, z: (B, dim); states: (B, 2)
        hidden = states[:, :1] * self.signal(x) + states[:, 1:] * self.noise(z)  # (B, hidden)
        return self.head(hidden).squeeze(1)  # (B,)


def test_trained_model_keeps_the_signal_path_and_closes_the_noise_path():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = GatedRegressor()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    chain = MarkovChain(2, warmup_steps=50, cost=0.2)  # a small price on every open path
    w_true = torch.randn(8, generator=generator)
    for _ in range(300):
        x, z = torch.randn(64, 8, generator=generator), torch.randn(64, 8, generator=generator)
        paths = chain.sample(64, generator)
        losses = (model(x, z, paths) - x @ w_true) ** 2  # (B,)
        optimizer.zero_grad()
        losses.mean().backward()
        optimizer.step()
        chain.update(paths, losses.detach())
    marginals = chain.marginals()
    assert marginals[0] > 0.9, chain.state_summary()
    assert marginals[1] < 0.3, chain.state_summary()


def test_same_seed_same_chain():
    def run(seed):
        return run_simulation(MarkovChain(3, warmup_steps=10), steps=60, seed=seed)

    first, second, other = run(8), run(8), run(9)
    for name in BUFFERS:
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    assert not torch.equal(first.utility, other.utility)


# ---- through the UNet ----------------------------------------------------------------------------


def test_unet_chain_round_trips_through_save_pretrained(tmp_path):
    torch.manual_seed(0)
    markov = {"warmup_steps": 2, "min_count": 1, "cost": 0.1, "temperature": 0.2}
    model = tiny_unet(markov=markov)
    router = model.skip_router
    assert router.chain.num_links == model.num_skips == 4
    with pytest.raises(RuntimeError, match="training-mode forward"):
        router.update_chain(torch.ones(4))
    model.train()
    for _ in range(6):
        sample = torch.randn(4, 1, 8, 8)
        output = model(sample, torch.tensor([10, 200, 500, 900])).sample
        losses = ((output - sample) ** 2).mean(dim=(1, 2, 3))  # (B,)
        router.update_chain(losses.detach())
        assert router.last_path is None
    chain = router.chain
    assert int(chain.num_updates) == 6 and not torch.equal(chain.open_prob, torch.full((4, 2), 0.8))

    model.save_pretrained(tmp_path)
    loaded = SkipUNet2DModel.from_pretrained(tmp_path)
    assert loaded.config.markov == markov
    for name in BUFFERS:
        original, restored = getattr(chain, name), getattr(loaded.skip_router.chain, name)
        assert original.dtype == restored.dtype and torch.equal(original, restored), name
    assert loaded.skip_router.chain.state_summary() == chain.state_summary()
    assert loaded.skip_router.recommended_spec() == router.recommended_spec()
    summary = router.markov_summary()
    assert summary["skips"] == [0, 1, 2, 3] and summary["num_updates"] == 6
    assert "skip3/p_open_if_prev_closed" in router.telemetry()


def test_markov_rescale_is_inverted_dropout_on_the_marginal():
    model = tiny_unet(skips=["markov:rescale=true"] * 4)
    router = model.skip_router
    router.chain.open_prob.copy_(torch.tensor([[0.7, 0.7], [0.2, 0.9], [0.5, 0.3], [0.9, 0.6]]))
    marginals = router.chain.marginals()
    router.train()
    torch.manual_seed(1)
    states = router.sample_states(20_000, torch.device("cpu"))
    for j in range(4):
        kept = states[j][states[j] != 0]
        torch.testing.assert_close(kept, torch.full_like(kept, 1 / marginals[j].item()))
        assert states[j].mean().item() == pytest.approx(1.0, abs=0.05)
    torch.testing.assert_close(router.last_path.mean(dim=0), marginals, rtol=0, atol=0.02)
    router.eval()
    router.set_inference("expected")
    for state in router.sample_states(3, torch.device("cpu")).values():
        torch.testing.assert_close(state, torch.ones(3))


# ---- several processes ---------------------------------------------------------------------------

WORLD, GLOBAL_BATCH, STEPS = 2, 32, 40


def _chain_for_ddp() -> MarkovChain:
    return MarkovChain(3, warmup_steps=5, min_count=4)


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    chain = _chain_for_ddp()
    generator = torch.Generator().manual_seed(10)  # the same stream on every rank
    batches = []
    for _ in range(STEPS):
        paths = chain.sample(GLOBAL_BATCH // WORLD, generator)  # this rank's share of the global batch's paths
        losses = simulated_losses(paths, generator)
        chain.update(paths, losses)  # each rank sees only its own examples' losses
        batches.append((paths, losses))
    torch.save({"state": chain.state_dict(), "batches": batches}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_keep_identical_chains(tmp_path):
    # fork: the children reuse this process's imports (spawning would re-import diffusers, ~10 s each).
    mp.start_processes(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, start_method="fork")
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for name, value in results[0]["state"].items():
        assert torch.equal(value, results[1]["state"][name]), name

    single = _chain_for_ddp()  # one process, the whole global batch, same paths and losses
    half = _chain_for_ddp()  # what rank 0 would have learnt without the all-reduce
    pairs = list(zip(results[0]["batches"], results[1]["batches"], strict=True))
    assert not torch.equal(pairs[0][0][0], pairs[0][1][0])  # the ranks sampled different examples' paths
    for (paths0, losses0), (paths1, losses1) in pairs:
        single.update(torch.cat([paths0, paths1]), torch.cat([losses0, losses1]))
        half.update(paths0, losses0)
    assert not torch.equal(half.utility, results[0]["state"]["utility"])
    assert int(single.num_updates) == STEPS
    for name, value in single.state_dict().items():
        torch.testing.assert_close(results[0]["state"][name], value, rtol=1e-5, atol=1e-6, msg=name)
