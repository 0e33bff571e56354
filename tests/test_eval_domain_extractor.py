"""Domain feature extractors: one per built-in image set, trained on the run's own train split.

One test trains the real photo_patches extractor (~20 s on one thread) and checks its held-out
accuracy, its cache and its weight-hashed name; the others replace the training by a recorder, so
that they check which pixels it would see in seconds.
"""

from __future__ import annotations

import copy

import pytest
import torch

from skipdiff.classifiers import SkipResNetConfig, SkipResNetForImageClassification
from skipdiff.config import subset
from skipdiff.data import load_image_splits
from skipdiff.data_options import DataOptions
from skipdiff.eval import (
    INCEPTION,
    auto_extractor,
    classifier_extractor_name,
    load_extractor,
    register_classifier_extractor,
    resolve_extractor,
)
from skipdiff.eval import domain_extractor as domain_module
from skipdiff.eval import extractors as extractors_module
from skipdiff.eval import inception as inception_module


@pytest.mark.slow
def test_photo_patches_extractor_is_accurate_cached_and_named_by_its_weights(monkeypatch, tmp_path):
    run = DataOptions(dataset="photo_patches", resolution=16)
    spec = resolve_extractor("auto", data=run, cache_dir=tmp_path)  # trains on first use
    folder = domain_module.extractor_dir(run, 0, tmp_path)
    info = extractors_module.extractor_info(folder)
    assert info["test_accuracy"] >= domain_module.MIN_ACCURACY["photo_patches"] == 0.9
    assert (info["train_size"], info["test_size"], info["channels"]) == (2312, 578, 3)
    assert spec.name == info["name"] and spec.name.startswith("skipdiff-photo_patches16-")
    model = load_extractor(folder)
    assert classifier_extractor_name(model, "photo_patches16", 16) == spec.name  # the saved weights' hash
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.stem[0].weight.mul_(1.01)
    assert register_classifier_extractor(changed, "photo_patches16", 16) != spec.name
    monkeypatch.setattr(domain_module, "train_domain_extractor", lambda *a, **k: pytest.fail("retrained"))
    assert resolve_extractor("photo_patches", data=run, cache_dir=tmp_path) == spec  # the cached one


@pytest.fixture
def recorded_fit(monkeypatch):
    """Replace the training by a recorder of the pixels and labels it is given."""
    seen = {}

    def fit(model, x, y, recipe, seed, log=None):
        seen.update(x=x, y=y, seed=seed)
        model.eval()

    monkeypatch.setattr(domain_module, "fit_classifier", fit)
    return seen


def _rows(x: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in x}


@pytest.mark.slow
def test_extractor_trains_on_the_runs_train_split(tmp_path, recorded_fit):
    training = {
        "dataset": "photo_patches",
        "split_seed": 3,
        "test_fraction": 0.25,
        "max_train_samples": 100,
        "resolution": 16,
        "learning_rate": 1e-3,
    }  # a run's training_options.json
    run = subset(DataOptions, training)
    folder = domain_module.train_domain_extractor(run, 0, tmp_path / "ext", min_accuracy=0.0)
    splits = load_image_splits(DataOptions(dataset="photo_patches", split_seed=3, test_fraction=0.25))
    train_x, train_y = domain_module.labelled_pixels(splits["train"], 16, 3)
    test_x, _ = domain_module.labelled_pixels(splits["test"], 16, 3)
    assert torch.equal(recorded_fit["x"], train_x) and torch.equal(recorded_fit["y"], train_y)  # whole split
    assert len(recorded_fit["x"]) == 2890 - 723  # --max_train_samples does not shrink the extractor's data
    assert not _rows(recorded_fit["x"]) & _rows(test_x)  # no test image reaches the extractor
    info = extractors_module.extractor_info(folder)
    key = DataOptions(dataset="photo_patches", split_seed=3, test_fraction=0.25).split_key()
    assert (info["split_seed"], info["test_fraction"], info["split_key"]) == (3, 0.25, key)
    default = load_image_splits(DataOptions(dataset="photo_patches"))
    default_x, _ = domain_module.labelled_pixels(default["train"], 16, 3)
    assert _rows(default_x) != _rows(recorded_fit["x"])  # not the fixed split seed 0 / fraction 0.2


