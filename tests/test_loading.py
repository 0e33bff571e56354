"""A run folder loads with every loader a diffusers user would try, and its model card says how.

* ``DiffusionPipeline.from_pretrained(run, trust_remote_code=True)`` and ``DDPMPipeline`` (likewise) in a
  subprocess where ``import skipdiff`` fails: the code the folder carries samples the same images as
  ``SkipDiffPipeline.from_pretrained(run)``; without ``trust_remote_code`` both refuse, naming it;
* ``SkipDiffPipeline.from_pretrained``: EMA weights by default, raw ones on request, older folders
  (``unet_ema/``), Hub repos (download faked), and never the folder's code;
* plain ``UNet2DModel.from_pretrained``: the same model when every skip is kept, else an error that
  names ``SkipUNet2DModel``;
* the generated module (:mod:`skipdiff.export`) and the model card (parsed by huggingface_hub).

Runs are the tiny ones of ``tests/helpers/unet_runs.py``: one in pixel space with gated skips, one in
the latent space of a small random VAE.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDPMPipeline, DiffusionPipeline, UNet2DModel
from helpers.unet_runs import EMA_WEIGHTS, UNET_WEIGHTS, run_train_unet, tensors, tiny_args
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.utils import filter_repo_objects

from skipdiff import SkipUNet2DModel
from skipdiff import pipeline as pipeline_module
from skipdiff.eval.run import load_run
from skipdiff.export import bundle_source, export_pipeline
from skipdiff.pipeline import SkipDiffPipeline
from skipdiff.presets import vae_config
from skipdiff.skips.unet import PLAIN_LOADER_NOTE
from skipdiff.training import hub

GATED = "keep,scale:0.5,learned,zero"  # one entry per skip of the tiny UNet
GATED_RESOLVED = [{"mode": "keep"}, {"mode": "scale", "factor": 0.5}, {"mode": "learned"}, {"mode": "zero"}]
SAMPLE = dict(batch_size=2, num_inference_steps=2, sampler="ddim", output_type="np", show_progress=False)
SUBPROCESS_TIMEOUT = 420


@pytest.fixture(scope="module")
def pixel_run(tmp_path_factory) -> Path:
    """Pixel space, gated skips, EMA on (unet/ = EMA weights, unet_raw/ = raw ones)."""
    out = tmp_path_factory.mktemp("pixel") / "run"
    run_train_unet(tiny_args(out, "--skips", GATED))
    return out


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory) -> Path:
    """The latent space of a random 1-channel VAE (8x8 images -> 4x4x4 latents), all skips kept."""
    root = tmp_path_factory.mktemp("latent")
    torch.manual_seed(0)
    AutoencoderKL(**vae_config("tiny", 1)).save_pretrained(root / "vae")
    run_train_unet(tiny_args(root / "run", "--vae", str(root / "vae")))
    return root / "run"


def sample(pipeline, seed: int = 0) -> np.ndarray:
    return pipeline(generator=torch.Generator().manual_seed(seed), **SAMPLE).images


def plain_config(model) -> dict:
    """The model's config as JSON would hold it, without diffusers' private entries."""
    return json.loads(json.dumps({k: v for k, v in model.config.items() if not k.startswith("_")}))


def same_weights(model: torch.nn.Module, path: Path) -> bool:
    saved, current = tensors(path), model.state_dict()
    return sorted(saved) == sorted(current) and all(torch.equal(saved[k], current[k]) for k in saved)


# --------------------------------------------------------------------------------------------------
# diffusers alone: a subprocess in which skipdiff cannot be imported
# --------------------------------------------------------------------------------------------------

# Runs with cwd = the runs' parent folder; argv[1]: JSON {"runs": [...], "out": folder, "snippet": code}.
WITHOUT_SKIPDIFF = textwrap.dedent(
    """
    import json, sys

    class NoSkipdiff:  # the editable install would make skipdiff importable: refuse it
        def find_spec(self, name, path=None, target=None):
            if name == "skipdiff" or name.startswith("skipdiff."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")

    sys.meta_path.insert(0, NoSkipdiff())
    import numpy as np
    import torch
    from diffusers import DDPMPipeline, DiffusionPipeline, UNet2DModel

    args = json.loads(sys.argv[1])
    report = {"skipdiff_importable": True}
    try:
        import skipdiff  # noqa: F401
    except ImportError:
        report["skipdiff_importable"] = False

    def draw(pipe):
        return pipe(batch_size=2, num_inference_steps=2, sampler="ddim", output_type="np", show_progress=False,
                    generator=torch.Generator().manual_seed(0)).images

    def error(call):
        try:
            call()
        except Exception as err:  # noqa: BLE001
            return f"{type(err).__name__}: {err}"
        return None

    arrays = {}
    for run in args["runs"]:
        pipe = DiffusionPipeline.from_pretrained(run, trust_remote_code=True)
        ddpm = DDPMPipeline.from_pretrained(run, trust_remote_code=True)
        arrays[f"{run}/diffusion"], arrays[f"{run}/ddpm"] = draw(pipe), draw(ddpm)
        entry = {"pipeline": f"{type(pipe).__module__}.{type(pipe).__name__}",
                 "unet": f"{type(pipe.unet).__module__}.{type(pipe.unet).__name__}",
                 "ddpm": type(ddpm).__name__, "skips": pipe.unet.skip_router.entries,
                 "no_trust": error(lambda: DiffusionPipeline.from_pretrained(run)),
                 "ddpm_no_trust": error(lambda: DDPMPipeline.from_pretrained(run)),
                 "plain_unet": error(lambda: UNet2DModel.from_pretrained(run, subfolder="unet"))}
        raw = type(pipe.unet).from_pretrained(run, subfolder="unet_raw")
        pipe.unet = raw
        arrays[f"{run}/raw"] = draw(pipe)
        report[run] = entry
    exec(args["snippet"], {})  # the model card's own diffusers snippet, as written
    report["snippet_ran"] = True
    report["modules"] = sorted(m for m in sys.modules if m.split(".")[0] == "skipdiff")
    np.savez(f"{args['out']}/images.npz", **{k.replace("/", "|"): v for k, v in arrays.items()})
    with open(f"{args['out']}/report.json", "w") as f:
        json.dump(report, f)
    """
)


def card_snippets(run: Path) -> list[str]:
    """The Python code blocks of a run's model card."""
    return re.findall(r"```python\n(.*?)```", (run / "README.md").read_text(), flags=re.S)


@pytest.fixture(scope="module")
def without_skipdiff(pixel_run, latent_run, tmp_path_factory) -> tuple[dict, dict]:
    """What diffusers alone does with both runs: ``(report, images)``."""
    work = tmp_path_factory.mktemp("diffusers-only")
    for name, run in (("pixel", pixel_run), ("latent", latent_run)):
        shutil.copytree(run, work / name, ignore=shutil.ignore_patterns("checkpoint-*", "logs"))
    # The card of the pixel run loads "run" (its folder's name): run it where that name is the run.
    shutil.copytree(pixel_run, work / "run", ignore=shutil.ignore_patterns("checkpoint-*", "logs"))
    snippet = card_snippets(pixel_run)[0]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": "",
        "HF_MODULES_CACHE": str(work / "modules"),
    }
    args = json.dumps({"runs": ["pixel", "latent"], "out": str(work), "snippet": snippet})
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_SKIPDIFF, args],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    images = {k.replace("|", "/"): v for k, v in np.load(work / "images.npz").items()}
    return json.loads((work / "report.json").read_text()), images


