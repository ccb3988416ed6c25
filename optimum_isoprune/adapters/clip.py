"""CLIP adapter (transformers `CLIPForImageClassification`).

CLIP's vision tower is a ViT with pre-norm (`pre_layrnorm`) and what this module knows about:
- its attention has `q_proj` / `k_proj` / `v_proj` / `out_proj` and keeps `num_heads` / `head_dim` on the module
  (`CLIP_ATTENTION`); it applies its own `scale` on every attention path, so a pruned head dim keeps the original
  scale on the fused path too;
- the class embedding (1-d), the position embedding table and both layer norms lose the residual channels with the
  residual width;
- the classifier reads the mean of the patch tokens, so `post_layernorm` (it normalises the cls token into
  `pooler_output`, which the classifier never reads) is off the traced path: the traced copy adds
  `0 * pooler_output` to the last hidden state (the same values), so torch-pruning prunes it with the residual and
  the pruned model still runs the vision tower's forward.
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

CLIP_MODEL_TYPES = {"clip": "CLIPForImageClassification"}

_HOOK = "_isoprune_pooler_hook"


def _pooler_on_the_traced_path(module: nn.Module, args: Any, output: Any) -> Any:
    """`last_hidden_state + 0 * pooler_output`: the same values, with the pooler's layers on the autograd graph."""
    output.last_hidden_state = output.last_hidden_state + 0 * output.pooler_output[:, None]
    return output


class ClipAdapter(TransformersAdapter):
    """transformers CLIP image classifiers: heads, head dims, MLPs and the residual width."""

    attention_layouts = (CLIP_ATTENTION,)
    model_types = CLIP_MODEL_TYPES

    def make_traceable(self, model: nn.Module) -> None:
        # The vision tower's own config: setting the classifier's would also touch the (absent) text tower's.
        model.vision_model.set_attn_implementation("eager")
        hook = model.vision_model.register_forward_hook(_pooler_on_the_traced_path)
        setattr(model, _HOOK, hook)

    def restore(self, model: nn.Module, reference: nn.Module) -> None:
        original = reference.vision_model.config._attn_implementation
        if original and original != "eager":
            model.vision_model.set_attn_implementation(original)
        hook = model.__dict__.pop(_HOOK, None)
        if hook is not None:
            hook.remove()
