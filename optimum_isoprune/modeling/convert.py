"""`to_pruned_model`: turn a physically pruned model into one that can be saved and loaded.

The generic part compares the pruned model with the stock model its config (or timm name and
arguments) builds, and records every tensor shape and plain attribute that differs (the *shape
manifest*). Per family there is only a table row: which pruned class to use and how to summarise
widths for people reading ``config.json``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from .configuration_pruned import PrunedConfigMixin
from .families import SUPPORTED_ARCHITECTURES, family_of, timm_widths
from .modeling_pruned import apply_shape_manifest
from .timm_attention import stands_for, use_pruned_forms

logger = logging.getLogger(__name__)

TIMM_MANIFEST_ATTRIBUTE = "pruned_manifest"
_SKIPPED_ATTRIBUTES = frozenset({"training"})

ShapeManifest = dict[str, dict[str, list[int]]]
AttributeManifest = dict[str, dict[str, Any]]


# ----------------------------------------------------------------------------------------------
# The generic manifest
# ----------------------------------------------------------------------------------------------


def _plain_attributes(module: nn.Module) -> Iterator[tuple[str, Any]]:
    """Public int/float/bool attributes (and tuples/lists of them): the metadata pruning may rewrite."""
    for name, value in vars(module).items():
        if name.startswith("_") or name in _SKIPPED_ATTRIBUTES:
            continue
        if isinstance(value, (bool, int, float)) or (
            isinstance(value, (tuple, list)) and value and all(isinstance(v, (bool, int, float)) for v in value)
        ):
            yield name, value


def compute_shape_manifest(
    model: nn.Module,
    reference: nn.Module,
    layout_hint: str = "Removing whole blocks must also update the config's depth fields before saving.",
) -> tuple[ShapeManifest, AttributeManifest]:
    """Every tensor shape and plain attribute of `model` that differs from the stock `reference`.

    Raises `ValueError` when the two do not have the same modules and tensors (blocks removed,
    modules swapped): the manifest only records widths, not topology.
    """
    modules, ref_modules = dict(model.named_modules()), dict(reference.named_modules())
    extra, missing = sorted(set(modules) - set(ref_modules)), sorted(set(ref_modules) - set(modules))
    if extra or missing:
        raise ValueError(
            f"The pruned {type(model).__name__} does not have the stock module layout its config describes "
            f"(modules only in the pruned model: {extra[:5]}, only in the stock model: {missing[:5]}). {layout_hint}"
        )
    shapes: ShapeManifest = {}
    attributes: AttributeManifest = {}
    for name, module in modules.items():
        ref = ref_modules[name]
        # The root may be the pruned class of the stock one (a pruned model pruned again); a timm attention may be
        # its pruned form (timm_attention.py), which `rebuild_timm_model` switches to again.
        if not stands_for(module, type(ref)) and (name or not isinstance(module, type(ref))):
            raise ValueError(
                f"Module {name!r} is a {type(module).__name__} but the stock model has a {type(ref).__name__}; "
                "only widths can change when saving a pruned model."
            )
        for kind, own, stock in (
            ("parameter", module._parameters, ref._parameters),
            ("buffer", module._buffers, ref._buffers),
        ):
            if set(own) != set(stock) or any((own[k] is None) != (stock[k] is None) for k in own):
                raise ValueError(
                    f"Module {name!r} has {kind}s {sorted(k for k, v in own.items() if v is not None)}, the stock "
                    f"model {sorted(k for k, v in stock.items() if v is not None)}; only shapes can change."
                )
            for tensor_name, tensor in own.items():
                if tensor is not None and tuple(tensor.shape) != tuple(stock[tensor_name].shape):
                    shapes.setdefault(name, {})[tensor_name] = list(tensor.shape)
        stock_attributes = vars(ref)
        for attribute, value in _plain_attributes(module):
            if stock_attributes.get(attribute, _MISSING) != value:
                attributes.setdefault(name, {})[attribute] = list(value) if isinstance(value, tuple) else value
    return shapes, attributes


_MISSING = object()


# ----------------------------------------------------------------------------------------------
# to_pruned_model
# ----------------------------------------------------------------------------------------------


def to_pruned_model(
    model: nn.Module,
    base_model_name_or_path: str | None = None,
    model_args: dict[str, Any] | None = None,
    share_weights: bool = False,
) -> nn.Module:
    """Make a physically pruned model saveable; logits stay bit-identical.

    A transformers model becomes an instance of the matching pruned class (its config records the
    widths; its weights are copies, or with `share_weights=True` the very same tensors, for a
    caller that discards `model`). A timm model is returned as is, with the manifest attached as
    `model.pruned_manifest` (`model_args` overrides timm's recorded constructor arguments when the
    model was built by other means).
    """
    if isinstance(model, PreTrainedModel):
        return _to_pruned_transformers_model(model, base_model_name_or_path, share_weights)
    if hasattr(model, "pretrained_cfg"):
        return _attach_timm_manifest(model, base_model_name_or_path, model_args)
    raise TypeError(
        f"Cannot save a pruned {type(model).__name__}: expected a transformers model ({', '.join(SUPPORTED_ARCHITECTURES)}) "
        "or a timm model (built by timm.create_model)."
    )


def _to_pruned_transformers_model(
    model: PreTrainedModel, base_model_name_or_path: str | None, share_weights: bool = False
) -> PreTrainedModel:
    family = family_of(type(model).__name__)
    if family is None:
        raise TypeError(
            f"No pruned checkpoint class for {type(model).__name__}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}."
        )
    pruned_class = family.pruned_class
    config = model.config
    base_config = config.to_base_config() if isinstance(config, PrunedConfigMixin) else copy.deepcopy(config)
    if not isinstance(base_config, pruned_class.config_class.base_config_class):
        raise TypeError(
            f"{type(model).__name__} has a {type(config).__name__}; {pruned_class.__name__} expects a "
            f"{pruned_class.config_class.base_config_class.__name__}."
        )
    implementation = getattr(config, "_attn_implementation", None)
    if implementation is not None:  # some classes pick attention modules by it (data2vec-vision: eager or SDPA)
        base_config._attn_implementation = implementation
    with torch.device("meta"):
        reference = family.stock_class(base_config)
    shapes, attributes = compute_shape_manifest(model, reference)
    del reference

    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(config, "base_model_name_or_path", None) or config.name_or_path or None
    data = base_config.to_dict()
    data.pop("model_type", None)
    data.update(
        base_model_name_or_path=base_model_name_or_path,
        pruned_shapes=shapes,
        pruned_attributes=attributes,
        architectures=[pruned_class.__name__],
    )
    pruned_config = pruned_class.config_class.from_dict(data)
    if implementation is not None:
        pruned_config._attn_implementation = implementation

    def take(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach() if share_weights else tensor.detach().clone()

    # Built without memory, then handed the weights: nothing is initialised only to be overwritten.
    with torch.device("meta"):
        pruned = pruned_class(pruned_config)
    pruned.load_state_dict({k: take(v) for k, v in model.state_dict().items()}, strict=True, assign=True)
    # Non-persistent buffers are not in the state dict; take them over too so nothing differs.
    own_buffers = dict(pruned.named_buffers())
    for name, buffer in model.named_buffers():
        if name in own_buffers and own_buffers[name].shape == buffer.shape:
            owner, _, attribute = name.rpartition(".")
            pruned.get_submodule(owner)._buffers[attribute] = take(buffer)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for name, parameter in pruned.named_parameters():
        parameter.requires_grad_(flags.get(name, True))
    leftovers = [n for n, t in [*pruned.named_parameters(), *pruned.named_buffers()] if t.is_meta]
    if leftovers:
        raise RuntimeError(f"{pruned_class.__name__}: no value for {leftovers} in the pruned model.")
    pruned.train(model.training)
    for name, value in family.summarize(pruned).items():
        setattr(pruned.config, name, value)
    logger.info("%s: %d resized modules recorded for %s", pruned_class.__name__, len(shapes), base_model_name_or_path)
    return pruned


def timm_reference_args(model: nn.Module, model_args: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """The timm architecture name and the `create_model` keyword arguments that rebuild `model`'s stock form."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    architecture = cfg.get("architecture")
    if not architecture:
        raise ValueError(
            f"{type(model).__name__} has no pretrained_cfg['architecture']; build it with timm.create_model."
        )
    manifest = getattr(model, TIMM_MANIFEST_ATTRIBUTE, None) or {}
    args = dict(manifest.get("model_args") or getattr(model, "_model_args", None) or {})
    args.update(model_args or {})
    args.setdefault("num_classes", getattr(model, "num_classes", None))
    args = {k: list(v) if isinstance(v, tuple) else v for k, v in args.items() if v is not None}
    return architecture, args


