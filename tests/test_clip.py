"""CLIP (transformers `CLIPForImageClassification`): what it adds to a ViT. The support matrix's guarantees are
checked by its "clip" row (tests/models.py BUILDERS)."""

from __future__ import annotations

import functools

import torch

from models import build, inputs, logits
from optimum_isoprune import IsomorphicPruner, IsomorphicPruningConfig


@functools.lru_cache(maxsize=None)
def _pruned() -> tuple[torch.nn.Module, torch.nn.Module]:
    model = build("clip")
    return model, IsomorphicPruner(model).prune(IsomorphicPruningConfig(pruning_ratio=0.5, importance="magnitude"))


def test_residual_channels_are_removed_from_every_tensor_that_carries_them():
    """The class embedding, position table, patch embedding, both layer norms (post_layernorm is off the classifier's
    path) and the classifier lose the same residual channels (no calibration data: no refit of the weights)."""
    model, pruned = _pruned()
    tower, pruned_tower = model.vision_model, pruned.vision_model
    hidden = tower.config.hidden_size
    original = tower.embeddings.class_embedding
    kept = torch.tensor([int((original == v).nonzero()) for v in pruned_tower.embeddings.class_embedding])
    assert 0 < len(kept) < hidden
    embeddings, pruned_embeddings = tower.embeddings, pruned_tower.embeddings
    assert torch.equal(pruned_embeddings.position_embedding.weight, embeddings.position_embedding.weight[:, kept])
    assert torch.equal(pruned_embeddings.patch_embedding.weight, embeddings.patch_embedding.weight[kept])
    for norm in ("pre_layrnorm", "post_layernorm"):
        assert torch.equal(getattr(pruned_tower, norm).weight, getattr(tower, norm).weight[kept])
        assert torch.equal(getattr(pruned_tower, norm).bias, getattr(tower, norm).bias[kept])
    assert torch.equal(pruned.classifier.weight, model.classifier.weight[:, kept])
    assert pruned_tower(pixel_values=inputs(IsomorphicPruner(model))).pooler_output.shape[-1] == len(kept)


def test_the_pruned_copy_comes_back_without_the_tracing_hook_and_with_its_attention():
    model, pruned = _pruned()
    assert not pruned.vision_model._forward_hooks
    assert pruned.vision_model.config._attn_implementation == model.vision_model.config._attn_implementation
    assert model.config._attn_implementation == pruned.config._attn_implementation


def test_pruned_head_dims_keep_the_original_scale_on_every_attention_path():
    model, pruned = _pruned()
    attentions = [layer.self_attn for layer in pruned.vision_model.encoder.layers]
    assert any(a.head_dim < model.vision_model.encoder.layers[0].self_attn.head_dim for a in attentions)
    x = inputs(IsomorphicPruner(model))
    fused = logits(pruned, x)
    pruned.vision_model.set_attn_implementation("eager")
    try:
        torch.testing.assert_close(logits(pruned, x), fused)
    finally:
        pruned.vision_model.set_attn_implementation(model.vision_model.config._attn_implementation)


def test_summary_fields_match_the_modules():
    pruned = _pruned()[1]
    layers = pruned.vision_model.encoder.layers
    assert pruned.config.layer_num_heads == [layer.self_attn.num_heads for layer in layers]
    assert pruned.config.layer_head_dims == [layer.self_attn.head_dim for layer in layers]
    assert pruned.config.layer_intermediate_sizes == [layer.mlp.fc1.out_features for layer in layers]
    assert pruned.config.pruned_hidden_size == pruned.vision_model.embeddings.class_embedding.shape[-1]
    # The stock fields still describe the architecture before pruning.
    assert pruned.config.to_base_config().vision_config.hidden_size == build("clip").config.vision_config.hidden_size


def test_image_size_and_channels_come_from_the_vision_config():
    """CLIPConfig / SiglipConfig keep `image_size` and `num_channels` in `vision_config` only."""
    from optimum_isoprune.adapters import adapter_for

    for name in ("clip", "siglip"):
        adapter = adapter_for(build(name))
        assert adapter.input_spec() == (32, 3)
        assert (adapter.image_size(), adapter.num_channels()) == (32, 3)
    pruned = _pruned()[1]
    assert adapter_for(pruned).input_spec() == (32, 3)
    assert pruned.default_image_processor().crop_size == {"height": 32, "width": 32}