@pytest.mark.slow
def test_diffusers_alone_loads_the_run_with_its_bundled_code(without_skipdiff):
    report, _ = without_skipdiff
    assert report["skipdiff_importable"] is False and report["modules"] == []
    for run in ("pixel", "latent"):
        assert report[run]["pipeline"] == "diffusers_modules.local.skipdiff_pipeline.SkipDiffPipeline"
        assert report[run]["unet"] == "diffusers_modules.local.skipdiff_unet.SkipUNet2DModel"
        assert report[run]["ddpm"] == "SkipDiffPipeline"  # DDPMPipeline.from_pretrained gets the folder's pipeline
    assert report["pixel"]["skips"] == GATED_RESOLVED
    assert report["latent"]["skips"] == [{"mode": "keep"}] * 4


@pytest.mark.slow
def test_diffusers_alone_samples_what_skipdiff_samples(without_skipdiff, pixel_run, latent_run):
    _, images = without_skipdiff
    for name, run in (("pixel", pixel_run), ("latent", latent_run)):
        expected = sample(SkipDiffPipeline.from_pretrained(run))
        # Images, not latents: the latent run's VAE decodes 4x4x4 latents to 8x8 grey pixels.
        assert expected.shape == (2, 8, 8, 1)
        np.testing.assert_allclose(images[f"{name}/diffusion"], expected, rtol=0, atol=1e-6)
        np.testing.assert_allclose(images[f"{name}/ddpm"], expected, rtol=0, atol=1e-6)
        raw = sample(SkipDiffPipeline.from_pretrained(run, use_ema=False))
        np.testing.assert_allclose(images[f"{name}/raw"], raw, rtol=0, atol=1e-6)
        assert np.abs(raw - expected).max() > 1e-4  # EMA and raw weights are different models


