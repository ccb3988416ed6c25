"""Pruning under torchrun: Taylor gradients summed across processes, one model everywhere, mismatches refused."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from transformers import ViTConfig, ViTForImageClassification

from optimum_isoprune import IsomorphicPruner, IsomorphicPruningConfig
from optimum_isoprune import pruner as pruner_module
from optimum_isoprune.distributed import model_fingerprint, rank_and_world, shard

VIT = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    image_size=16,
    patch_size=4,
    num_channels=3,
    num_labels=5,
)
CONFIG = dict(pruning_ratio=0.4, importance="taylor", num_calibration_batches=5, calibration_batch_size=4)

# Each process prunes the same model on the same 20 images; the scores it ranked by and the pruned weights are
# written per rank, then one rank's model is perturbed to check that a mismatch stops every process.
SCRIPT = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    from safetensors.torch import save_file
    from transformers import ViTConfig, ViTForImageClassification
    from optimum_isoprune import IsomorphicPruner, IsomorphicPruningConfig
    from optimum_isoprune import pruner as pruner_module
    from optimum_isoprune.distributed import DistributedPruningError, check_same_model_on_all_ranks

    VIT, CONFIG, out = {vit!r}, {config!r}, sys.argv[1]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    scores = {{}}
    original = pruner_module.channel_scores
    def recording(groups, criterion, seed):
        result = original(groups, criterion, seed)
        scores.update({{f"{{i}}": s.clone() for i, s in enumerate(result.values())}})
        return result
    pruner_module.channel_scores = recording
    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(**VIT))
    images = torch.randn(20, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    pruned = IsomorphicPruner(model).prune(IsomorphicPruningConfig(**CONFIG), calibration_dataset=images)
    save_file(scores, f"{{out}}/scores{{rank}}.safetensors")
    save_file({{k: v.contiguous() for k, v in pruned.state_dict().items()}}, f"{{out}}/model{{rank}}.safetensors")
    if rank == 1:
        with torch.no_grad():
            next(pruned.parameters()).add_(1e-3)
    try:
        check_same_model_on_all_ranks(pruned)
    except DistributedPruningError as error:
        open(f"{{out}}/mismatch{{rank}}.txt", "w").write(str(error))
    dist.destroy_process_group()
    """
)


def _single_process(images: torch.Tensor, monkeypatch) -> tuple[dict, torch.nn.Module]:
    scores: dict = {}
    original = pruner_module.channel_scores

    def recording(groups, criterion, seed):
        result = original(groups, criterion, seed)
        scores.update({str(i): s.clone() for i, s in enumerate(result.values())})
        return result

    monkeypatch.setattr(pruner_module, "channel_scores", recording)
    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(**VIT))
    pruned = IsomorphicPruner(model).prune(IsomorphicPruningConfig(**CONFIG), calibration_dataset=images)
    return scores, pruned


def test_one_process_is_rank_zero_of_one_and_keeps_everything():
    assert rank_and_world() == (0, 1)
    assert shard(list(range(5))) == [0, 1, 2, 3, 4]


def test_end_process_group_destroys_a_live_group_and_is_a_no_op_without_one(tmp_path):
    import torch.distributed as dist

    from optimum_isoprune.distributed import end_process_group

    end_process_group()  # nothing initialised: nothing happens
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert dist.is_initialized()
    end_process_group()
    assert not dist.is_initialized()


def test_fingerprint_sees_a_changed_weight():
    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(**VIT))
    before = model_fingerprint(model)
    assert model_fingerprint(model) == before
    with torch.no_grad():
        model.classifier.bias[0] += 1e-6
    assert model_fingerprint(model) != before


@pytest.mark.slow
def test_two_processes_prune_to_the_single_process_model(tmp_path, monkeypatch):
    script = tmp_path / "prune_ddp.py"
    script.write_text(SCRIPT.format(vit=VIT, config=CONFIG))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29531",
            str(script),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    images = torch.randn(20, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    scores, pruned = _single_process(images, monkeypatch)
    expected = pruned.state_dict()
    for rank in (0, 1):
        ranked = load_file(tmp_path / f"scores{rank}.safetensors")
        assert ranked.keys() == scores.keys()
        for key, value in scores.items():  # the union of both shards, summed in another order
            torch.testing.assert_close(ranked[key], value, rtol=1e-4, atol=1e-7)
        weights = load_file(tmp_path / f"model{rank}.safetensors")
        assert weights.keys() == expected.keys()
        for key, value in expected.items():  # the same channels kept: the very same weights
            assert torch.equal(weights[key], value), key
        message = (tmp_path / f"mismatch{rank}.txt").read_text()
        assert "pruned to different models" in message and "[1]" in message
