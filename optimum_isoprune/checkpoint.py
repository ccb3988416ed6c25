"""Save and load pruned models (transformers or timm) with their pruning config and report.

transformers models are saved by their pruned class (`config.json` with the widths, safetensors
weights, the modeling code for `trust_remote_code=True`, an image processor). timm models use
timm's Hugging Face layout (`config.json` with `architecture`, `model_args`, `pretrained_cfg`,
plus the same shape manifest; `model.safetensors`). Saves are atomic; loads are strict; only
safetensors and JSON are ever written or read.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from torch import nn
from transformers import AutoModelForImageClassification, PreTrainedModel

from .configuration import IsomorphicPruningConfig
from .modeling import PRUNED_MODEL_CLASSES, PrunedCheckpointError, PrunedModelMixin, to_pruned_model
from .modeling.convert import TIMM_MANIFEST_ATTRIBUTE, rebuild_timm_model
from .modeling.modeling_pruned import (
    SAFE_WEIGHTS_NAME,
    atomic_save,
    check_loading_info,
    check_weights_against_model,
    local_weight_files,
    read_safetensors_header,
)
from .report import PruningReport

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
# Keys of a timm config.json that describe the pruned widths (the rest is timm's own layout).
_TIMM_MANIFEST_KEYS = (
    "base_model_name_or_path",
    "pruned_shapes",
    "pruned_attributes",
    "layer_num_heads",
    "layer_intermediate_sizes",
)


def save_pruned_model(
    model: nn.Module,
    save_directory: str | os.PathLike,
    pruning_config: IsomorphicPruningConfig | None = None,
    report: PruningReport | None = None,
    image_processor: Any = None,
    base_model_name_or_path: str | None = None,
) -> nn.Module:
    """Save a pruned transformers or timm model (plus `pruning_config.json` / `pruning_report.json`) atomically.

    Returns the model that was saved: for a stock-class transformers model that is the pruned-class
    copy made by `to_pruned_model`; the caller's model is never modified except that a timm model
    gets its manifest attached.
    """
    if isinstance(model, PreTrainedModel) and not isinstance(model, PrunedModelMixin):
        model = to_pruned_model(model, base_model_name_or_path)
    elif isinstance(model, PrunedModelMixin):
        if base_model_name_or_path is not None:
            model.config.base_model_name_or_path = base_model_name_or_path
    else:
        model = to_pruned_model(model, base_model_name_or_path)

    def write(staging: str, previous: str | None) -> None:
        if isinstance(model, PrunedModelMixin):
            model.write_checkpoint(staging, previous, image_processor=image_processor)
        else:
            _write_timm_checkpoint(model, staging)
            if image_processor is not None:
                image_processor.save_pretrained(staging)
        if pruning_config is not None:
            pruning_config.save_pretrained(staging)
        if report is not None:
            report.save_pretrained(staging)

    atomic_save(save_directory, write)
    return model


def _write_timm_checkpoint(model: nn.Module, directory: str) -> None:
    from safetensors.torch import save_file
    from timm.models._hub import save_config_for_hf

    manifest = getattr(model, TIMM_MANIFEST_ATTRIBUTE)
    save_config_for_hf(
        model,
        os.path.join(directory, CONFIG_NAME),
        model_config={k: manifest[k] for k in _TIMM_MANIFEST_KEYS if manifest.get(k) is not None},
        model_args=manifest["model_args"],
    )
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, os.path.join(directory, SAFE_WEIGHTS_NAME), metadata={"format": "pt"})


def load_pruned_model(directory: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """Load what `save_pruned_model` / `save_pretrained` wrote, without `trust_remote_code`.

    transformers checkpoints come back as their pruned class (stock checkpoints as their stock
    class), timm checkpoints as a timm model with the manifest attached. `kwargs` go to
    `from_pretrained` for transformers checkpoints. Anything missing, unexpected or of the wrong
    shape raises `PrunedCheckpointError` naming the file.
    """
    directory = os.fspath(directory)
    config_file = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"Missing {config_file}: {directory} is not a saved checkpoint directory.")
    with open(config_file, encoding="utf-8") as f:
        try:
            config = json.load(f)
        except ValueError as err:
            raise PrunedCheckpointError(f"{config_file} is not valid JSON ({err}).") from err
    if "model_type" in config:
        return _load_transformers_checkpoint(directory, config, **kwargs)
    if "architecture" in config:
        return _load_timm_checkpoint(directory, config)
    raise PrunedCheckpointError(
        f"{config_file} has neither 'model_type' (transformers) nor 'architecture' (timm); cannot tell how to build the model."
    )


def _load_transformers_checkpoint(directory: str, config: dict[str, Any], **kwargs: Any) -> nn.Module:
    model_class = {cls.config_class.model_type: cls for cls in PRUNED_MODEL_CLASSES}.get(config["model_type"])
    if model_class is not None:
        return model_class.from_pretrained(directory, **kwargs)
    if kwargs.get("ignore_mismatched_sizes"):
        raise ValueError("ignore_mismatched_sizes=True would silently re-initialise weights; refusing.")
    logger.info("%s holds a stock %s checkpoint; loading it with AutoModelForImageClassification.", directory, config["model_type"])
    kwargs.pop("output_loading_info", None)
    model, info = AutoModelForImageClassification.from_pretrained(directory, output_loading_info=True, **kwargs)
    check_loading_info(info, f"The checkpoint at {directory}")
    return model


def _load_timm_checkpoint(directory: str, config: dict[str, Any]) -> nn.Module:
    from safetensors.torch import load_file

    config_file = os.path.join(directory, CONFIG_NAME)
    files = local_weight_files(directory)
    for file in files:
        read_safetensors_header(file)
    manifest = {k: config[k] for k in _TIMM_MANIFEST_KEYS if k in config}
    manifest["architecture"] = config["architecture"]
    manifest["model_args"] = dict(config.get("model_args") or {})
    manifest["model_args"].setdefault("num_classes", config.get("num_classes"))
    try:
        model = rebuild_timm_model(manifest)
    except PrunedCheckpointError:
        raise
    except Exception as err:
        raise PrunedCheckpointError(
            f"Could not build timm model {manifest['architecture']!r} with model_args {manifest['model_args']} "
            f"from {config_file}: {err}"
        ) from err
    check_weights_against_model(files, model, config_file)
    state: dict[str, Any] = {}
    for file in files:
        state.update(load_file(file))
    result = model.load_state_dict(state, strict=False)
    check_loading_info(
        {"missing_keys": result.missing_keys, "unexpected_keys": result.unexpected_keys}, f"{', '.join(files)}"
    )
    pretrained_cfg = dict(config.get("pretrained_cfg") or {})
    pretrained_cfg["architecture"] = config["architecture"]
    model.pretrained_cfg = model.default_cfg = pretrained_cfg
    return model.eval()


__all__ = ["save_pruned_model", "load_pruned_model", "PrunedCheckpointError"]