@pytest.mark.slow
def test_without_trust_remote_code_every_loader_refuses_and_says_why(without_skipdiff, pixel_run):
    report, _ = without_skipdiff
    for run in ("pixel", "latent"):
        for loader in ("no_trust", "ddpm_no_trust"):
            assert report[run][loader].startswith("ValueError") and "trust_remote_code=True" in report[run][loader]
    assert "SkipUNet2DModel or trust_remote_code=True" in report["pixel"]["plain_unet"]  # gated skips
    assert report["latent"]["plain_unet"] is None  # every skip kept: UNet2DModel loads it (the same model)
    # With skipdiff imported, diffusers' loaders refuse the same way (no latents returned as images).
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        DDPMPipeline.from_pretrained(pixel_run)
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        DiffusionPipeline.from_pretrained(pixel_run)


@pytest.mark.slow
def test_the_model_cards_diffusers_snippet_runs_with_diffusers_alone(without_skipdiff):
    report, _ = without_skipdiff
    assert report["snippet_ran"] is True


# --------------------------------------------------------------------------------------------------
# SkipDiffPipeline.from_pretrained: skipdiff's own code
# --------------------------------------------------------------------------------------------------


def test_skipdiff_samples_with_the_ema_weights_by_default_and_the_raw_ones_on_request(pixel_run):
    pipe = SkipDiffPipeline.from_pretrained(pixel_run)
    assert type(pipe) is SkipDiffPipeline and type(pipe.unet) is SkipUNet2DModel
    assert pipe.unet.skip_router.entries == GATED_RESOLVED
    assert same_weights(pipe.unet, pixel_run / EMA_WEIGHTS) and not same_weights(pipe.unet, pixel_run / UNET_WEIGHTS)
    raw = SkipDiffPipeline.from_pretrained(pixel_run, use_ema=False)
    assert same_weights(raw.unet, pixel_run / UNET_WEIGHTS)
    pipeline, _, used_ema = load_run(str(pixel_run))  # evaluation scores the same weights
    assert used_ema and same_weights(pipeline.unet, pixel_run / EMA_WEIGHTS)


def test_skipdiff_runs_nothing_from_the_folder(pixel_run, tmp_path):
    run = Path(shutil.copytree(pixel_run, tmp_path / "run", ignore=shutil.ignore_patterns("checkpoint-*")))
    for code in (run / "skipdiff_pipeline.py", run / "unet" / "skipdiff_unet.py"):
        code.write_text("raise RuntimeError('the folder code ran')\n")
    pipe = SkipDiffPipeline.from_pretrained(run)
    assert type(pipe).__module__ == "skipdiff.pipeline" and type(pipe.unet).__module__ == "skipdiff.skips.unet"
    np.testing.assert_array_equal(sample(pipe), sample(SkipDiffPipeline.from_pretrained(pixel_run)))


