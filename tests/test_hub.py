"""Pushing a run to the Hub, with the Hub client replaced by a fake that records every call.

A tiny training run with ``--push_to_hub`` must create the repo before it trains, upload the run
folder at each checkpoint and at the end without checkpoints, logs or hidden files, and upload a
model card that describes the model (metadata, skip table, settings) without the token.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers.unet_runs import run_train_unet, tiny_args
from huggingface_hub.utils import filter_repo_objects

from skipdiff.training import hub

TOKEN = "hf_fake_token_for_tests_1234567890"
SKIPS = "scalelong:kappa=0.5"
SCALELONG_GATES = ["scale:factor=0.125", "scale:factor=0.25", "scale:factor=0.5", "scale:factor=1"]  # 4 skips


class FakeHfApi:
    """Stands in for ``huggingface_hub.HfApi``: records calls, and what ``upload_folder`` would send."""

    calls: list[dict] = []
    output_dir: Path | None = None
    fail_create: bool = False

    def __init__(self, token=None, **kwargs):
        self.token = token

    def _record(self, name: str, **kwargs) -> dict:
        run = self.output_dir
        call = {"name": name, **kwargs, "stats_exist": bool(run and (run / "stats.jsonl").exists())}
        self.calls.append(call)
        return call

    def whoami(self, token=None):
        self._record("whoami", token=token)
        return {"name": "user"}

    def create_repo(self, repo_id, *, token=None, private=False, exist_ok=False, repo_type=None, **kwargs):
        self._record(
            "create_repo", repo_id=repo_id, token=token, private=private, exist_ok=exist_ok, repo_type=repo_type
        )
        if self.fail_create:
            raise PermissionError("403 Forbidden: you cannot write to this namespace")
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(
        self,
        *,
        repo_id,
        folder_path,
        path_in_repo=None,
        commit_message=None,
        token=None,
        ignore_patterns=None,
        allow_patterns=None,
        **kwargs,
    ):
        folder = Path(folder_path)
        present = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        # The selection huggingface_hub itself applies to upload_folder's files.
        sent = list(filter_repo_objects(present, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        contents = {name: (folder / name).read_bytes() for name in sent}
        self._record(
            "upload_folder",
            repo_id=repo_id,
            path_in_repo=path_in_repo,
            commit_message=commit_message,
            token=token,
            present=present,
            files=sent,
            contents=contents,
        )


def install_fake_hub(patch: pytest.MonkeyPatch, output_dir: Path) -> type[FakeHfApi]:
    patch.setattr(FakeHfApi, "calls", [])
    patch.setattr(FakeHfApi, "output_dir", output_dir)
    patch.setattr(FakeHfApi, "fail_create", False)
    patch.setattr(hub, "HfApi", FakeHfApi)
    return FakeHfApi


@pytest.fixture(scope="module")
def pushed_run(tmp_path_factory) -> tuple[Path, list[dict]]:
    """A tiny run pushed to the fake Hub (checkpoints at steps 2 and 4), with tensorboard logs."""
    out = tmp_path_factory.mktemp("pushed") / "run"
    with pytest.MonkeyPatch.context() as patch:
        fake = install_fake_hub(patch, out)
        run_train_unet(
            tiny_args(
                out,
                "--skips",
                SKIPS,
                "--push_to_hub",
                "--hub_model_id",
                "user/test",
                "--hub_token",
                TOKEN,
                "--checkpointing_steps",
                "2",
                "--max_train_steps",
                "4",
                "--report_to",
                "tensorboard",
            )
        )
        return out, fake.calls


PIPELINE_FILES = {
    "model_index.json",
    "scheduler/scheduler_config.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "unet_raw/config.json",
    "unet_raw/diffusion_pytorch_model.safetensors",
    "stats.jsonl",
    "training_options.json",
    # the pipeline's code, for diffusers' trust_remote_code (skipdiff/export.py)
    "skipdiff_pipeline.py",
    "unet/skipdiff_unet.py",
}


@pytest.mark.slow
def test_the_repo_is_created_before_training_and_the_run_uploaded_at_checkpoints_and_the_end(pushed_run):
    out, calls = pushed_run
    assert [c["name"] for c in calls] == ["whoami", "create_repo", "upload_folder", "upload_folder", "upload_folder"]
    whoami, create = calls[0], calls[1]
    assert not whoami["stats_exist"] and not create["stats_exist"]  # before the first training step
    assert {k: create[k] for k in ("repo_id", "token", "private", "exist_ok", "repo_type")} == {
        "repo_id": "user/test",
        "token": TOKEN,
        "private": False,
        "exist_ok": True,
        "repo_type": "model",
    }
    uploads = calls[2:]
    assert [u["commit_message"] for u in uploads] == [
        "checkpoint at step 2",
        "checkpoint at step 4",
        "final model after 4 steps",
    ]
    assert all(u["repo_id"] == "user/test" and u["token"] == TOKEN and u["path_in_repo"] is None for u in uploads)

    # Exactly the pipeline and the run's records: no checkpoints, tensorboard logs or hidden files,
    # although the folder holds them.
    assert set(uploads[0]["files"]) == PIPELINE_FILES | {"README.md"}  # each checkpoint comes with its model card
    assert set(uploads[1]["files"]) == PIPELINE_FILES | {"README.md"}
    assert set(uploads[2]["files"]) == PIPELINE_FILES | {"README.md", "train_metrics.json", "samples/step-000004.png"}
    for upload in uploads:
        present = upload["present"]
        assert any(p.startswith("checkpoint-2/") for p in present) and any(p.startswith("logs/") for p in present)
        assert not [f for f in upload["files"] if f.startswith(("checkpoint-", "logs/", ".")) or "/." in f]
    assert json.loads(uploads[0]["contents"]["stats.jsonl"].splitlines()[-1])["step"] == 2
    assert json.loads(uploads[2]["contents"]["train_metrics.json"])["steps"] == 4


@pytest.mark.slow
def test_the_model_card_describes_the_model_and_its_training(pushed_run):
    out, calls = pushed_run
    card = calls[-1]["contents"]["README.md"].decode()
    assert card == (out / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    metadata = yaml.safe_load(front)
    # library_name: the library that defines the classes (diffusers' Hub snippet would fail: it lacks
    # trust_remote_code); "datasets" holds Hub dataset ids only, and the built-in digits are none.
    assert metadata["library_name"] == "skipdiff"
    assert {"skipdiff", "diffusers", "skip-connections", "custom_code"} <= set(metadata["tags"])
    assert "datasets" not in metadata and "Trained on `digits`" in body
    assert metadata["pipeline_tag"] == "unconditional-image-generation"
    assert "# user/test" in body and 'SkipDiffPipeline.from_pretrained("user/test")' in body
    assert 'DiffusionPipeline.from_pretrained("user/test", trust_remote_code=True)' in body

    rows = [line for line in body.splitlines() if line.startswith("| ") and "up_blocks." in line]
    assert len(rows) == 4  # one per skip of the tiny UNet
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    assert [c[0] for c in cells] == ["0", "1", "2", "3"]
    assert [c[1] for c in cells] == [
        "up_blocks.0.resnets.0",
        "up_blocks.0.resnets.1",
        "up_blocks.1.resnets.0",
        "up_blocks.1.resnets.1",
    ]
    assert [c[-1] for c in cells] == [f"`{g}`" for g in SCALELONG_GATES]
    for setting in (
        "| `skips` | `scalelong:kappa=0.5` |",
        "| `max_train_steps` | `4` |",
        "| `model` | `tiny` |",
        "| `hub_model_id` | `user/test` |",
        "| `checkpointing_steps` | `2` |",
    ):
        assert setting in body
    assert "| steps | 4 |" in body and "![samples](samples/step-000004.png)" in body
    assert TOKEN not in card and "hub_token" not in card


@pytest.mark.slow
def test_no_uploaded_file_holds_the_token(pushed_run):
    _, calls = pushed_run
    leaking = sorted(
        {
            name
            for c in calls
            if c["name"] == "upload_folder"
            for name, data in c["contents"].items()
            if TOKEN.encode() in data
        }
    )
    assert leaking == []


def test_a_repo_that_cannot_be_created_fails_before_training(tmp_path, monkeypatch):
    out = tmp_path / "run"
    fake_hub = install_fake_hub(monkeypatch, out)
    fake_hub.fail_create = True
    with pytest.raises(RuntimeError, match=r"cannot create or write the Hub repo 'user/test' as 'user': 403"):
        run_train_unet(tiny_args(out, "--push_to_hub", "--hub_model_id", "user/test"))
    assert [c["name"] for c in fake_hub.calls] == ["whoami", "create_repo"]
    assert not (out / "stats.jsonl").exists()


def test_pushing_offline_names_hf_hub_offline_and_leaves_no_output_folder(tmp_path, monkeypatch):
    """Issue 31: the offline push error did not mention HF_HUB_OFFLINE, suggested the old `huggingface-cli login`
    and left an empty output folder."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as the tests run anyway; the real client, which then refuses
    out = tmp_path / "run"
    with pytest.raises(
        hub.HubAccessError,
        match=r"cannot push to the Hub repo 'user/test': no valid token or no "
        r"network: HF_HUB_OFFLINE is set.*Unset it",
    ) as err:
        run_train_unet(tiny_args(out, "--push_to_hub", "--hub_model_id", "user/test"))
    assert "huggingface-cli" not in str(err.value)
    assert not out.exists()
    monkeypatch.setattr(hub, "hub_offline", lambda: False)  # online, but no token: today's login command

    class NoToken:
        def whoami(self, token=None):
            raise OSError("Token is required to call the /whoami-v2 endpoint, but no token found.")

    with pytest.raises(
        hub.HubAccessError,
        match=r"no valid token or no network \(OSError: Token is required.*Log in "
        r"with `hf auth login`",
    ) as err:
        hub.prepare_repo("user/test", None, False, api=NoToken())
    assert "huggingface-cli" not in str(err.value)


@pytest.mark.slow
def test_no_file_the_run_wrote_holds_the_token(pushed_run):
    """Uploaded or not: training_options.json, the checkpoints' state, the tensorboard config, the card."""
    out, _ = pushed_run
    files = [path for path in out.rglob("*") if path.is_file()]
    assert any(p.parent.name.startswith("checkpoint-") for p in files) and any("logs" in p.parts for p in files)
    assert [str(p.relative_to(out)) for p in files if TOKEN.encode() in p.read_bytes()] == []