def build_timm_model(
    architecture: str, model_args: dict[str, Any], device: str | torch.device | None = None
) -> nn.Module:
    """The stock timm model, with random weights and never downloading anything."""
    import timm

    args = {k: tuple(v) if isinstance(v, list) else v for k, v in model_args.items()}
    if device is None:
        return timm.create_model(architecture, pretrained=False, **args)
    with torch.device(device):
        return timm.create_model(architecture, pretrained=False, **args)


def _attach_timm_manifest(
    model: nn.Module, base_model_name_or_path: str | None, model_args: dict[str, Any] | None
) -> nn.Module:
    architecture, args = timm_reference_args(model, model_args)
    try:
        reference = build_timm_model(architecture, args, device="meta")
    except Exception as err:
        raise ValueError(
            f"Could not rebuild the stock timm model {architecture!r} with {args}: {err}. Pass model_args= with the "
            "timm.create_model keyword arguments the model was built with."
        ) from err
    shapes, attributes = compute_shape_manifest(
        model,
        reference,
        f"Rebuilt with timm.create_model({architecture!r}, **{args}); if the model was built with "
        "other keyword arguments, pass them as model_args=.",
    )
    previous = getattr(model, TIMM_MANIFEST_ATTRIBUTE, None) or {}
    setattr(
        model,
        TIMM_MANIFEST_ATTRIBUTE,
        {
            "architecture": architecture,
            "model_args": args,
            "base_model_name_or_path": base_model_name_or_path or previous.get("base_model_name_or_path"),
            "pruned_shapes": shapes,
            "pruned_attributes": attributes,
            **timm_widths(model),
        },
    )
    return model


def rebuild_timm_model(manifest: dict[str, Any]) -> nn.Module:
    """A timm model with the widths of `manifest` (random placeholder weights) and the manifest attached; attention
    modules that reshape to the residual width are switched to their pruned forms (`timm_attention.py`)."""
    model = use_pruned_forms(build_timm_model(manifest["architecture"], manifest.get("model_args") or {}))
    apply_shape_manifest(model, manifest.get("pruned_shapes"), manifest.get("pruned_attributes"))
    setattr(model, TIMM_MANIFEST_ATTRIBUTE, dict(manifest))
    return model
