"""The pruner's user-facing outputs: a describing config, save/load, card and push, iterative pruning."""

from __future__ import annotations

import os

import pytest
import torch
from huggingface_hub import ModelCard

from models import build, logits
from optimum_isoprune import IsomorphicPruner, IsomorphicPruningConfig, PruningReport, count_macs
from optimum_isoprune.checkpoint import load_pruned_model


class RecordingApi:
    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id))

    def create_commit(self, repo_id, operations, **kwargs):
        self.calls.append(("create_commit", repo_id, sorted(op.path_in_repo for op in operations)))


@pytest.fixture(scope="module")
def pruned_vit():
    pruner = IsomorphicPruner(build("vit"))
    pruned = pruner.prune(IsomorphicPruningConfig(pruning_ratio=0.5, importance="magnitude"))
    return pruner, pruned


def test_returned_config_describes_the_widths(pruned_vit):
    pruner, pruned = pruned_vit
    config = pruned.config
    assert config.layer_num_heads == [layer.attention.num_attention_heads for layer in pruned.vit.layers]
    assert config.layer_intermediate_sizes == [layer.mlp.fc1.out_features for layer in pruned.vit.layers]


def test_save_pretrained_writes_a_complete_loadable_folder(pruned_vit, tmp_path):
    pruner, pruned = pruned_vit
    pruner.save_pretrained(tmp_path)
    for name in ("config.json", "model.safetensors", "pruning_config.json", "pruning_report.json", "README.md"):
        assert (tmp_path / name).is_file(), name
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(logits(load_pruned_model(tmp_path), x), logits(pruned, x))
    assert PruningReport.from_pretrained(tmp_path) == pruner.report
    assert IsomorphicPruningConfig.from_pretrained(tmp_path) == pruner.config
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.to_dict()["model_stats"]["macs"] == pruner.report.macs_after


def test_report_and_card_give_the_peak_memory(pruned_vit, tmp_path):
    """On a CPU the process's peak resident memory: at least the model (pruned copy and original) it held."""
    pruner, pruned = pruned_vit
    weights_mb = sum(p.numel() * p.element_size() for p in pruner.model.parameters()) / 2**20
    assert pruner.report.peak_memory_mb > weights_mb
    assert f"peak memory: {pruner.report.peak_memory_mb:.0f} MB" in pruner.report.summary()
    pruner.save_pretrained(tmp_path)
    assert f"peak memory {pruner.report.peak_memory_mb:.0f} MB" in (tmp_path / "README.md").read_text()


def test_push_to_hub_sends_one_commit_with_everything(pruned_vit, tmp_path):
    pruner, _ = pruned_vit
    api = RecordingApi()
    pruner.push_to_hub("me/tiny-vit-iso", save_directory=tmp_path, api=api)
    assert api.calls[0] == ("create_repo", "me/tiny-vit-iso")
    files = api.calls[1][2]
    assert {"config.json", "model.safetensors", "pruning_config.json", "README.md"} <= set(files)


def test_invalid_repo_id_is_rejected_before_any_work(pruned_vit, tmp_path):
    pruner, _ = pruned_vit
    with pytest.raises(ValueError, match="repo id"):
        pruner.push_to_hub("not a repo id!", save_directory=tmp_path / "out", api=RecordingApi())
    assert not os.path.exists(tmp_path / "out")


def test_saving_before_pruning_is_an_error(tmp_path):
    with pytest.raises(RuntimeError, match="prune"):
        IsomorphicPruner(build("vit")).save_pretrained(tmp_path)


@pytest.mark.parametrize("name", ["vit", "convnext", "timm_vit"])
def test_a_pruned_model_can_be_pruned_again_and_saved(name, tmp_path):
    first = IsomorphicPruner(build(name)).prune(IsomorphicPruningConfig(pruning_ratio=0.25, importance="magnitude"))
    pruner = IsomorphicPruner(first)
    target = count_macs(first) * 0.7
    second = pruner.prune(IsomorphicPruningConfig(target_macs=target, importance="magnitude"))
    assert abs(count_macs(second) - target) / target <= 0.01
    pruner.save_pretrained(tmp_path)
    size = pruner.report.image_size
    x = torch.randn(2, 3, size, size)
    assert torch.equal(logits(load_pruned_model(tmp_path), x), logits(second, x))
