"""CLIP and SigLIP adapter (transformers `CLIPForImageClassification`, `SiglipForImageClassification`).

Both classifiers hold a ViT vision tower (`vision_model`, no text tower) and read the mean of its tokens; what this
module knows about them:
- their attention has `q_proj` / `k_proj` / `v_proj` / `out_proj` and keeps `num_heads` / `head_dim` on the module
  (`CLIP_ATTENTION`); it applies its own `scale` on every attention path, so a pruned head dim keeps the original
  scale on the fused path too;
- the class embedding (CLIP, 1-d), the position embedding table and the layer norms lose the residual channels with
  the residual width;
- CLIP's classifier reads the mean of the patch tokens, so `post_layernorm` (it normalises the cls token into
  `pooler_output`, which the classifier never reads) is off the traced path: the traced copy adds
  `0 * pooler_output` to the last hidden state (the same values), so torch-pruning prunes it with the residual and
  the pruned tower still runs its forward (SigLIP's `post_layernorm` is on the classifier's path);
- SigLIP's vision tower may hold an attention-pooling head (`vision_use_head`: a probe, an `nn.MultiheadAttention`
  and an MLP) whose output `SiglipForImageClassification` never reads: the copy being pruned drops it (and says so
  in its config), so the pruned model no longer spends MACs on it and `report.macs_before` counts without it.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .base import AttentionLayout
from .transformers_models import TransformersAdapter

CLIP_ATTENTION = AttentionLayout(
    projections=("q_proj", "k_proj", "v_proj"),
    output="out_proj",
    num_heads_attr="num_heads",
    head_dim_attr="head_dim",
)

CLIP_MODEL_TYPES = {"clip": "CLIPForImageClassification", "siglip": "SiglipForImageClassification"}

_HOOK = "_isoprune_pooler_hook"


def _pooler_on_the_traced_path(module: nn.Module, args: Any, output: Any) -> Any:
    """`last_hidden_state + 0 * pooler_output`: the same values, with the pooler's layers on the autograd graph."""
    if output.pooler_output is not None:
        output.last_hidden_state = output.last_hidden_state + 0 * output.pooler_output[:, None]
    return output


def drop_unused_pooling_head(model: nn.Module) -> None:
    """Remove SigLIP's attention-pooling head, which the image classifier computes but never reads."""
    tower = model.vision_model
    if getattr(tower, "use_head", False):
        del tower.head
        tower.use_head = False
        tower.config.vision_use_head = False  # the classifier's `config.vision_config` too: a pruned checkpoint
        model.config.vision_config.vision_use_head = False  # is built without it


class ClipAdapter(TransformersAdapter):
    """transformers CLIP / SigLIP image classifiers: heads, head dims, MLPs and the residual width."""

    attention_layouts = (CLIP_ATTENTION,)
    model_types = CLIP_MODEL_TYPES

    def make_traceable(self, model: nn.Module) -> None:
        drop_unused_pooling_head(model)
        # The vision tower's own config: setting the classifier's would also touch the (absent) text tower's.
        model.vision_model.set_attn_implementation("eager")
        setattr(model, _HOOK, model.vision_model.register_forward_hook(_pooler_on_the_traced_path))

    def restore(self, model: nn.Module, reference: nn.Module) -> None:
        original = reference.vision_model.config._attn_implementation
        if original and original != "eager":
            model.vision_model.set_attn_implementation(original)
        hook = model.__dict__.pop(_HOOK, None)
        if hook is not None:
            hook.remove()
