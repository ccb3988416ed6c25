"""hub.py: push_to_hub and base-model info, offline: the Hub is replaced by a recording fake."""

import hashlib
from pathlib import Path
from types import SimpleNamespace

import httpx2
import pytest
from huggingface_hub.errors import HfHubHTTPError

from optimum_isoprune.card import save_model_card
from optimum_isoprune.hub import HubPublishError, base_model_info_from_hub, push_to_hub, validate_repo_id
from test_card import make_report

# ----------------------------------------------------------------------------------------- push


class FakeApi:
    """Records the calls push_to_hub makes; `fail` maps a method name to the exception it raises."""

    def __init__(self, fail=None):
        self.calls = []
        self.fail = fail or {}

    def _record(self, name, *args, **kwargs):
        self.calls.append((name, args, kwargs))
        if name in self.fail:
            raise self.fail[name]

    def create_repo(self, repo_id, **kwargs):
        self._record("create_repo", repo_id, **kwargs)
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, **kwargs):
        self._record("create_branch", repo_id, **kwargs)

    def create_commit(self, repo_id, operations, **kwargs):
        operations = list(operations)
        self._record("create_commit", repo_id, operations, **kwargs)
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/abc", oid="abc", pr_url=None)


@pytest.fixture
def saved_folder(tmp_path):
    folder = tmp_path / "pruned"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "isopruned_vit"}')
    (folder / "model.safetensors").write_bytes(b"\1" * 1000)
    (folder / "preprocessor_config.json").write_text("{}")
    (folder / "modeling_isopruned_vit.py").write_text("# remote code\n")
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "modeling_isopruned_vit.cpython-311.pyc").write_bytes(b"\0")
    make_report().save_pretrained(folder)
    (folder / "pruning_config.json").write_text('{"target_macs": 1e9}')
    save_model_card(folder, repo_id="me/deit-small-iso-1G")
    return folder


def _snapshot(folder):
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


EXPECTED_FILES = [
    "README.md",
    "config.json",
    "layer_widths.png",
    "model.safetensors",
    "modeling_isopruned_vit.py",
    "preprocessor_config.json",
    "pruning_config.json",
    "pruning_report.json",
]


def test_push_sends_one_commit_with_every_file(saved_folder):
    api = FakeApi()
    commit = push_to_hub(saved_folder, "me/deit-small-iso-1G", private=True, api=api)
    assert commit.oid == "abc"
    assert [c[0] for c in api.calls] == ["create_repo", "create_commit"]
    assert api.calls[0] == ("create_repo", ("me/deit-small-iso-1G",), {"private": True, "exist_ok": True})
    _, (repo_id, operations), kwargs = api.calls[1]
    assert repo_id == "me/deit-small-iso-1G"
    assert sorted(op.path_in_repo for op in operations) == EXPECTED_FILES
    readme = next(op for op in operations if op.path_in_repo == "README.md")
    assert Path(readme.path_or_fileobj).read_text(encoding="utf-8") == (saved_folder / "README.md").read_text(
        encoding="utf-8"
    )
    assert "](layer_widths.png)" in Path(readme.path_or_fileobj).read_text(encoding="utf-8")
    assert kwargs["create_pr"] is False and kwargs["revision"] is None and kwargs["commit_message"]


def test_push_passes_revision_message_and_pr(saved_folder):
    api = FakeApi()
    push_to_hub(saved_folder, "me/x", revision="v1", commit_message="Prune to 1G", create_pr=True, api=api)
    assert [c[0] for c in api.calls] == ["create_repo", "create_branch", "create_commit"]
    assert api.calls[1][2] == {"branch": "v1", "exist_ok": True}
    kwargs = api.calls[2][2]
    assert (kwargs["revision"], kwargs["commit_message"], kwargs["create_pr"]) == ("v1", "Prune to 1G", True)


@pytest.mark.parametrize("repo_id", ["a/b/c", "bad--name", "me/name.git", "", "me/with space", "-lead"])
def test_invalid_repo_id_is_rejected_before_any_call(saved_folder, repo_id):
    api = FakeApi()
    with pytest.raises(ValueError, match="Invalid Hub repo id"):
        push_to_hub(saved_folder, repo_id, api=api)
    assert api.calls == []
    with pytest.raises(ValueError, match="namespace/name"):
        validate_repo_id(repo_id)


def test_missing_or_empty_folder_is_rejected_before_any_call(tmp_path):
    api = FakeApi()
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        push_to_hub(tmp_path / "nope", "me/x", api=api)
    with pytest.raises(ValueError, match="empty"):
        push_to_hub(tmp_path, "me/x", api=api)
    assert api.calls == []


def _http_error(status):
    request = httpx2.Request("POST", "https://huggingface.co/api/repos/create")
    return HfHubHTTPError(f"{status} Client Error", response=httpx2.Response(status, request=request))


@pytest.mark.parametrize(
    "fail, step",
    [
        ({"create_commit": httpx2.ConnectError("Name or service not known")}, "upload 8 files"),
        ({"create_commit": ConnectionError("connection reset")}, "upload 8 files"),
        ({"create_repo": _http_error(401)}, "create the repo"),
    ],
)
def test_network_or_auth_failure_leaves_folder_intact_and_says_how_to_retry(saved_folder, fail, step):
    before = _snapshot(saved_folder)
    api = FakeApi(fail=fail)
    with pytest.raises(HubPublishError) as info:
        push_to_hub(saved_folder, "me/deit-small-iso-1G", api=api)
    error = info.value
    assert _snapshot(saved_folder) == before
    message = str(error)
    assert step in message
    assert f"optimum-isoprune push {saved_folder} me/deit-small-iso-1G" in message
    assert f"push_to_hub({str(saved_folder)!r}, 'me/deit-small-iso-1G')" in message
    assert error.step == step and error.repo_id == "me/deit-small-iso-1G" and error.folder == str(saved_folder)
    assert isinstance(error.__cause__, type(next(iter(fail.values()))))
    if "create_repo" in fail:
        assert "create_commit" not in [c[0] for c in api.calls]


def test_programming_errors_are_not_disguised_as_hub_errors(saved_folder):
    with pytest.raises(TypeError):
        push_to_hub(saved_folder, "me/x", api=FakeApi(fail={"create_commit": TypeError("bug")}))


# ---------------------------------------------------------------------------- base model info


class FakeInfoApi:
    def __init__(self, info=None, error=None):
        self.info, self.error = info, error

    def model_info(self, repo_id, files_metadata=False):
        if self.error:
            raise self.error
        return self.info


def test_base_model_info_from_hub_reads_card_and_sizes():
    from huggingface_hub import ModelCardData

    info = SimpleNamespace(
        card_data=ModelCardData(
            license="apache-2.0", tags=["vision", "image-classification"], datasets=["imagenet-1k"]
        ),
        pipeline_tag="image-classification",
        siblings=[
            SimpleNamespace(rfilename="model.safetensors", size=88_000_000),
            SimpleNamespace(rfilename="config.json", size=700),
        ],
    )
    got = base_model_info_from_hub("facebook/deit-small-patch16-224", api=FakeInfoApi(info))
    assert got["license"] == "apache-2.0" and got["tags"] == ["vision", "image-classification"]
    assert got["pipeline_tag"] == "image-classification" and got["datasets"] == ["imagenet-1k"]
    assert got["checkpoint_bytes"] == 88_000_000


def test_base_model_info_offline_is_empty():
    assert base_model_info_from_hub("a/b", api=FakeInfoApi(error=httpx2.ConnectError("offline"))) == {}
