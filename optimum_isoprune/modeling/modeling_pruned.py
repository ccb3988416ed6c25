"""Pruned model classes: the stock architecture, resized to the widths recorded in the config.

This file travels with every saved checkpoint (``register_for_auto_class``), so it imports only
the standard library, torch and transformers: ``AutoModelForImageClassification.from_pretrained(
dir, trust_remote_code=True)`` works without optimum-isoprune installed.

One generic mechanism serves every family: `PrunedModelMixin.__init__` builds the stock model from
the config's own fields, then `apply_shape_manifest` resizes every tensor listed in
``config.pruned_shapes`` and sets every attribute in ``config.pruned_attributes``; weights are then
loaded the ordinary way. Loading is strict (missing, unexpected or mismatched tensors are errors,
nothing is re-initialised) and saving is atomic (written beside the target, then moved in place).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import torch
import transformers
from torch import nn
from transformers import (
    ConvNextForImageClassification,
    ConvNextV2ForImageClassification,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    MobileNetV2ForImageClassification,
    ResNetForImageClassification,
    SwinForImageClassification,
    TimmWrapperForImageClassification,
    ViTForImageClassification,
)

from .configuration_pruned import (
    PrunedConfigMixin,
    PrunedConvNextConfig,
    PrunedConvNextV2Config,
    PrunedDeiTConfig,
    PrunedDeiTWithTeacherConfig,
    PrunedMobileNetV2Config,
    PrunedResNetConfig,
    PrunedSwinConfig,
    PrunedTimmWrapperConfig,
    PrunedViTConfig,
)

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
IMAGE_PROCESSOR_NAME = "preprocessor_config.json"
# Weight files of an older save that must not survive next to new weights.
_STALE_WEIGHTS = re.compile(r"^(model|pytorch_model|tf_model|flax_model)(-\d+-of-\d+)?\.(safetensors|bin|h5|msgpack)(\.index\.json)?$")


class PrunedCheckpointError(ValueError):
    """A pruned checkpoint's files disagree with each other or are damaged; the message names the file."""


# ----------------------------------------------------------------------------------------------
# The shape manifest
# ----------------------------------------------------------------------------------------------


