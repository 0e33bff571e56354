"""skipdiff.eval: FID/KID/PRC on torch-fidelity, classifier feature extractors, the floor over seeds.

Properties rather than snapshots: FID equals an independent scipy Fréchet distance of the same
features, is ~0 for a set against itself and does not depend on the extraction batch size; extractor
names follow the weights; errors are clear. Most tests use a tiny random SkipResNet; one trains the
real digits extractor (~10 s).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import scipy.linalg
import torch
import torch_fidelity
from datasets import Dataset, Features, Image
from PIL import Image as PILImage

from skipdiff.classifiers import SkipResNetConfig, SkipResNetForImageClassification
from skipdiff.data_options import DataOptions
from skipdiff.eval import (
    INCEPTION,
    InceptionUnavailableError,
    RealImages,
    create_extractor,
    features_of,
    features_to_fid,
    features_to_kid,
    features_to_statistics,
    fid_with_floor,
    images_to_uint8,
    inception_kwargs,
    load_extractor,
    real_images,
    reference_and_heldout,
    register_classifier_extractor,
    resolve_extractor,
    statistics_to_fid,
)
from skipdiff.eval import domain_extractor as domain_module
from skipdiff.eval import extractors as extractors_module
from skipdiff.eval import fid as fid_module
from skipdiff.eval import inception as inception_module


def scipy_fid(features1: torch.Tensor, features2: torch.Tensor) -> float:
    """The Fréchet distance written out independently: numpy statistics, scipy's matrix square root."""
    a, b = features1.double().numpy(), features2.double().numpy()
    mu1, mu2 = a.mean(axis=0), b.mean(axis=0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def tiny_classifier(channels: int = 1, seed: int = 0) -> SkipResNetForImageClassification:
    torch.manual_seed(seed)
    config = SkipResNetConfig(num_labels=3, num_channels=channels, widths=[4, 8], depth=1, hidden_size=8)
    return SkipResNetForImageClassification(config).eval()


def random_uint8(n: int, channels: int = 1, size: int = 8, seed: int = 0, high: int = 256) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, high, (n, channels, size, size), generator=generator, dtype=torch.uint8)


@pytest.fixture
def extractor():
    """A tiny random SkipResNet registered with torch-fidelity; features (N, 8)."""
    return create_extractor(register_classifier_extractor(tiny_classifier(), "tiny"), cuda=False)


# --------------------------------------------------------------------------------------------------
# Images and the Fréchet distance
# --------------------------------------------------------------------------------------------------


def test_images_to_uint8_inverts_the_data_transform():
    pixels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    as_float = pixels.float() / 255 * 2 - 1  # ToTensor + Normalize([0.5], [0.5]), as skipdiff.data does
    assert torch.equal(images_to_uint8(as_float), pixels)
    assert images_to_uint8(torch.tensor([-3.0, -1.0, 0.0, 1.0, 7.0]).view(1, 1, 1, 5)).flatten().tolist() == [
        0,
        0,
        128,
        255,
        255,
    ]


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.zeros(2, 8, 8), "shape"),
        (torch.zeros(1, 1, 2, 2, dtype=torch.uint8), "floats"),
        (torch.tensor([0.0, float("nan")]).view(1, 1, 1, 2), "NaN"),
    ],
)
def test_images_to_uint8_rejects_bad_input(bad, message):
    with pytest.raises(ValueError, match=message):
        images_to_uint8(bad)


def test_fid_matches_scipy_on_gaussian_features():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(300, 8, generator=generator)
    b = torch.randn(200, 8, generator=generator) @ torch.randn(8, 8, generator=generator) * 0.5 + 0.3
    ours, reference = features_to_fid(a, b), scipy_fid(a, b)
    assert reference > 1.0
    assert abs(ours - reference) / reference <= 1e-6


# A random ReLU head leaves some features dead (zero variance), as trained extractors may: sigma is
# singular, scipy says so, and the two computations must still agree.
@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")
def test_fid_matches_scipy_through_the_extractor(extractor):
    real = features_of(random_uint8(96, seed=1), extractor, batch_size=32, cuda=False)
    fake = features_of(random_uint8(80, seed=2, high=160), extractor, batch_size=32, cuda=False)
    assert real.shape == (96, 8) and real.dtype == torch.float32
    ours, reference = features_to_fid(fake, real), scipy_fid(fake, real)
    assert reference > 0
    assert abs(ours - reference) / reference <= 1e-6


def test_fid_of_a_set_with_itself_is_zero(extractor):
    features = features_of(random_uint8(64), extractor, cuda=False)
    assert abs(features_to_fid(features, features)) < 1e-3