def old_layout(run: Path, folder: Path) -> Path:
    """``run`` as folders were saved before ``unet/`` held the EMA weights: ``unet/`` raw, ``unet_ema/``
    EMA, a plain ``model_index.json`` and no bundled code."""
    shutil.copytree(run, folder, ignore=shutil.ignore_patterns("checkpoint-*", "*.py"))
    (folder / "unet").rename(folder / "unet_ema")
    (folder / "unet_raw").rename(folder / "unet")
    index = json.loads((folder / "model_index.json").read_text())
    index.update(_class_name="SkipDiffPipeline", unet=["skipdiff.unet", "SkipUNet2DModel"])
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def test_older_run_folders_still_load_with_their_ema_weights(pixel_run, tmp_path):
    old = old_layout(pixel_run, tmp_path / "old")
    pipe = SkipDiffPipeline.from_pretrained(old)
    assert same_weights(pipe.unet, old / "unet_ema" / "diffusion_pytorch_model.safetensors")
    assert same_weights(SkipDiffPipeline.from_pretrained(old, use_ema=False).unet, pixel_run / UNET_WEIGHTS)
    pipeline, _, used_ema = load_run(str(old), use_ema=False)
    assert not used_ema and same_weights(pipeline.unet, pixel_run / UNET_WEIGHTS)


@pytest.mark.parametrize("use_ema", [True, False])
def test_a_hub_repo_is_downloaded_without_its_code_and_loads(pixel_run, tmp_path, monkeypatch, use_ema):
    """``snapshot_download`` faked: it serves the run's files that match the requested patterns."""
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, ignore_patterns=None, **kwargs):
        calls.append({"repo_id": repo_id, **kwargs})
        snapshot = tmp_path / "snapshot"
        files = sorted(p.relative_to(pixel_run).as_posix() for p in pixel_run.rglob("*") if p.is_file())
        # The selection huggingface_hub itself applies to a snapshot's files.
        for name in filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns):
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(pixel_run / name, snapshot / name)
        return str(snapshot)

    monkeypatch.setattr(pipeline_module, "snapshot_download", fake_snapshot_download)
    pipe = SkipDiffPipeline.from_pretrained("user/run", use_ema=use_ema, revision="v1")
    assert [(c["repo_id"], c["revision"]) for c in calls] == [("user/run", "v1")]
    fetched = {
        p.relative_to(tmp_path / "snapshot").as_posix() for p in (tmp_path / "snapshot").rglob("*") if p.is_file()
    }
    assert not [f for f in fetched if f.endswith(".py") or f.startswith(("samples/", "stats"))]
    assert any(f.startswith("unet_raw/") for f in fetched) == (not use_ema)
    assert same_weights(pipe.unet, pixel_run / (EMA_WEIGHTS if use_ema else UNET_WEIGHTS))
    assert pipe.name_or_path == "user/run"


# --------------------------------------------------------------------------------------------------
# diffusers' plain UNet2DModel on a SkipUNet2DModel checkpoint
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def diffusers_log():
    """The messages diffusers logs (at any level) inside the block, as a list filled while it runs."""
    import logging

    messages: list[str] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("diffusers")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_plain_unet2dmodel_refuses_the_runs_gated_unet_by_name(pixel_run):
    with pytest.raises(ValueError, match=re.escape(f"UpBlock2D{PLAIN_LOADER_NOTE} does not exist")):
        UNet2DModel.from_pretrained(pixel_run, subfolder="unet")


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(skips="zero"),
        dict(skips="keep,keep,keep,remove"),
        dict(skips="scale:0.5"),
        dict(skips="learned"),
        dict(skips="markov"),
        dict(residual_shortcuts={"mid": False}),
    ],
    ids=["zero", "remove", "scale", "learned", "markov", "no-mid-shortcut"],
)
def test_plain_unet2dmodel_refuses_every_checkpoint_it_would_load_wrongly(tiny_config, tmp_path, kwargs):
    model = SkipUNet2DModel(**tiny_config, **kwargs).eval()
    assert not model.is_plain_unet()
    model.save_pretrained(tmp_path)
    with diffusers_log() as log, pytest.raises(ValueError, match=re.escape(f"{PLAIN_LOADER_NOTE} does not exist")):
        UNet2DModel.from_pretrained(tmp_path)
    # Issue 31: no "... were passed to UNet2DModel, but are not expected and will be ignored" before the refusal.
    assert not [line for line in log if "will be ignored" in line or "not expected" in line], log
    # The note is only in the file: skipdiff reads it back to the same model and the same config.
    loaded = SkipUNet2DModel.from_pretrained(tmp_path)
    assert loaded.config.up_block_types == model.config.up_block_types == tuple(tiny_config["up_block_types"])
    assert plain_config(loaded) == plain_config(model)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 700])
    torch.testing.assert_close(loaded(x, t).sample, model(x, t).sample, rtol=0, atol=0)