def _resized(tensor: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """A tensor of `shape` on the same device/dtype: a slice of `tensor` when it fits, else zeros.

    Its values are placeholders (the checkpoint's weights replace them); slicing keeps the stock
    initialisation so a model built without weights is still sensible.
    """
    if len(shape) == tensor.dim() and all(n <= m for n, m in zip(shape, tensor.shape)):
        return tensor[tuple(slice(0, n) for n in shape)].clone()
    return tensor.new_zeros(shape)


def apply_shape_manifest(
    model: nn.Module,
    pruned_shapes: Mapping[str, Mapping[str, list[int]]] | None,
    pruned_attributes: Mapping[str, Mapping[str, Any]] | None,
) -> nn.Module:
    """Resize `model` in place: every listed parameter/buffer gets its shape, every listed attribute its value."""
    for module_name, tensors in (pruned_shapes or {}).items():
        module = _get_module(model, module_name, "pruned_shapes")
        for tensor_name, shape in tensors.items():
            if module._parameters.get(tensor_name) is not None:
                old = module._parameters[tensor_name]
                module._parameters[tensor_name] = nn.Parameter(_resized(old.data, shape), requires_grad=old.requires_grad)
            elif module._buffers.get(tensor_name) is not None:
                module._buffers[tensor_name] = _resized(module._buffers[tensor_name], shape)
            else:
                raise PrunedCheckpointError(
                    f"pruned_shapes names {module_name}.{tensor_name}, but {type(module).__name__} {module_name!r} "
                    f"has no such parameter or buffer (it has {sorted(module._parameters) + sorted(module._buffers)})."
                )
    for module_name, attributes in (pruned_attributes or {}).items():
        module = _get_module(model, module_name, "pruned_attributes")
        for attribute, value in attributes.items():
            if isinstance(getattr(module, attribute, None), tuple) and isinstance(value, list):
                value = tuple(value)  # JSON has no tuples: LayerNorm.normalized_shape, Conv2d.kernel_size...
            setattr(module, attribute, value)
    return model


def _get_module(model: nn.Module, name: str, field: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as err:
        raise PrunedCheckpointError(
            f"{field} names module {name!r}, which {type(model).__name__} built from this config does not have; "
            "the config does not belong to this architecture (or to this transformers/timm version)."
        ) from err


# ----------------------------------------------------------------------------------------------
# Checkpoint files
# ----------------------------------------------------------------------------------------------


def read_safetensors_header(path: str | os.PathLike) -> dict[str, list[int]]:
    """Shapes of the tensors in a safetensors file, checking that the file is complete.

    Reads only the JSON header (no tensor data, no pickle) so a truncated or foreign file gives a
    clear error naming the file before any model is built.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Missing weights file {path}; save the model again with save_pretrained.")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise PrunedCheckpointError(f"{path} is truncated ({size} bytes): too short to hold a safetensors header.")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8:
            raise PrunedCheckpointError(
                f"{path} is truncated or not a safetensors file: its header claims {header_len} bytes but the file has {size}."
            )
        try:
            header = json.loads(f.read(header_len))
        except ValueError as err:
            raise PrunedCheckpointError(f"{path} has a damaged safetensors header ({err}).") from err
    header.pop("__metadata__", None)
    end = max((int(info["data_offsets"][1]) for info in header.values()), default=0)
    if size != 8 + header_len + end:
        raise PrunedCheckpointError(
            f"{path} is truncated or damaged: it has {size} bytes but its header describes {8 + header_len + end}; "
            "the save was probably interrupted. Save the model again."
        )
    return {name: list(info["shape"]) for name, info in header.items()}


def local_weight_files(directory: str | os.PathLike) -> list[str]:
    """The safetensors files of a local checkpoint directory (one file or the shards of an index)."""
    directory = os.fspath(directory)
    index = os.path.join(directory, SAFE_WEIGHTS_INDEX_NAME)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(directory, shard) for shard in shards]
    return [os.path.join(directory, SAFE_WEIGHTS_NAME)]


def check_weights_against_model(files: list[str], model: nn.Module, config_file: str) -> None:
    """Raise `PrunedCheckpointError` naming the file when a tensor's shape differs from what the config builds."""
    expected = {name: list(t.shape) for name, t in model.state_dict().items()}
    for file in files:
        mismatched = [
            f"{name}: {shape} in the file, {expected[name]} from the config"
            for name, shape in read_safetensors_header(file).items()
            if name in expected and expected[name] != shape
        ]
        if mismatched:
            raise PrunedCheckpointError(
                f"{file} does not match {config_file}: {len(mismatched)} tensor shape(s) differ, e.g. "
                + "; ".join(mismatched[:8])
                + ". The config's pruned_shapes must describe exactly these weights; save model and config together."
            )


def check_loading_info(info: Mapping[str, Any], where: str) -> None:
    """Raise when loading left any tensor missing, unexpected or mismatched (it would be random otherwise)."""
    problems = []
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        values = sorted(str(v) for v in (info.get(key) or ()))
        if values:
            problems.append(f"{len(values)} {key.replace('_', ' ')} (e.g. {', '.join(values[:5])})")
    if problems:
        raise PrunedCheckpointError(
            f"{where} does not hold exactly the model's tensors: " + "; ".join(problems)
            + ". Refusing to initialise anything at random; save the model again."
        )


def _own_aligned_memory(model: nn.Module, alignment: int = 64) -> None:
    """Copy tensors left inside the memory-mapped safetensors file (at unaligned offsets) into own memory.

    CPU matmul kernels pick code paths by alignment, so a mapped weight can give logits that differ
    in the last bit from the same weight in freshly allocated memory; this keeps loading exact.
    """
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.numel() and tensor.data_ptr() % alignment:
                tensor.data = tensor.data.clone(memory_format=torch.contiguous_format)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def atomic_save(save_directory: str | os.PathLike, write: Callable[[str, str | None], None]) -> str:
    """Run `write(staging_dir, previous_dir_or_None)` and move the result to `save_directory`.

    The staging directory sits beside the target, so an interrupted save leaves any previous
    checkpoint untouched. Files of the previous directory that the new save does not write
    (a model card, an image processor) are kept; stale weight files are not.
    """
    target = os.path.abspath(os.fspath(save_directory))
    if os.path.exists(target) and not os.path.isdir(target):
        raise NotADirectoryError(f"Cannot save a checkpoint to {target}: it is a file, not a directory.")
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    previous = target if os.path.isdir(target) else None
    staging = tempfile.mkdtemp(prefix=f".{name}.saving-", dir=parent)
    try:
        write(staging, previous)
        if previous is not None:
            for entry in os.listdir(previous):
                src, dst = os.path.join(previous, entry), os.path.join(staging, entry)
                if os.path.lexists(dst) or _STALE_WEIGHTS.match(entry):
                    continue
                if os.path.isdir(src) and not os.path.islink(src):
                    shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
                else:
                    _link_or_copy(src, dst)
        os.chmod(staging, 0o755)
        if previous is None:
            os.rename(staging, target)
        else:
            backup = staging + ".previous"
            os.rename(target, backup)
            try:
                os.rename(staging, target)
            except BaseException:
                os.rename(backup, target)
                raise
            shutil.rmtree(backup, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


# ----------------------------------------------------------------------------------------------
# The generic pruned model
# ----------------------------------------------------------------------------------------------


class PrunedModelMixin:
    """Builds the stock model from the config, resizes it to the recorded widths; strict, atomic I/O.

    Mix in front of a stock `...ForImageClassification` class and set `config_class`.
    """

    config: PrunedConfigMixin

    def __init__(self, config: PrunedConfigMixin, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        apply_shape_manifest(self, config.pruned_shapes, config.pruned_attributes)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *model_args: Any, **kwargs: Any):
        """`PreTrainedModel.from_pretrained`, refusing to re-initialise any tensor; errors name the bad file."""
        if kwargs.get("ignore_mismatched_sizes"):
            raise ValueError(
                "ignore_mismatched_sizes=True would silently re-initialise pruned weights; a pruned checkpoint "
                "must be loaded exactly. Use a stock checkpoint if you want to fine-tune a new head."
            )
        output_loading_info = kwargs.pop("output_loading_info", False)
        path = os.fspath(pretrained_model_name_or_path)
        local = os.path.join(path, kwargs.get("subfolder") or "")
        if os.path.isdir(local):
            cls._check_local_checkpoint(local, kwargs)
        try:
            model, info = super().from_pretrained(path, *model_args, output_loading_info=True, **kwargs)
        except (PrunedCheckpointError, FileNotFoundError):
            raise
        except Exception as err:
            raise PrunedCheckpointError(f"Could not load the pruned checkpoint at {path}: {err}") from err
        check_loading_info(info, f"The checkpoint at {path}")
        _own_aligned_memory(model)
        return (model, info) if output_loading_info else model

    @classmethod
    def _check_local_checkpoint(cls, path: str, kwargs: Mapping[str, Any]) -> None:
        config_file = os.path.join(path, "config.json")
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"Missing {config_file}: not a saved checkpoint directory.")
        files = local_weight_files(path)
        for file in files:
            read_safetensors_header(file)
        config = kwargs.get("config")
        if not isinstance(config, PrunedConfigMixin):
            config = cls.config_class.from_pretrained(path)
        with torch.device("meta"):
            skeleton = cls(config)
        check_weights_against_model(files, skeleton, config_file)

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, image_processor: Any = None, **kwargs: Any) -> None:
        """`PreTrainedModel.save_pretrained`, written atomically, plus an image processor so `pipeline()` works.

        The image processor is `image_processor` when given, else the one already in `save_directory`,
        else a default one for the base architecture at the model's input size.
        """
        if kwargs.get("push_to_hub"):
            raise ValueError(
                "save_pretrained(push_to_hub=True) is not supported for pruned models; save, then upload with "
                "model.push_to_hub(repo_id) or optimum_isoprune's hub helpers."
            )

        atomic_save(
            save_directory,
            lambda staging, previous: self.write_checkpoint(staging, previous, *args, image_processor=image_processor, **kwargs),
        )

    def write_checkpoint(
        self, directory: str, previous: str | None, *args: Any, image_processor: Any = None, **kwargs: Any
    ) -> None:
        """Write config, weights, code and image processor into `directory` (not atomic: see `save_pretrained`).

        `previous` is the checkpoint directory being replaced, if any: its image processor is kept.
        """
        super().save_pretrained(directory, *args, **kwargs)
        if image_processor is not None:
            image_processor.save_pretrained(directory)
        elif previous is None or not os.path.isfile(os.path.join(previous, IMAGE_PROCESSOR_NAME)):
            processor = self.default_image_processor()
            if processor is not None:
                processor.save_pretrained(directory)

    def default_image_processor(self) -> Any:
        """The stock image processor class of the base architecture, set to this model's input size."""
        from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES

        names = IMAGE_PROCESSOR_MAPPING_NAMES.get(self.config.base_model_type)
        if isinstance(names, Mapping):
            names = [names.get("torchvision"), names.get("pil")]
        for name in names if isinstance(names, (list, tuple)) else [names]:
            processor_class = getattr(transformers, name, None) if name else None
            if processor_class is not None:
                return processor_class(**self._image_processor_kwargs())
        return None

    def _image_processor_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        channels = getattr(self.config, "num_channels", 3)
        if channels != 3:
            kwargs.update(image_mean=[0.5] * channels, image_std=[0.5] * channels)
        return kwargs

    def _config_image_size(self) -> int | None:
        size = getattr(self.config, "image_size", None)
        if isinstance(size, (list, tuple)):
            size = size[0]
        return size if isinstance(size, int) else None


class _FixedSizeProcessorMixin(PrunedModelMixin):
    """ViT-like models: position embeddings fix the input size, so resize (and crop) exactly to it."""

    def _image_processor_kwargs(self) -> dict[str, Any]:
        kwargs = super()._image_processor_kwargs()
        size = self._config_image_size()
        if size is not None:
            kwargs["size"] = {"height": size, "width": size}
            if self.config.base_model_type == "deit":
                kwargs["crop_size"] = {"height": size, "width": size}
        return kwargs


class PrunedViTForImageClassification(_FixedSizeProcessorMixin, ViTForImageClassification):
    config_class = PrunedViTConfig


class PrunedDeiTForImageClassification(_FixedSizeProcessorMixin, DeiTForImageClassification):
    config_class = PrunedDeiTConfig


class PrunedDeiTForImageClassificationWithTeacher(_FixedSizeProcessorMixin, DeiTForImageClassificationWithTeacher):
    config_class = PrunedDeiTWithTeacherConfig


class PrunedConvNextForImageClassification(PrunedModelMixin, ConvNextForImageClassification):
    config_class = PrunedConvNextConfig


class PrunedConvNextV2ForImageClassification(PrunedModelMixin, ConvNextV2ForImageClassification):
    config_class = PrunedConvNextV2Config


class PrunedResNetForImageClassification(PrunedModelMixin, ResNetForImageClassification):
    config_class = PrunedResNetConfig


class PrunedMobileNetV2ForImageClassification(PrunedModelMixin, MobileNetV2ForImageClassification):
    config_class = PrunedMobileNetV2Config

    def _image_processor_kwargs(self) -> dict[str, Any]:
        kwargs = super()._image_processor_kwargs()
        size = self._config_image_size()
        if size is not None:
            kwargs.update(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        return kwargs


class PrunedSwinForImageClassification(PrunedModelMixin, SwinForImageClassification):
    config_class = PrunedSwinConfig


class PrunedTimmWrapperForImageClassification(PrunedModelMixin, TimmWrapperForImageClassification):
    config_class = PrunedTimmWrapperConfig

    def default_image_processor(self) -> None:
        return None  # timm checkpoints keep preprocessing in config.json (`pretrained_cfg`)


PRUNED_MODEL_CLASSES: tuple[type[PrunedModelMixin], ...] = (
    PrunedViTForImageClassification,
    PrunedDeiTForImageClassification,
    PrunedDeiTForImageClassificationWithTeacher,
    PrunedConvNextForImageClassification,
    PrunedConvNextV2ForImageClassification,
    PrunedResNetForImageClassification,
    PrunedMobileNetV2ForImageClassification,
    PrunedSwinForImageClassification,
    PrunedTimmWrapperForImageClassification,
)

for _cls in PRUNED_MODEL_CLASSES:
    _cls.register_for_auto_class("AutoModelForImageClassification")

__all__ = [cls.__name__ for cls in PRUNED_MODEL_CLASSES] + [
    "PRUNED_MODEL_CLASSES",
    "PrunedCheckpointError",
    "PrunedModelMixin",
    "apply_shape_manifest",
    "atomic_save",
    "check_loading_info",
    "check_weights_against_model",
    "local_weight_files",
    "read_safetensors_header",
]