def test_fid_does_not_depend_on_the_batch_size(extractor):
    images, reference = random_uint8(50, seed=3, high=200), random_uint8(70, seed=4)
    reference_stats = features_to_statistics(features_of(reference, extractor, cuda=False))
    fids = [
        statistics_to_fid(
            *features_to_statistics(features_of(images, extractor, batch_size=b, cuda=False)), *reference_stats
        )
        for b in (1, 7, 64)
    ]
    assert max(fids) - min(fids) <= 1e-6 * abs(fids[0])


def test_statistics_need_two_samples_and_matching_shapes():
    with pytest.raises(ValueError, match="num_samples=1"):
        features_to_statistics(torch.zeros(1, 4))
    mu, sigma = features_to_statistics(torch.randn(10, 4))
    other_mu, other_sigma = features_to_statistics(torch.randn(10, 3))
    with pytest.raises(ValueError, match="do not match"):
        statistics_to_fid(mu, sigma, other_mu, other_sigma)


def test_kid_subset_size_is_capped_and_checked():
    a, b = torch.randn(40, 4), torch.randn(30, 4)
    assert features_to_kid(a, b, subsets=5)["kid_subset_size"] == 30
    with pytest.raises(ValueError, match="kid_subset_size"):
        features_to_kid(a, b, subset_size=31)


# --------------------------------------------------------------------------------------------------
# Classifier extractors
# --------------------------------------------------------------------------------------------------


def test_extractor_name_follows_the_weights(tmp_path):
    model = tiny_classifier()
    name = register_classifier_extractor(model, "tiny")
    assert name.startswith("skipdiff-tiny-") and len(name.rsplit("-", 1)[1]) == 12
    assert register_classifier_extractor(model, "tiny") == name  # idempotent: no "already registered"
    assert register_classifier_extractor(copy.deepcopy(model), "tiny") == name
    model.save_pretrained(tmp_path)
    assert register_classifier_extractor(load_extractor(tmp_path), "tiny") == name  # survives a round trip
    assert register_classifier_extractor(tiny_classifier(seed=1), "tiny") != name
    assert register_classifier_extractor(model, "tiny", resolution=16) != name
    with torch.no_grad():
        model.classifier.bias += 1e-3  # even the unused head counts: these are other weights
    assert register_classifier_extractor(model, "tiny") != name


def test_registered_extractor_is_a_frozen_copy():
    model = tiny_classifier()
    name = register_classifier_extractor(model, "frozen")
    images = random_uint8(8)
    before = features_of(images, name, cuda=False)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
    assert torch.equal(features_of(images, name, cuda=False), before)


def test_classifier_extractor_converts_grey_and_colour():
    grey = random_uint8(6, channels=1)
    rgb = grey.expand(-1, 3, -1, -1).contiguous()
    grey_model = create_extractor(register_classifier_extractor(tiny_classifier(channels=1), "grey"), cuda=False)
    colour_model = create_extractor(register_classifier_extractor(tiny_classifier(channels=3), "rgb"), cuda=False)
    torch.testing.assert_close(features_of(rgb, grey_model, cuda=False), features_of(grey, grey_model, cuda=False))
    torch.testing.assert_close(features_of(grey, colour_model, cuda=False), features_of(rgb, colour_model, cuda=False))


def test_classifier_extractor_resizes_to_its_resolution():
    name = register_classifier_extractor(tiny_classifier(), "sized", resolution=8)
    levels = torch.tensor([0, 90, 200, 255], dtype=torch.uint8).view(4, 1, 1, 1)
    small, large = levels.expand(4, 1, 8, 8), levels.expand(4, 1, 16, 16)  # flat images resize exactly
    features = features_of(large.contiguous(), name, cuda=False)
    torch.testing.assert_close(features, features_of(small.contiguous(), name, cuda=False))


def test_unknown_extractor_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown feature extractor 'nope'.*digits"):
        resolve_extractor("nope")
    with pytest.raises(ValueError, match="not registered"):
        create_extractor("skipdiff-never-000000000000")
    with pytest.raises(ValueError, match="no saved classifier"):
        load_extractor(tmp_path)
    with pytest.raises(ValueError, match="SkipResNetForImageClassification"):
        register_classifier_extractor(torch.nn.Linear(2, 2))


# --------------------------------------------------------------------------------------------------
# Inception offline
# --------------------------------------------------------------------------------------------------