def test_cache_folder_is_keyed_by_dataset_resolution_split_channels_and_seed(tmp_path):
    base = DataOptions(dataset="photo_patches")
    folder = domain_module.extractor_dir(base, 0, tmp_path)
    assert folder.parent == tmp_path / "extractors"
    assert folder.name == f"photo_patches-16px-{base.split_key()}-seed0"
    others = [
        DataOptions(dataset="digits"),
        DataOptions(dataset="photo_patches", resolution=32),
        DataOptions(dataset="photo_patches", split_seed=1),
        DataOptions(dataset="photo_patches", test_fraction=0.3),
        DataOptions(dataset="photo_patches", image_channels=1),
    ]
    names = {domain_module.extractor_dir(data, 0, tmp_path).name for data in others}
    names.add(domain_module.extractor_dir(base, 1, tmp_path).name)
    assert len(names) == 6 and folder.name not in names
    same = [
        DataOptions(dataset="photo_patches", max_train_samples=50),
        DataOptions(dataset="photo_patches", random_flip=True),
    ]
    assert {domain_module.extractor_dir(data, 0, tmp_path) for data in same} == {folder}


def test_auto_picks_the_sets_own_extractor_else_inception(monkeypatch, tmp_path):
    assert auto_extractor(DataOptions(dataset="photo_patches")) == "photo_patches"
    assert auto_extractor(DataOptions()) == "digits"
    assert auto_extractor(DataOptions(dataset_name="cifar10")) == INCEPTION
    folder_run = DataOptions(train_data_dir=str(tmp_path))  # its dataset field still says "digits"
    assert auto_extractor(folder_run) == INCEPTION
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"")
    monkeypatch.setattr(inception_module, "inception_cache_path", lambda: weights)
    assert resolve_extractor("auto", data=folder_run).name == INCEPTION


def test_a_domain_extractor_needs_a_built_in_image_set(tmp_path):
    for data, named in ((DataOptions(dataset_name="cifar10"), "cifar10"), (DataOptions(dataset="wine"), "wine")):
        with pytest.raises(ValueError, match=f"built-in image set .*got '{named}'"):
            domain_module.extractor_dir(data, 0, tmp_path)


def test_too_low_accuracy_fails_and_saves_nothing(tmp_path, recorded_fit):
    with pytest.raises(RuntimeError, match="photo_patches extractor reached .* < min_accuracy=1.01"):
        domain_module.train_domain_extractor(
            DataOptions(dataset="photo_patches"), 0, tmp_path / "ext", min_accuracy=1.01
        )
    assert not (tmp_path / "ext").exists()


def test_a_second_process_keeps_the_first_extractor(tmp_path):
    """Two sweep runners may train the same cached extractor at once: the first folder written stays."""
    config = SkipResNetConfig(num_labels=3, num_channels=3, widths=[4], depth=1, hidden_size=4)
    first, second = (SkipResNetForImageClassification(config) for _ in range(2))  # different random weights
    out = tmp_path / "ext"
    domain_module.save_extractor(first, {"who": "first"}, out, overwrite=False)
    domain_module.save_extractor(second, {"who": "second"}, out, overwrite=False)
    assert extractors_module.extractor_info(out) == {"who": "first"}
    assert classifier_extractor_name(load_extractor(out)) == classifier_extractor_name(first)
    domain_module.save_extractor(second, {"who": "second"}, out)  # overwrite=True: an explicit retrain replaces
    assert extractors_module.extractor_info(out) == {"who": "second"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext"]  # no staging folder left behind


def test_training_an_extractor_prints_where_it_goes_and_each_epoch(tmp_path, capsys):
    """Issue 31: the digits extractor trained for 50-90 s without a word."""
    recipe = domain_module.ExtractorRecipe(widths=(4,), hidden_size=8, epochs=2, batch_size=256)
    folder = tmp_path / "ext"
    domain_module.train_domain_extractor(
        DataOptions(dataset="digits", resolution=8), 0, folder, recipe=recipe, min_accuracy=0.0
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("training the digits feature extractor for FID") and str(folder) in lines[0]
    assert "2 epochs on 1437 train images" in lines[0]
    assert [line.split(":")[0].strip() for line in lines[1:3]] == ["epoch 1/2", "epoch 2/2"]
    assert lines[3].strip().startswith("done in") and "test accuracy" in lines[3]
