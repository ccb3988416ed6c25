"""timm families beyond the first support matrix: what each family's topology adds (the matrix's guarantees run in
tests/test_pruner.py over tests/models.py TIMM_FAMILY_BUILDERS, save -> load in tests/test_checkpoint.py)."""

from __future__ import annotations

import pytest
from torch import nn

from models import _timm_wrapper, build, inputs, logits
from optimum_isoprune import IsomorphicPruner, IsomorphicPruningConfig
from optimum_isoprune.counting import count_macs
from optimum_isoprune.errors import UnsupportedModelError


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
    x = inputs(pruner)
    assert logits(pruned, x).shape == logits(model, x).shape


def test_layer_scale_is_pruned_with_the_residual_width():
    model = build("timm_deit3")
    pruned = IsomorphicPruner(model).prune(IsomorphicPruningConfig(pruning_ratio=0.5, importance="magnitude"))
    width = pruned.cls_token.shape[-1]
    assert width < model.cls_token.shape[-1]
    for block in pruned.blocks:
        assert block.ls1.gamma.shape == (width,) and block.ls2.gamma.shape == (width,)


_REFUSED = {
    "timm_wrapper_beit": (lambda: _timm_wrapper("beit_base_patch16_224"), "beit_*, unwrapped", "model.timm_model"),
    "timm_wrapper_swinv2": (
        lambda: _timm_wrapper("swinv2_tiny_window8_256", vit=False),
        "swinv2_*, unwrapped",
        "model.timm_model",
    ),
    "conv_stack": (lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten()), "resnet*", "adapter naming its classifier"),
}


@pytest.mark.parametrize("name", sorted(_REFUSED))
def test_refusal_names_the_nearest_family_and_what_is_missing(name):
    builder, family, missing = _REFUSED[name]
    with pytest.raises(UnsupportedModelError) as error:
        IsomorphicPruner(builder())
    message = str(error.value)
    assert "Nearest supported family" in message and family in message and missing in message, message
