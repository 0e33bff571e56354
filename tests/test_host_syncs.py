"""A training step that does not log never reads a device value on the host.

On a GPU such a read (``.item()``, ``float(t)``, ``bool(t)``, ``.tolist()``) waits for every queued kernel,
which for a small UNet can cost more than the step itself. CPU tensors have no queue, so the test counts
the reads instead: every host-read method of ``torch.Tensor`` is wrapped while the loop runs a step, and a
non-logging step must make none (``torch.cuda.set_sync_debug_mode`` semantics, emulated on the CPU).
The skip of a non-finite step is decided on the device too; its counts and weights are checked against
diffusers' ``EMAModel`` and a plain AdamW that simply does not step.
"""

from __future__ import annotations

import contextlib
import copy
import traceback

import pytest
import torch
from diffusers.training_utils import EMAModel
from helpers.unet_runs import run_train_unet, tiny_args, train_unet_module

from skipdiff.training import ema as ema_module
from skipdiff.training.ema import WeightEMA, lerp_multi_tensor, lerp_per_tensor
from skipdiff.training.step import optimizer_step

HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy")


@contextlib.contextmanager
def count_host_reads(active: list[bool], reads: list[str]):
    """While ``active[0]`` is true, record a short stack of every host read of a tensor."""
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def wrap(name, original):
        def reader(self, *args, **kwargs):
            if active[0]:
                where = traceback.extract_stack(limit=4)[0]
                reads.append(f"{name} at {where.filename.rsplit('/', 2)[-1]}:{where.lineno}")
            return original(self, *args, **kwargs)

        return reader

    for name, original in originals.items():
        setattr(torch.Tensor, name, wrap(name, original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["--skips", "markov", "--markov", "warmup_steps=1,min_count=1"],
        ["--skips", "stochastic-depth:p=0.7:rescale=true", "--noise_offset", "0.1", "--input_perturbation", "0.1"],
        [
            "--skips",
            "learned,scale:0.5,learned_channel,keep",
            "--max_grad_norm",
            "0",
            "--snr_gamma",
            "5",
            "--gradient_accumulation_steps",
            "2",
        ],
    ],
    ids=["full", "markov", "stochastic-depth", "learned-accumulation"],
)
@pytest.mark.slow
def test_a_step_that_does_not_log_reads_nothing_from_the_device(extra, tmp_path, monkeypatch):
    module = train_unet_module()
    active, reads, per_step = [False], [], []
    micro_step = module._micro_step

    def counted(run, batch, logging_step):
        active[0] = not logging_step
        before = len(reads)
        try:
            return micro_step(run, batch, logging_step)
        finally:
            active[0] = False
            per_step.append((run.step + 1, logging_step, reads[before:]))

    monkeypatch.setattr(module, "_micro_step", counted)
    with count_host_reads(active, reads):
        metrics = run_train_unet(tiny_args(tmp_path / "run", "--max_train_steps", "6", "--log_every", "3", *extra))
    assert metrics["steps"] == 6
    quiet = [(step, found) for step, logging, found in per_step if not logging]
    assert len(quiet) >= 4  # steps 1, 2, 4, 5 (and more micro-batches with accumulation)
    assert all(not found for _, found in quiet), quiet


def test_the_wrapper_sees_host_reads():
    """The counter itself works: a read inside an active window is recorded, outside it is not."""
    active, reads = [False], []
    with count_host_reads(active, reads):
        torch.ones(()).item()
        active[0] = True
        torch.ones(()).item()
        float(torch.ones(()))
        bool(torch.ones(()) > 0)
    assert [r.split(" ")[0] for r in reads] == ["item", "__float__", "__bool__"]


@pytest.mark.parametrize("update", [lerp_per_tensor, lerp_multi_tensor], ids=["cpu-lerp", "gpu-multi-tensor"])
def test_the_device_ema_equals_diffusers_ema_including_a_skipped_step(update, monkeypatch):
    monkeypatch.setattr(ema_module, "lerp_per_tensor", update)  # the CPU runs the update a GPU would use
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    reference = EMAModel(copy.deepcopy(model).parameters(), decay=0.999, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
    ours = WeightEMA(model.parameters(), max_decay=0.999, inv_gamma=1.0, power=0.75)
    for step in range(12):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        taken = step != 5  # step 5 was non-finite: neither EMA moves
        ours.step(torch.tensor(taken))
        if taken:
            reference.step(model.parameters())
    assert int(ours.optimization_step) == reference.optimization_step == 11
    for a, b in zip(ours.shadow, reference.shadow_params, strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-7)


def test_a_skipped_fused_adamw_step_changes_nothing_and_a_taken_one_equals_plain_adamw():
    torch.manual_seed(0)
    start = torch.randn(5)
    fused = torch.nn.Parameter(start.clone())
    plain = torch.nn.Parameter(start.clone())
    opt_fused = torch.optim.AdamW([fused], lr=0.1, weight_decay=0.01, fused=True)
    opt_plain = torch.optim.AdamW([plain], lr=0.1, weight_decay=0.01, foreach=False)
    for step in range(4):
        grad = torch.randn(5)
        fused.grad = grad.clone() if step != 2 else torch.full((5,), float("nan"))
        optimizer_step(opt_fused, torch.tensor(step != 2))
        if step != 2:
            plain.grad = grad.clone()
            opt_plain.step()
        assert torch.isfinite(fused).all()
    assert int(opt_fused.state[fused]["step"]) == int(opt_plain.state[plain]["step"]) == 3
    assert torch.allclose(fused, plain, rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("gating", ["none", "markov", "bernoulli"])
def test_a_classifier_step_that_does_not_log_reads_nothing_from_the_device(gating, tmp_path, monkeypatch):
    """The classifier loop keeps the same rule: running sums, gate states and the chain stay on the device."""
    from skipdiff.training.classifier import ClassifierOptions, loop, train_classifier

    active, reads, per_step = [False], [], []
    train_step = loop._train_step

    def counted(run, batch, generator, log_now):
        active[0] = not log_now
        before = len(reads)
        try:
            return train_step(run, batch, generator, log_now)
        finally:
            active[0] = False
            per_step.append((run.step + 1, log_now, reads[before:]))

    monkeypatch.setattr(loop, "_train_step", counted)
    options = ClassifierOptions(
        dataset="digits",
        resolution=8,
        widths=[4, 8],
        depth=1,
        train_batch_size=16,
        eval_batch_size=512,
        max_train_steps=6,
        log_every=3,
        num_threads=1,
        report_to="none",
        gating=gating,
        markov="warmup_steps=1,min_count=1" if gating == "markov" else "",
        output_dir=str(tmp_path / "run"),
    )
    with count_host_reads(active, reads):
        train_classifier(options)
    quiet = [(step, found) for step, logging, found in per_step if not logging]
    assert len(quiet) == 3  # steps 2, 4, 5 (step 1 and every third step log)
    assert all(not found for _, found in quiet), quiet