def test_inception_offline_without_weights_fails_early(monkeypatch, tmp_path):
    monkeypatch.setattr(inception_module, "inception_cache_path", lambda: tmp_path / "missing.pth")
    monkeypatch.setattr(inception_module, "network_reachable", lambda *args, **kwargs: False)
    with pytest.raises(InceptionUnavailableError, match="--inception_weights PATH.*--feature_extractor digits"):
        resolve_extractor(INCEPTION)
    with pytest.raises(ValueError, match="is not a file"):
        inception_kwargs(tmp_path / "nowhere.pth")


def test_inception_weights_from_a_file_or_the_hub_cache(monkeypatch, tmp_path):
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"")
    assert inception_kwargs(weights) == {
        "feature_extractor": INCEPTION,
        "feature_extractor_weights_path": str(weights),
    }
    monkeypatch.setattr(inception_module, "inception_cache_path", lambda: weights)
    monkeypatch.setattr(inception_module, "network_reachable", lambda *args, **kwargs: pytest.fail("no network"))
    assert resolve_extractor("inception").kwargs == {"feature_extractor_weights_path": str(weights)}


def test_offline_flag_skips_the_network_check(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(inception_module.socket, "create_connection", lambda *a, **k: pytest.fail("dialled out"))
    assert inception_module.network_reachable() is False


# --------------------------------------------------------------------------------------------------
# Real images, the cache, and FID with its floor
# --------------------------------------------------------------------------------------------------


def image_split(n: int, seed: int) -> Dataset:
    pixels = random_uint8(n, size=6, seed=seed).numpy()[:, 0]
    rows = {"image": [PILImage.fromarray(p, mode="L") for p in pixels]}
    return Dataset.from_dict(rows, features=Features({"image": Image()}))


def test_real_images_cache_name_hashes_the_pixels():
    split = image_split(12, seed=0)
    real = real_images(split, resolution=8, channels=1, label="toy/train")
    assert real.images.shape == (12, 1, 8, 8) and real.images.dtype == torch.uint8
    assert real.cache_name.startswith("skipdiff-toy_train-8px-")
    assert real_images(split, 8, 1, "toy/train").cache_name == real.cache_name
    assert real_images(split, 6, 1, "toy/train").cache_name != real.cache_name
    assert real_images(image_split(12, seed=1), 8, 1, "toy/train").cache_name != real.cache_name


def test_reference_features_are_cached_per_pixels_and_extractor(monkeypatch, tmp_path, extractor):
    real = RealImages(random_uint8(20), "skipdiff-toy-8px-abc")
    first = features_of(real.images, extractor, cache_name=real.cache_name, cache_root=str(tmp_path), cuda=False)
    cached = tmp_path / f"skipdiff-toy-8px-abc-{extractor.get_name()}-features-features.pt"
    assert cached.is_file()
    monkeypatch.setattr(
        torch_fidelity.utils, "get_featuresdict_from_dataset", lambda *a, **k: pytest.fail("recomputed")
    )
    again = features_of(real.images, extractor, cache_name=real.cache_name, cache_root=str(tmp_path), cuda=False)
    assert torch.equal(first, again)


def test_fid_equals_torch_fidelity_calculate_metrics(tmp_path, extractor):
    generated, real = random_uint8(40, seed=5, high=180), random_uint8(50, seed=6)
    name = extractor.get_name()
    ours = features_to_fid(
        features_of(generated, extractor, cuda=False),
        features_of(real, extractor, cache_name="toy-real", cache_root=str(tmp_path), cuda=False),
    )
    theirs = torch_fidelity.calculate_metrics(
        input1=fid_module.UInt8Images(generated),
        input2=fid_module.UInt8Images(real),
        input2_cache_name="toy-real",
        fid=True,
        feature_extractor=name,
        cuda=False,
        save_cpu_ram=True,
        cache_root=str(tmp_path),
        verbose=False,
    )[torch_fidelity.KEY_METRIC_FID]
    assert abs(ours - theirs) <= 1e-4 * abs(ours)  # theirs: float32 means
    assert len(list(tmp_path.glob(f"toy-real-{name}-*"))) == 2  # its stats next to our shared features file


def noisy_copies(real: torch.Tensor, scale: float):
    """A stand-in for a generative model: real images plus seeded noise, as floats in [-1, 1]."""

    def sample(num_samples: int, seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        pick = torch.randint(0, len(real), (num_samples,), generator=generator)
        images = real[pick].float() / 127.5 - 1
        return images + scale * torch.randn(images.shape, generator=generator)

    return sample


def test_fid_with_floor_reports_seeds_floor_and_spread(tmp_path, extractor):
    train = RealImages(random_uint8(60, seed=7), "toy-train")
    test = RealImages(random_uint8(30, seed=8), "toy-test")
    reference, heldout = reference_and_heldout({"train": train, "test": test}, "train")
    report = fid_with_floor(
        noisy_copies(train.images, 0.5),
        reference,
        heldout,
        extractor,
        num_samples=30,
        seeds=[0, 1, 2],
        kid=True,
        prc=True,
        cache_root=str(tmp_path),
        cuda=False,
    )
    assert report.seeds == [0, 1, 2] and len(report.per_seed) == 3
    assert report.kid_subset_size == 30 and report.reference_size == 60 and report.heldout_size == 30
    for key in ("fid", "floor_fid", "kid_mean", "floor_kid_mean", "precision", "recall", "floor_recall"):
        assert report.summary[key]["std"] is not None, key
    assert report.summary["floor_fid"]["std"] == 0.0  # the held-out split is exactly 30 images
    assert report.summary["fid"]["std"] > 0
    assert report.summary["fid"]["mean"] > report.summary["floor_fid"]["mean"]
    assert "FID" in report.format() and report.to_dict()["extractor"] == extractor.get_name()
    assert sorted(p.name.split("-skipdiff")[0] for p in tmp_path.glob("*.pt")) == ["toy-test", "toy-train"]


def test_fid_with_floor_rejects_bad_requests(tmp_path, extractor):
    real = RealImages(random_uint8(20), "toy")
    sample = noisy_copies(real.images, 0.1)
    run = dict(extractor=extractor, cuda=False, cache_root=str(tmp_path))
    with pytest.raises(ValueError, match="num_samples >= 2"):
        fid_with_floor(sample, real, real, num_samples=1, **run)
    with pytest.raises(ValueError, match="held-out.*reference='test'"):
        fid_with_floor(sample, real, real, num_samples=21, **run)
    with pytest.raises(ValueError, match="distinct seeds"):
        fid_with_floor(sample, real, real, num_samples=10, seeds=[1, 1], **run)
    with pytest.raises(ValueError, match="kid_subset_size"):
        fid_with_floor(sample, real, real, num_samples=10, kid=True, kid_subset_size=11, **run)
    with pytest.raises(ValueError, match="expected \\(10, 1, 8, 8\\)"):
        fid_with_floor(lambda n, s: torch.zeros(n, 1, 4, 4), real, real, num_samples=10, **run)
    with pytest.raises(ValueError, match="reference must be one of"):
        reference_and_heldout({"train": real, "test": real}, "val")


# --------------------------------------------------------------------------------------------------
# The digits extractor (trains for real, ~10 s)
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_digits_extractor_trains_caches_and_registers(monkeypatch, tmp_path):
    digits = DataOptions(dataset="digits", resolution=16)
    spec = resolve_extractor("digits", data=digits, cache_dir=tmp_path)
    folder = domain_module.extractor_dir(digits, 0, tmp_path)
    info = extractors_module.extractor_info(folder)
    assert info["test_accuracy"] >= 0.95
    assert spec.name == info["name"] and spec.name.startswith("skipdiff-digits16-")
    monkeypatch.setattr(domain_module, "train_domain_extractor", lambda *a, **k: pytest.fail("retrained"))
    assert resolve_extractor("digits", data=digits, cache_dir=tmp_path) == spec  # the cached one
    assert resolve_extractor("auto", data=digits, cache_dir=tmp_path) == spec  # auto: the set's own extractor
    assert resolve_extractor(str(folder)) == spec  # the same weights by path


def test_fid_warns_on_too_few_reference_images_and_on_a_channel_mismatch(tmp_path, extractor):
    """Issue 31: an FID on 3 reference images, and colour samples scored by a grey extractor, said nothing."""
    import warnings

    run = dict(cuda=False, cache_root=str(tmp_path), num_samples=10, seeds=[0])
    few = RealImages(random_uint8(20, seed=1), "toy-few")
    with pytest.warns(UserWarning, match=r"FID against 20 reference images \(toy-few\), fewer than the 500"):
        fid_with_floor(noisy_copies(few.images, 0.1), few, few, extractor, **run)
    many = RealImages(random_uint8(fid_module.MIN_FID_REFERENCE_IMAGES, seed=2), "toy-many")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # enough images, matching channels: no warning
        fid_with_floor(noisy_copies(many.images, 0.1), many, many, extractor, **run)
    colour = RealImages(random_uint8(fid_module.MIN_FID_REFERENCE_IMAGES, channels=3, seed=3), "toy-colour")
    with pytest.warns(UserWarning, match="3-channel images with the 1-channel feature extractor .*reduced to grey"):
        fid_with_floor(noisy_copies(colour.images, 0.1), colour, colour, extractor, **run)
