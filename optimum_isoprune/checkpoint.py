"""Save and load pruned models (transformers or timm) with their pruning config and report.

transformers models are saved by their pruned class (`config.json` with the widths, safetensors
weights, the modeling code for `trust_remote_code=True`, an image processor). timm models use
timm's Hugging Face layout (`config.json` with `architecture`, `model_args`, `pretrained_cfg`,
plus the same shape manifest; `model.safetensors`). Saves are atomic; loads are strict; only
safetensors and JSON are ever written or read, and no code from a checkpoint folder ever runs: the classes
are this package's own (pruned types) or transformers' own (the stock types this package supports).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable
from typing import Any

from torch import nn
from transformers import PreTrainedModel
from transformers.utils import CONFIG_NAME

from .configuration import PRUNING_CONFIG_NAME, IsomorphicPruningConfig
from .errors import NonFiniteError, UnsupportedModelError
from .modeling import FAMILIES, PrunedCheckpointError, PrunedModelMixin, to_pruned_model
from .modeling.convert import TIMM_MANIFEST_ATTRIBUTE, rebuild_timm_model
from .modeling.modeling_pruned import (
    SAFE_WEIGHTS_NAME,
    atomic_save,
    check_attention_shapes,
    check_loading_info,
    check_weights_against_model,
    local_weight_files,
    non_finite_tensors,
    read_safetensors_header,
    record_checksums,
    recover_interrupted_save,
    verify_checksums,
)
from .report import PruningReport

logger = logging.getLogger(__name__)

# Keys of a timm config.json that describe the pruned widths (the rest is timm's own layout).
_TIMM_MANIFEST_KEYS = (
    "base_model_name_or_path",
    "pruned_shapes",
    "pruned_attributes",
    "layer_num_heads",
    "layer_intermediate_sizes",
)
# timm.create_model arguments that read files or the network: never taken from a checkpoint's config.json.
_TIMM_IO_ARGS = frozenset(
    {"checkpoint_path", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "pretrained_strict"}
)


def save_pruned_model(
    model: nn.Module,
    save_directory: str | os.PathLike,
    pruning_config: IsomorphicPruningConfig | None = None,
    report: PruningReport | None = None,
    image_processor: Any = None,
    base_model_name_or_path: str | None = None,
    write_card: Callable[[str], Any] | None = None,
) -> nn.Module:
    """Save a pruned transformers or timm model (plus `pruning_config.json` / `pruning_report.json`) atomically.

    Returns the model that was saved: for a stock-class transformers model that is the pruned-class
    copy made by `to_pruned_model`; the caller's model is never modified except that a timm model
    gets its manifest attached. `write_card(folder)` writes the model card into the new folder before
    it replaces the old one, so a card error leaves the previous checkpoint as it was. Weights holding
    NaN or inf are refused.
    """
    bad = non_finite_tensors(model)
    if bad:
        raise NonFiniteError(
            f"Refusing to save to {os.fspath(save_directory)}: {len(bad)} tensor(s) hold NaN or inf (e.g. "
            f"{', '.join(bad[:3])}); the model diverged or was given non-finite inputs. Nothing was written."
        )
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
        if write_card is not None:
            write_card(staging)

    atomic_save(save_directory, write)
    return model


def _write_timm_checkpoint(model: nn.Module, directory: str) -> None:
    from safetensors.torch import save_file
    from timm.models._hub import save_config_for_hf

    manifest = getattr(model, TIMM_MANIFEST_ATTRIBUTE)
    _check_json_model_args(type(model).__name__, manifest["model_args"])
    save_config_for_hf(
        model,
        os.path.join(directory, CONFIG_NAME),
        model_config={k: manifest[k] for k in _TIMM_MANIFEST_KEYS if manifest.get(k) is not None},
        model_args=manifest["model_args"],
    )
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, os.path.join(directory, SAFE_WEIGHTS_NAME), metadata={"format": "pt"})
    record_checksums(os.path.join(directory, CONFIG_NAME), [os.path.join(directory, SAFE_WEIGHTS_NAME)])


def _check_json_model_args(name: str, model_args: dict[str, Any]) -> None:
    """Refuse, before writing, timm constructor arguments config.json cannot hold (a class passed as mlp_layer=)."""
    unsaved = []
    for key, value in model_args.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            unsaved.append(f"{key}={getattr(value, '__name__', value)}")
    if unsaved:
        raise UnsupportedModelError(
            f"{name} was built with {', '.join(unsaved)}, which a checkpoint's config.json cannot record (timm "
            "takes an object there, not a name), so it could not be rebuilt on load. Build it from a timm architecture "
            "name whose defaults set them (e.g. vit_giant_patch14_dinov2 for a packed SwiGLU MLP) and prune that; the "
            "pruned model in memory still runs and exports (export_onnx). Nothing was written."
        )


def check_writable(directory: str | os.PathLike) -> None:
    """Fail now, naming the folder, when a checkpoint cannot be saved to `directory` (before any long work)."""
    target = os.path.abspath(os.fspath(directory))
    if os.path.exists(target) and not os.path.isdir(target):
        raise NotADirectoryError(f"Cannot save to {target}: it is a file, not a folder. Choose another --output.")
    parent = os.path.dirname(target)
    while not os.path.exists(parent) and os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)
    try:
        probe = tempfile.mkdtemp(prefix=".isoprune-write-test-", dir=parent)
        os.rmdir(probe)
    except OSError as err:
        raise PermissionError(
            f"Cannot save to {target}: {parent} is not writable ({err.strerror or err}). Choose another output folder."
        ) from err


def is_pruned_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is a local folder written by `save_pruned_model` (it holds `pruning_config.json`)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, PRUNING_CONFIG_NAME))


def load_pruned_model(directory: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """Load what `save_pruned_model` / `save_pretrained` wrote, never running code from the folder.

    transformers checkpoints come back as their pruned class (stock checkpoints of a supported family
    as their stock class), timm checkpoints as a timm model with the manifest attached. `kwargs` go to
    `from_pretrained` for transformers checkpoints. Anything missing, unexpected or of the wrong
    shape raises `PrunedCheckpointError` naming the file; other model types, `auto_map` code, paths
    outside the folder and pickled weights are refused.
    """
    if kwargs.get("trust_remote_code"):
        raise ValueError(
            "load_pruned_model never runs code from a checkpoint folder: drop trust_remote_code "
            "(this package's own classes load every pruned checkpoint)."
        )
    kwargs.pop("trust_remote_code", None)
    directory = os.fspath(directory)
    recover_interrupted_save(directory)
    config_file = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"Missing {config_file}: {directory} is not a saved checkpoint directory.")
    with open(config_file, encoding="utf-8") as f:
        try:
            config = json.load(f)
        except ValueError as err:
            raise PrunedCheckpointError(f"{config_file} is not valid JSON ({err}).") from err
    if not isinstance(config, dict):
        raise PrunedCheckpointError(f"{config_file} is not a JSON object.")
    if "model_type" in config:
        return _load_transformers_checkpoint(directory, config, **kwargs)
    if "architecture" in config:
        return _load_timm_checkpoint(directory, config)
    raise PrunedCheckpointError(
        f"{config_file} has neither 'model_type' (transformers) nor 'architecture' (timm); cannot tell how to build the model."
    )


def _model_classes(config: dict[str, Any]) -> type[nn.Module] | None:
    """This package's pruned class, or transformers' stock class of a supported family, for `config`; else None."""
    model_type = config.get("model_type")
    pruned = {family.config_class.model_type: family.pruned_class for family in FAMILIES}
    if model_type in pruned:
        return pruned[model_type]
    candidates = [family.stock_class for family in FAMILIES if family.stock_class.config_class.model_type == model_type]
    architectures = config.get("architectures") or []
    named = [cls for cls in candidates if architectures and cls.__name__ == architectures[0]]
    return (named or candidates or [None])[0]


def _load_transformers_checkpoint(directory: str, config: dict[str, Any], **kwargs: Any) -> nn.Module:
    model_class = _model_classes(config)
    if model_class is None:
        supported = sorted({family.config_class.model_type for family in FAMILIES})
        raise PrunedCheckpointError(
            f"{os.path.join(directory, CONFIG_NAME)} has model_type {config.get('model_type')!r}, which is not a pruned "
            f"checkpoint type ({', '.join(supported)}) nor a supported stock image classifier; refusing to load it "
            "(its own code, if any, is never run). Load it with transformers directly if you trust it."
        )
    if issubclass(model_class, PrunedModelMixin):
        return model_class.from_pretrained(directory, **kwargs)
    if kwargs.get("ignore_mismatched_sizes"):
        raise ValueError("ignore_mismatched_sizes=True would silently re-initialise weights; refusing.")
    logger.info(
        "%s holds a stock %s checkpoint; loading it as %s.", directory, config["model_type"], model_class.__name__
    )
    kwargs.pop("output_loading_info", None)
    for file in local_weight_files(directory):  # refuses pickles and shards outside the folder
        read_safetensors_header(file)
    try:
        model, info = model_class.from_pretrained(directory, output_loading_info=True, use_safetensors=True, **kwargs)
    except (PrunedCheckpointError, FileNotFoundError):
        raise
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as err:
        raise PrunedCheckpointError(f"Could not load the checkpoint at {directory}: {err}") from err
    check_loading_info(info, f"The checkpoint at {directory}")
    return model


def _check_timm_config(config: dict[str, Any], config_file: str) -> None:
    import timm

    architecture = config.get("architecture")
    if not isinstance(architecture, str) or not timm.is_model(architecture):
        raise PrunedCheckpointError(
            f"{config_file} names timm architecture {architecture!r}, which is not a model of the installed timm; "
            "refusing to resolve it elsewhere (Hub or files)."
        )
    model_args = config.get("model_args") or {}
    if not isinstance(model_args, dict) or not all(isinstance(k, str) for k in model_args):
        raise PrunedCheckpointError(f"{config_file}: model_args must be a JSON object of timm.create_model arguments.")
    io_args = sorted(set(model_args) & _TIMM_IO_ARGS)
    if io_args:
        raise PrunedCheckpointError(
            f"{config_file}: model_args sets {io_args}, which would make timm read weights from a path or the Hub; "
            "a checkpoint's weights come from its own model.safetensors only. Remove them and save again."
        )


def _load_timm_checkpoint(directory: str, config: dict[str, Any]) -> nn.Module:
    from safetensors.torch import load_file

    config_file = os.path.join(directory, CONFIG_NAME)
    _check_timm_config(config, config_file)
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
    check_attention_shapes(model)
    state: dict[str, Any] = {}
    for file in files:
        state.update(load_file(file))
    result = model.load_state_dict(state, strict=False)
    check_loading_info(
        {"missing_keys": result.missing_keys, "unexpected_keys": result.unexpected_keys}, f"{', '.join(files)}"
    )
    verify_checksums(config_file, files)
    pretrained_cfg = dict(config.get("pretrained_cfg") or {})
    pretrained_cfg["architecture"] = config["architecture"]
    model.pretrained_cfg = model.default_cfg = pretrained_cfg
    return model.eval()


__all__ = ["save_pruned_model", "load_pruned_model", "check_writable", "PrunedCheckpointError"]
