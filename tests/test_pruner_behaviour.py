"""Ranking scopes, guards and bad input: what the pruner promises beyond the support matrix."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import timm
import torch
from torch import nn

from models import IMAGE_SIZE, build, logits
from optimum_isoprune import (
    BudgetError,
    CalibrationDataError,
    ConfigurationError,
    IsomorphicPruner,
    IsomorphicPruningConfig,
    ModelStateError,
    UnsupportedModelError,
    count_macs,
)
from optimum_isoprune.adapters import get_adapter


def _calibration(n: int = 8, channels: int = 3, size: int = IMAGE_SIZE) -> datasets.Dataset:
    rng = np.random.default_rng(0)
    return datasets.Dataset.from_dict(
        {
            "pixel_values": rng.standard_normal((n, channels, size, size)).astype("float32"),
            "labels": rng.integers(0, 10, n),
        }
    ).with_format("torch")


def _mlp_widths(model) -> list[int]:
    return [layer.mlp.fc1.out_features for layer in model.vit.layers]


def test_uniform_grouping_prunes_every_layer_alike_and_isomorphic_does_not():
    uniform = IsomorphicPruner(build("vit")).prune(
        IsomorphicPruningConfig(pruning_ratio=0.5, grouping="uniform", importance="taylor"), _calibration()
    )
    assert _mlp_widths(uniform) == [128, 128, 128]
    # Taylor scores differ per layer, so a class-wide ranking gives layers different widths.
    isomorphic = IsomorphicPruner(build("vit")).prune(
        IsomorphicPruningConfig(pruning_ratio=0.5, importance="taylor"), _calibration()
    )
    assert sum(_mlp_widths(isomorphic)) == pytest.approx(3 * 128, abs=3 * 8)
    assert len(set(_mlp_widths(isomorphic))) > 1


def test_widths_are_multiples_of_round_to():
    pruned = IsomorphicPruner(build("vit")).prune(
        IsomorphicPruningConfig(pruning_ratio=0.37, round_to=16, importance="magnitude")
    )
    assert all(w % 16 == 0 for w in _mlp_widths(pruned))
    assert pruned.vit.layers[0].layernorm_before.normalized_shape[0] % 16 == 0


@pytest.mark.parametrize("min_heads", [1, 3])
def test_min_heads_is_kept_in_every_layer(min_heads):
    pruned = IsomorphicPruner(build("vit")).prune(
        IsomorphicPruningConfig(pruning_ratio=0.5, head_pruning_ratio=0.95, min_heads=min_heads, importance="magnitude")
    )
    heads = [a.num_heads for a in get_adapter(pruned).attentions(pruned)]
    assert min(heads) == min_heads


def test_heads_and_head_dims_follow_their_own_ratios():
    pruner = IsomorphicPruner(build("timm_vit"))
    pruner.prune(
        IsomorphicPruningConfig(
            pruning_ratio=0.25, head_pruning_ratio=0.5, head_dim_pruning_ratio=0.0, round_to=1, importance="magnitude"
        )
    )
    classes = {c.name.split(":")[0]: c for c in pruner.report.classes}
    assert classes["heads"].after == 6  # 12 heads, half removed
    assert classes["head_dim"].after == classes["head_dim"].before
    report = pruner.report
    assert (report.head_pruning_ratio, report.head_dim_pruning_ratio) == (0.5, 0.0)
    assert report.pruning_ratio == pytest.approx(0.25, abs=0.02)


def test_same_seed_same_model():
    config = IsomorphicPruningConfig(target_macs=count_macs(build("vit")) * 0.6, importance="random", seed=3)
    a = IsomorphicPruner(build("vit")).prune(config).state_dict()
    b = IsomorphicPruner(build("vit")).prune(config).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_target_params_is_hit():
    model = build("convnext")
    target = sum(p.numel() for p in model.parameters()) * 0.5
    pruner = IsomorphicPruner(model)
    pruned = pruner.prune(IsomorphicPruningConfig(target_params=target, importance="magnitude"))
    assert abs(sum(p.numel() for p in pruned.parameters()) - target) / target <= 0.01


def test_taylor_accepts_dataset_dataloader_and_tensor():
    x = torch.randn(8, 3, IMAGE_SIZE, IMAGE_SIZE)
    y = torch.randint(0, 10, (8,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    for data in (_calibration(), loader, x):
        pruned = IsomorphicPruner(build("vit")).prune(IsomorphicPruningConfig(pruning_ratio=0.3), data)
        assert logits(pruned, x).shape == (8, 10)


def test_taylor_without_data_falls_back_to_magnitude(caplog):
    IsomorphicPruner(build("vit")).prune(IsomorphicPruningConfig(pruning_ratio=0.3))
    assert "magnitude" in caplog.text


# -- bad input: a clear error, and the original model is never modified ----------------------------


def test_taylor_without_any_gradient_ranks_by_magnitude(caplog):
    # a single-output head: cross-entropy is always 0, every Taylor score was 0 and the ranking arbitrary
    from transformers import ViTConfig, ViTForImageClassification

    from models import VIT_KWARGS

    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(**dict(VIT_KWARGS, num_labels=1)))
    config = dict(pruning_ratio=0.5, reconstruction="none", num_calibration_batches=1, calibration_batch_size=4)
    images = torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE)
    taylor = IsomorphicPruner(model).prune(IsomorphicPruningConfig(importance="taylor", **config), images)
    assert "Taylor importance is zero for every channel" in caplog.text
    magnitude = IsomorphicPruner(model).prune(IsomorphicPruningConfig(importance="magnitude", **config))
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    torch.testing.assert_close(logits(taylor, x), logits(magnitude, x))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "config, data, error, message",
    [
        (dict(target_macs=1e15), None, BudgetError, "above the model"),
        (dict(target_macs=10), None, BudgetError, "smallest reachable"),
        (dict(pruning_ratio=0.5), datasets.Dataset.from_dict({"image": [[0.0]]}), CalibrationDataError, "pixel_values"),
        (dict(pruning_ratio=0.5), torch.randn(4, 3, 64, 64), CalibrationDataError, "expected"),
        (dict(pruning_ratio=0.5), torch.randn(4, 64, 64), CalibrationDataError, r"\(N, C, H, W\)"),
        (dict(pruning_ratio=0.5), [1, 2, 3], CalibrationDataError, "Unsupported calibration data"),
        (dict(pruning_ratio=0.5, ignored_modules=["no_such_layer"]), None, ConfigurationError, "no_such_layer"),
        # a ViT built for 32 px: the model's own "Input image size (64*64) doesn't match model" came through
        (dict(pruning_ratio=0.5, image_size=64), None, ConfigurationError, "does not run on 64 px images.*unset"),
    ],
)
def test_bad_input_is_rejected_and_the_model_kept(config, data, error, message):
    model = build("vit")
    before = _state(model)
    with pytest.raises(error, match=message):
        IsomorphicPruner(model).prune(IsomorphicPruningConfig(**config), calibration_dataset=data)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_half_precision_and_meta_models_are_rejected():
    with pytest.raises(ModelStateError, match="float32"):
        IsomorphicPruner(build("vit").half()).prune(pruning_ratio=0.5)
    with torch.device("meta"):
        meta = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    with pytest.raises(ModelStateError, match="meta device"):
        IsomorphicPruner(meta).prune(pruning_ratio=0.5)


def test_a_compiled_model_is_pruned_as_its_eager_module():
    # torch.compile's OptimizedModule was refused as an unsupported architecture
    model = build("vit")
    before = _state(model)
    config = IsomorphicPruningConfig(pruning_ratio=0.5, importance="magnitude")
    pruned = IsomorphicPruner(torch.compile(model)).prune(config)
    expected = IsomorphicPruner(build("vit")).prune(config)
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    torch.testing.assert_close(logits(pruned, x), logits(expected, x))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_pruning_under_no_grad_works_as_outside(context):
    # torch-pruning's tracer stopped with "Dependency graph relies on autograd for tracing" (an AssertionError)
    config = IsomorphicPruningConfig(pruning_ratio=0.5, num_calibration_batches=1, calibration_batch_size=4)
    expected = IsomorphicPruner(build("vit")).prune(config, _calibration(4))
    with context():
        pruned = IsomorphicPruner(build("vit")).prune(config, _calibration(4))
        assert not torch.is_grad_enabled()
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    torch.testing.assert_close(logits(pruned, x), logits(expected, x))


def test_unsupported_model_names_itself_and_the_supported_list():
    with pytest.raises(UnsupportedModelError, match=r"Sequential.*Supported: transformers: ViT"):
        IsomorphicPruner(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(ConfigurationError, match="not both"):  # a TypeError, and now an IsoPruneError too
        IsomorphicPruner(build("vit")).prune(IsomorphicPruningConfig(pruning_ratio=0.5), pruning_ratio=0.5)
    with pytest.raises(ConfigurationError, match=r"takes an IsomorphicPruningConfig or its fields.*got 0\.5"):
        IsomorphicPruner(build("vit")).prune(0.5)
    with pytest.raises(UnsupportedModelError, match=r"got the name 'org/vit'.*IsomorphicPruner.from_pretrained"):
        IsomorphicPruner("org/vit")  # was "Expected a torch.nn.Module, got str."


def test_ignored_modules_keep_their_width():
    pruned = IsomorphicPruner(build("vit")).prune(
        IsomorphicPruningConfig(pruning_ratio=0.5, ignored_modules=["layers.1.mlp.fc1"], importance="magnitude")
    )
    assert pruned.vit.layers[1].mlp.fc1.out_features == 256
    assert pruned.vit.layers[0].mlp.fc1.out_features < 256


def test_from_pretrained_loads_a_local_directory(tmp_path):
    build("deit").save_pretrained(tmp_path)
    pruner = IsomorphicPruner.from_pretrained(tmp_path)
    assert pruner.base_model_name_or_path == str(tmp_path)
    pruner.prune(IsomorphicPruningConfig(pruning_ratio=0.25, importance="magnitude"))
    assert pruner.report.base_model == str(tmp_path)
    with pytest.raises(ConfigurationError, match="random_weights works with timm/<name> models only"):
        IsomorphicPruner.from_pretrained(tmp_path, random_weights=True)


# The paper's Table 2 shapes (random weights, magnitude importance; MACs counted with attention).
PAPER_SHAPES = [
    ("deit_base_distilled_patch16_224", 0.5, 0.5, 0.25, 4.16e9, 20.69e6),
    ("deit_base_distilled_patch16_224", 0.6, 0.6, 0.3, 2.61e9, 13.07e6),
    ("deit_small_distilled_patch16_224", 0.5, 0.5, 0.1, 1.21e9, 5.74e6),
    ("deit_tiny_distilled_patch16_224", 0.25, 0.3, 0.3, 0.62e9, 3.08e6),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, ratio, head_ratio, head_dim_ratio, macs, params", PAPER_SHAPES)
def test_paper_deit_shapes(name, ratio, head_ratio, head_dim_ratio, macs, params):
    torch.manual_seed(0)
    pruner = IsomorphicPruner(timm.create_model(name, pretrained=False))
    pruner.prune(
        IsomorphicPruningConfig(
            pruning_ratio=ratio,
            head_pruning_ratio=head_ratio,
            head_dim_pruning_ratio=head_dim_ratio,
            round_to=2,
            importance="magnitude",
        )
    )
    assert abs(pruner.report.macs_after - macs) / macs <= 0.015
    assert abs(pruner.report.params_after - params) / params <= 0.015


@pytest.mark.parametrize("grouping", ["uniform", "isomorphic"])
def test_the_least_important_channels_are_the_ones_removed(grouping):
    """torch-pruning's local isomorphic mode picks wrong indices; our ranking must keep the strong channels."""
    model = build("vit")
    strong = torch.arange(0, 256, 2)  # every even MLP neuron of every layer carries large weights
    with torch.no_grad():
        for layer in model.vit.layers:
            layer.mlp.fc1.weight.mul_(0.01)
            layer.mlp.fc1.weight[strong] *= 1000
            layer.mlp.fc2.weight.mul_(0.01)
            layer.mlp.fc2.weight[:, strong] *= 1000
    pruned = IsomorphicPruner(model).prune(
        IsomorphicPruningConfig(
            pruning_ratio=0.5, grouping=grouping, importance="magnitude", prune_heads=False, prune_head_dims=False
        )
    )
    for before, after in zip(model.vit.layers, pruned.vit.layers):
        assert after.mlp.fc1.out_features == 128
        assert torch.equal(after.mlp.fc1.bias, before.mlp.fc1.bias[strong])  # exactly the strong neurons, in order


def test_a_frozen_teacher_gives_a_trainable_student():
    teacher = build("vit").requires_grad_(False)
    student = IsomorphicPruner(teacher).prune(IsomorphicPruningConfig(pruning_ratio=0.3, importance="magnitude"))
    assert all(p.requires_grad for p in student.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())
