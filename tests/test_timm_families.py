"""timm families beyond the first support matrix: the same guarantees, plus what each family's topology adds."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn
from transformers import Swinv2Config, Swinv2ForImageClassification

from models import TIMM_FAMILY_BUILDERS, _timm_wrapper, build, logits
from optimum_isoprune import IsomorphicPruner, IsomorphicPruningConfig
from optimum_isoprune.checkpoint import load_pruned_model
from optimum_isoprune.counting import count_macs, count_params
from optimum_isoprune.errors import UnsupportedModelError
from test_pruner import _inputs, independent_macs

FAMILIES = sorted(TIMM_FAMILY_BUILDERS)


@pytest.fixture(scope="module", params=FAMILIES)
def pruned_half(request):
    model = build(request.param)
    pruner = IsomorphicPruner(model)
    target = count_macs(model) * 0.5
    pruned = pruner.prune(IsomorphicPruningConfig(target_macs=target), calibration_dataset=_inputs(pruner, batch=8))
    return request.param, model, pruner, pruned, target


@pytest.mark.parametrize("name", FAMILIES)
def test_ratio_zero_gives_identical_logits(name):
    model = build(name)
    pruner = IsomorphicPruner(model)
    x = _inputs(pruner)
    pruned = pruner.prune(IsomorphicPruningConfig(pruning_ratio=0.0, importance="magnitude"))
    assert torch.equal(logits(pruned, x), logits(model, x))


def test_half_macs_within_one_percent_and_counted_like_torch(pruned_half):
    name, model, pruner, pruned, target = pruned_half
    assert abs(count_macs(pruned) - target) / target <= 0.01, name
    x = _inputs(pruner)
    for ours, model_ in ((pruner.report.macs_before, build(name)), (pruner.report.macs_after, pruned)):
        theirs = independent_macs(model_, x)
        assert abs(ours - theirs) / theirs <= 0.02, name
    assert pruner.report.params_after == count_params(pruned) < pruner.report.params_before


def test_pruned_model_trains(pruned_half):
    name, model, pruner, pruned, target = pruned_half
    trainee = copy.deepcopy(pruned)  # the fixture's model stays as pruned for the other tests
    x, y = _inputs(pruner, batch=4), torch.arange(4)
    trainee.train()
    optimizer = torch.optim.SGD(trainee.parameters(), lr=0.1)
    before = {k: v.clone() for k, v in trainee.state_dict().items()}
    loss = nn.functional.cross_entropy(logits(trainee, x), y)
    loss.backward()
    assert all(p.grad is not None for p in trainee.parameters() if p.requires_grad)
    optimizer.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(before[k], v) for k, v in trainee.state_dict().items())


def test_save_load_gives_bit_identical_logits(pruned_half, tmp_path):
    name, model, pruner, pruned, target = pruned_half
    pruner.save_pretrained(tmp_path)
    loaded = load_pruned_model(tmp_path)
    x = _inputs(pruner)
    pruned.eval()
    assert type(loaded) is type(pruned)
    assert torch.equal(logits(loaded, x), logits(pruned, x))


@pytest.mark.parametrize("round_to", [1, 8])
def test_grouped_convs_keep_their_groups_with_equal_widths(round_to):
    model = build("timm_regnety")
    pruner = IsomorphicPruner(model)
    pruned = pruner.prune(
        IsomorphicPruningConfig(target_macs=count_macs(model) * 0.5, importance="magnitude", round_to=round_to)
    )
    before = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and 1 < m.groups < m.in_channels}
    after = dict(pruned.named_modules())
    assert before
    narrowed = 0
    for name, conv in before.items():
        new = after[name]
        assert new.groups == conv.groups and new.in_channels % new.groups == 0 and new.out_channels % new.groups == 0
        assert new.weight.shape[1] == new.in_channels // new.groups
        assert new.in_channels % round_to == 0 or new.in_channels == conv.in_channels
        narrowed += new.in_channels < conv.in_channels
    assert narrowed, "no grouped convolution was narrowed"


def _squeeze_excitations(model: nn.Module) -> dict[str, tuple[nn.Conv2d, nn.Conv2d]]:
    """(reduce, expand) convs of every SE module: timm's SqueezeExcite (efficientnet, mobilenetv3), SEModule (regnet)."""
    pairs = {}
    for name, module in model.named_modules():
        for reduce, expand in (("conv_reduce", "conv_expand"), ("fc1", "fc2")):
            convs = getattr(module, reduce, None), getattr(module, expand, None)
            if all(isinstance(conv, nn.Conv2d) for conv in convs):
                pairs[name] = convs
    return pairs


@pytest.mark.parametrize("name", ["timm_efficientnet", "timm_mobilenetv3", "timm_regnety"])
def test_squeeze_excitation_follows_its_block(name):
    model = build(name)
    pruner = IsomorphicPruner(model)
    pruned = pruner.prune(IsomorphicPruningConfig(pruning_ratio=0.5, importance="magnitude", round_to=1))
    before, after = _squeeze_excitations(model), _squeeze_excitations(pruned)
    assert before and before.keys() == after.keys()
    for reduce, expand in after.values():
        assert reduce.in_channels == expand.out_channels and reduce.out_channels == expand.in_channels
    assert any(after[n][0].in_channels < before[n][0].in_channels for n in before)
    x = _inputs(pruner)
    assert logits(pruned, x).shape == logits(model, x).shape


def test_layer_scale_is_pruned_with_the_residual_width():
    model = build("timm_deit3")
    pruned = IsomorphicPruner(model).prune(IsomorphicPruningConfig(pruning_ratio=0.5, importance="magnitude"))
    width = pruned.cls_token.shape[-1]
    assert width < model.cls_token.shape[-1]
    for block in pruned.blocks:
        assert block.ls1.gamma.shape == (width,) and block.ls2.gamma.shape == (width,)


_REFUSED = {
    "swinv2": (
        lambda: timm.create_model(
            "swinv2_tiny_window8_256",
            pretrained=False,
            img_size=32,
            patch_size=2,
            embed_dim=16,
            depths=(2, 2),
            num_heads=(2, 4),
            window_size=4,
            num_classes=10,
        ),
        "swin_*",
        "logit scale",
    ),
    "hf_swinv2": (
        lambda: Swinv2ForImageClassification(
            Swinv2Config(image_size=32, patch_size=2, embed_dim=16, depths=[1], num_heads=[2], window_size=4)
        ),
        "SwinForImageClassification",
        "logit scale",
    ),
    "timm_wrapper_beit": (lambda: _timm_wrapper("beit_base_patch16_224"), "beit_*, unwrapped", "model.timm_model"),
    "conv_stack": (lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten()), "resnet*", "adapter naming its classifier"),
}


@pytest.mark.parametrize("name", sorted(_REFUSED))
def test_refusal_names_the_nearest_family_and_what_is_missing(name):
    builder, family, missing = _REFUSED[name]
    with pytest.raises(UnsupportedModelError) as error:
        IsomorphicPruner(builder())
    message = str(error.value)
    assert "Nearest supported family" in message and family in message and missing in message, message