def test_plain_unet2dmodel_loads_a_checkpoint_whose_skips_are_all_kept_as_the_same_model(tiny_config, tmp_path):
    model = SkipUNet2DModel(**tiny_config, skips="full").eval()
    assert model.is_plain_unet()
    model.save_pretrained(tmp_path)
    plain = UNet2DModel.from_pretrained(tmp_path)
    assert type(plain) is UNet2DModel and sorted(plain.state_dict()) == sorted(model.state_dict())
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 700])
    torch.testing.assert_close(plain(x, t).sample, model(x, t).sample, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# The bundled module
# --------------------------------------------------------------------------------------------------


def test_the_folder_holds_the_code_generated_from_the_installed_sources(pixel_run):
    pipeline_code = (pixel_run / "skipdiff_pipeline.py").read_text()
    assert pipeline_code == bundle_source("pipeline")
    assert (pixel_run / "unet" / "skipdiff_unet.py").read_text() == bundle_source("skips/unet")
    for module in (
        "seeding",
        "config",
        "skips/gate",
        "skips/spec",
        "skips/markov",
        "skips/router",
        "skips/unet",
        "encoders",
        "pipeline",
    ):
        assert f"# skipdiff/{module}.py\n" in pipeline_code
    assert json.loads((pixel_run / "model_index.json").read_text())["_class_name"] == [
        "skipdiff_pipeline",
        "SkipDiffPipeline",
    ]


def write_package(folder: Path, modules: dict[str, str]) -> Path:
    folder.mkdir()
    for name, code in modules.items():
        (folder / f"{name}.py").write_text(textwrap.dedent(code))
    return folder


def test_a_bundle_keeps_aliases_and_nested_imports_working(tmp_path, monkeypatch):
    from skipdiff import export

    package = write_package(
        tmp_path / "pkg",
        {
            "base": "def double(x):\n    return 2 * x\n",
            "top": """
            from __future__ import annotations

            from .base import double as twice


            def quadruple(x):
                return twice(twice(x))


            def lazy(x):
                from .base import double
                return double(x) + 1
            """,
        },
    )
    monkeypatch.setattr(export, "PACKAGE_DIR", package)
    namespace: dict = {}
    exec(compile(export.bundle_source("top"), "bundle", "exec"), namespace)
    assert namespace["quadruple"](3) == 12 and namespace["lazy"](3) == 7


@pytest.mark.parametrize(
    ("modules", "message"),
    [
        (
            {
                "a": "from .b import f\n\ndef g():\n    return f()\n",
                "b": "def f():\n    return 1\n\ndef g():\n    return 2\n",
            },
            "'g' is defined in both skipdiff/b.py and skipdiff/a.py",
        ),
        ({"a": "from . import b\n", "b": "x = 1\n"}, r"only `from \.module import name` is supported"),
        ({"a": "from .b import f\n", "b": "from .a import g\n\ndef f():\n    pass\n"}, "circular imports: a -> b -> a"),
        (
            {"a": '"""Example:\n\n    from skipdiff import SkipUNet2DModel\n"""\n'},
            "would make diffusers look for other files",
        ),
        ({"a": "def f():\n    import skipdiff.gates as gates\n    return gates\n"}, "imports skipdiff by name"),
    ],
    ids=["same-name", "module-import", "cycle", "docstring-import", "absolute-import"],
)
def test_a_bundle_that_cannot_work_is_refused_at_export(tmp_path, monkeypatch, modules, message):
    from skipdiff import export

    monkeypatch.setattr(export, "PACKAGE_DIR", write_package(tmp_path / "pkg", modules))
    with pytest.raises(ValueError, match=message):
        export.bundle_source("a")


def test_export_refuses_a_folder_that_is_not_a_skipdiff_pipeline(tmp_path, tiny_config):
    from diffusers import DDPMPipeline as Ddpm
    from diffusers import DDPMScheduler

    Ddpm(unet=UNet2DModel(**tiny_config), scheduler=DDPMScheduler()).save_pretrained(tmp_path)
    from skipdiff.export import write_remote_code

    with pytest.raises(ValueError, match="holds a 'DDPMPipeline', not a SkipDiffPipeline"):
        write_remote_code(tmp_path, {})
    assert not (tmp_path / "skipdiff_pipeline.py").exists()


def test_export_writes_a_pipeline_without_ema_as_one_set_of_weights(tiny_config, tmp_path):
    from diffusers import DDPMScheduler

    unet = SkipUNet2DModel(**tiny_config, skips="zero")
    folder = export_pipeline(SkipDiffPipeline(unet=unet, scheduler=DDPMScheduler()), tmp_path / "out")
    assert sorted(p.name for p in folder.iterdir()) == ["model_index.json", "scheduler", "skipdiff_pipeline.py", "unet"]
    assert same_weights(SkipDiffPipeline.from_pretrained(folder).unet, folder / EMA_WEIGHTS)  # unet/: the only weights


# --------------------------------------------------------------------------------------------------
# The model card
# --------------------------------------------------------------------------------------------------


def test_the_model_card_is_valid_hub_metadata(pixel_run):
    card = ModelCard.load(pixel_run / "README.md")  # huggingface_hub's own parser
    assert card.data.to_dict() == {
        "library_name": "skipdiff",
        "license": "apache-2.0",
        "pipeline_tag": "unconditional-image-generation",
        "tags": ["skipdiff", "diffusers", "custom_code", "skip-connections", "unconditional-image-generation"],
    }
    # The metadata round-trips: what huggingface_hub writes back is what it read.
    assert ModelCard(card.content).data.to_dict() == card.data.to_dict()
    assert ModelCardData(**card.data.to_dict()).to_yaml() == card.data.to_yaml()


def test_the_model_card_says_how_to_load_and_install_without_placeholders(pixel_run):
    text = (pixel_run / "README.md").read_text()
    repo = pixel_run.name
    assert "`SkipDiffPipeline`" in text and "`SkipUNet2DModel`" in text
    assert f'DiffusionPipeline.from_pretrained("{repo}", trust_remote_code=True)' in text
    assert f'SkipDiffPipeline.from_pretrained("{repo}")' in text
    assert f'SkipDiffPipeline.from_pretrained("{repo}", use_ema=False)' in text
    assert "a clone of the skipdiff repository (`pip install -e .`" in text
    assert "pip install skipdiff" not in text and "github.com" not in text and "](https://github.com/)" not in text
    assert "trust_remote_code" in card_snippets(pixel_run)[0]


def test_the_model_cards_skipdiff_snippet_runs(pixel_run, monkeypatch):
    monkeypatch.chdir(pixel_run.parent)  # the card loads the run by its folder's name
    namespace: dict = {}
    exec(card_snippets(pixel_run)[1], namespace)
    assert same_weights(namespace["pipe"].unet, pixel_run / EMA_WEIGHTS)


def test_the_model_card_names_the_repository_when_skipdiff_knows_it(monkeypatch):
    class Metadata:
        def get_all(self, key):
            return ["Documentation, https://docs.example.org", "Repository, https://code.example.org/skipdiff"]

    monkeypatch.setattr(hub.importlib.metadata, "metadata", lambda name: Metadata())
    card = hub.model_card(
        "user/x",
        {"dataset_name": "user/images", "class_conditional": True},
        [
            {
                "gate": "keep",
                "index": 0,
                "up_block": 0,
                "layer": 0,
                "source": "conv_in",
                "resolution": 8,
                "skip_channels": 4,
            }
        ],
    )
    assert "install it from its repository, <https://code.example.org/skipdiff>" in card.text
    assert card.data.datasets == ["user/images"] and card.data.pipeline_tag is None
    assert "class_labels=labels" in card.text and "loads the same model" in card.text  # all skips kept
