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

import ctypes
import ctypes.util
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import stat
import struct
from collections.abc import Callable, Mapping
from typing import Any

import torch
import transformers
from torch import nn
from transformers import (
    BeitForImageClassification,
    CLIPForImageClassification,
    CLIPVisionModel,
    ConvNextForImageClassification,
    ConvNextV2ForImageClassification,
    Data2VecVisionForImageClassification,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    Dinov2ForImageClassification,
    Dinov2Model,
    Dinov2WithRegistersForImageClassification,
    EfficientNetForImageClassification,
    LevitForImageClassification,
    LevitForImageClassificationWithTeacher,
    MobileNetV2ForImageClassification,
    RegNetForImageClassification,
    ResNetForImageClassification,
    SiglipForImageClassification,
    SwinForImageClassification,
    Swinv2ForImageClassification,
    TimmWrapperForImageClassification,
    ViTForImageClassification,
    ViTModel,
)

from .configuration_pruned import (
    PrunedBeitConfig,
    PrunedCLIPConfig,
    PrunedCLIPVisionConfig,
    PrunedConfigMixin,
    PrunedConvNextConfig,
    PrunedConvNextV2Config,
    PrunedData2VecVisionConfig,
    PrunedDeiTConfig,
    PrunedDeiTWithTeacherConfig,
    PrunedDinov2Config,
    PrunedDinov2ModelConfig,
    PrunedDinov2WithRegistersConfig,
    PrunedEfficientNetConfig,
    PrunedLevitConfig,
    PrunedLevitWithTeacherConfig,
    PrunedMobileNetV2Config,
    PrunedRegNetConfig,
    PrunedResNetConfig,
    PrunedSiglipConfig,
    PrunedSwinConfig,
    PrunedSwinv2Config,
    PrunedTimmWrapperConfig,
    PrunedViTConfig,
    PrunedViTModelConfig,
)

logger = logging.getLogger(__name__)

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
IMAGE_PROCESSOR_NAME = "preprocessor_config.json"
# Weight files of an older save that must not survive next to new weights.
_STALE_WEIGHTS = re.compile(
    r"^(model|pytorch_model|tf_model|flax_model)(-\d+-of-\d+)?\.(safetensors|bin|h5|msgpack)(\.index\.json)?$"
)
# Files that optimum-isoprune writes into a checkpoint folder: a new save replaces them as a whole, so none of them
# survives from an older save (a README.md is replaced only when it is a generated card, see `_is_generated_card`).
PACKAGE_FILES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "pruning_config.json",
        "pruning_report.json",
        "layer_widths.png",
        "demo_summary.json",
        "modeling_pruned.py",
        "configuration_pruned.py",
    }
)
# Weight formats that need unpickling: never read, whatever the folder holds.
_PICKLE_WEIGHTS = re.compile(r"^(pytorch_model|model|tf_model)(-\d+-of-\d+)?\.(bin|pt|pth|ckpt|pkl)(\.index\.json)?$")
_SAVING = ".saving-"
_PREVIOUS = ".previous"


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
                module._parameters[tensor_name] = nn.Parameter(
                    _resized(old.data, shape), requires_grad=old.requires_grad
                )
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
            _check_attribute(module, module_name, attribute, value)
            if isinstance(getattr(module, attribute, None), tuple) and isinstance(value, list):
                value = tuple(value)  # JSON has no tuples: LayerNorm.normalized_shape, Conv2d.kernel_size...
            setattr(module, attribute, value)
    return model


def _is_plain(value: Any) -> bool:
    if isinstance(value, (bool, int, float)):
        return True
    return isinstance(value, (list, tuple)) and all(isinstance(v, (bool, int, float)) for v in value)


def _check_attribute(module: nn.Module, module_name: str, attribute: str, value: Any) -> None:
    """Only plain data attributes (widths, head counts, scales) may be set; never methods, tensors or submodules."""
    where = f"pruned_attributes[{module_name!r}][{attribute!r}]"
    current = vars(module).get(attribute, _UNSET)
    shadows = (
        hasattr(type(module), attribute)
        or attribute in module._parameters
        or attribute in module._buffers
        or attribute in module._modules
    )
    if (
        not attribute.isidentifier()
        or attribute.startswith("_")
        or attribute == "training"
        or shadows
        or current is _UNSET
        or not _is_plain(current)
    ):
        raise PrunedCheckpointError(
            f"{where} would overwrite {type(module).__name__}.{attribute}, which is not a width or head count this "
            "package records; the config was edited or is not a pruned checkpoint. Save the model again."
        )
    if not _is_plain(value) or not _same_kind(current, value):
        raise PrunedCheckpointError(
            f"{where} is {value!r:.80}, but {type(module).__name__}.{attribute} holds {current!r:.80}; the values must "
            "be of the same kind (int, float, bool, or a list of the same length). Save the model again."
        )


def _same_kind(current: Any, value: Any) -> bool:
    if isinstance(current, bool) or isinstance(value, bool):
        return isinstance(current, bool) and isinstance(value, bool)
    if isinstance(current, int):
        return isinstance(value, int)
    if isinstance(current, float):
        return isinstance(value, (int, float))
    return isinstance(value, (list, tuple)) and len(value) == len(current)


def _check_layer_widths(name: str, module: nn.Module) -> None:
    weight = module._parameters.get("weight")
    if weight is None:
        return
    shape = tuple(weight.shape)
    expected = None
    if isinstance(module, nn.Linear):
        expected = (module.out_features, module.in_features)
    elif isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
        expected = (module.out_channels, module.in_channels // module.groups)
        shape = shape[:2]
    elif isinstance(module, nn.LayerNorm):
        expected = tuple(module.normalized_shape)
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        expected = (module.num_features,)
    if expected is not None and shape != expected:
        raise PrunedCheckpointError(
            f"{type(module).__name__} {name!r} records sizes {expected} but its weight has shape {tuple(weight.shape)}; "
            "the config's pruned_attributes / pruned_shapes were edited or do not belong together. Save the model again."
        )


_UNSET = object()
# (head count, head size) attribute names of the attention modules of transformers and timm, and their projections.
_HEAD_ATTRIBUTES = (
    ("num_attention_heads", "attention_head_size"),
    ("num_attention_heads", "head_dim"),
    ("num_heads", "head_dim"),
)
_PROJECTIONS = (("query", 1), ("q_proj", 1), ("q", 1), ("qkv", 3))


def check_attention_shapes(model: nn.Module) -> None:
    """Raise when a layer's recorded widths disagree with its weights (an edited config): Linear / conv / norm
    sizes, and an attention module's head count x head size against its projections."""
    for name, module in model.named_modules():
        _check_layer_widths(name, module)
        for heads_name, dim_name in _HEAD_ATTRIBUTES:
            heads, dim = vars(module).get(heads_name), vars(module).get(dim_name)
            if not isinstance(heads, int) or not isinstance(dim, int):
                continue
            widths = [
                (p, getattr(module, p).weight.shape[0] // k)
                for p, k in _PROJECTIONS
                if isinstance(getattr(module, p, None), nn.Linear)
            ]
            widths += [
                (a, vars(module)[a]) for a in ("all_head_size", "attn_dim") if isinstance(vars(module).get(a), int)
            ]
            wrong = [f"{p} = {w}" for p, w in widths if w != heads * dim]
            if heads < 1 or dim < 1 or wrong:
                raise PrunedCheckpointError(
                    f"Attention module {name!r} has {heads_name}={heads} and {dim_name}={dim} (= {heads * dim}), but "
                    f"{', '.join(wrong) or 'a layer needs at least one head of at least one dimension'}; the config's "
                    "pruned_attributes were edited or do not belong to these weights. Save the model again."
                )
            break


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
    """The safetensors files of a local checkpoint directory (one file or the shards of an index).

    Shards must be plain file names inside `directory` (no paths, no `..`); pickle-only folders are refused.
    """
    directory = os.fspath(directory)
    index = os.path.join(directory, SAFE_WEIGHTS_INDEX_NAME)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            try:
                weight_map = json.load(f).get("weight_map")
            except (ValueError, AttributeError) as err:
                raise PrunedCheckpointError(f"{index} is not a JSON object ({err}); save the model again.") from err
        if (
            not isinstance(weight_map, dict)
            or not weight_map
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items())
        ):
            raise PrunedCheckpointError(
                f"{index} has no 'weight_map' of tensor names to shard files; the index is damaged. Save the model again."
            )
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if (
                os.path.basename(shard) != shard
                or shard in ("", ".", "..")
                or os.path.isabs(shard)
                or not shard.endswith(".safetensors")
            ):
                raise PrunedCheckpointError(
                    f"{index} maps tensors to {shard!r}, which is not a .safetensors file inside {directory}; "
                    "shards must be plain file names in the checkpoint folder. Refusing to read outside it."
                )
        return [os.path.join(directory, shard) for shard in shards]
    single = os.path.join(directory, SAFE_WEIGHTS_NAME)
    if not os.path.isfile(single) and os.path.isdir(directory):
        pickles = sorted(f for f in os.listdir(directory) if _PICKLE_WEIGHTS.match(f))
        if pickles:
            raise PrunedCheckpointError(
                f"{directory} holds only pickled weights ({', '.join(pickles)}); pruned checkpoints are read from "
                "safetensors only, since unpickling can run code. Convert them with a trusted copy of the model "
                "(model.save_pretrained(dir) writes model.safetensors)."
            )
    return [single]


def _saved_names(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` under the names `save_pretrained` writes (transformers renames some on disk), else unchanged."""
    try:
        from transformers.core_model_loading import revert_weight_conversion

        return dict(revert_weight_conversion(model, dict(state)))
    except Exception:  # older transformers or a model without renamings: names are the same on disk
        return state


def check_weights_against_model(files: list[str], model: nn.Module, config_file: str) -> None:
    """Raise `PrunedCheckpointError` naming the file when any tensor's shape differs from what the config builds.

    Every tensor of every file is compared, under its in-memory name or the name transformers writes on disk.
    """
    state = model.state_dict()
    expected = {name: list(t.shape) for name, t in state.items()}
    if isinstance(model, transformers.PreTrainedModel):
        expected.update({name: list(t.shape) for name, t in _saved_names(model, state).items()})
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


# ----------------------------------------------------------------------------------------------
# Checksums: config.json records a digest of every tensor and of its own shape manifest
# ----------------------------------------------------------------------------------------------

CHECKSUMS_FIELD = "pruned_checksums"


def tensor_checksum(files: list[str]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes (in name order), read straight from safetensors files."""
    entries = []
    for file in files:
        with open(file, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        header.pop("__metadata__", None)
        entries += [(name, info, file, 8 + header_len) for name, info in header.items()]
    digest = hashlib.sha256()
    for name, info, file, start in sorted(entries, key=lambda e: e[0]):
        digest.update(json.dumps([name, info["dtype"], info["shape"]]).encode())
        begin, end = (int(v) for v in info["data_offsets"])
        with open(file, "rb") as f:
            f.seek(start + begin)
            remaining = end - begin
            while remaining > 0:
                chunk = f.read(min(remaining, 1 << 24))
                if not chunk:
                    break
                digest.update(chunk)
                remaining -= len(chunk)
    return "sha256:" + digest.hexdigest()


def manifest_checksum(config: Mapping[str, Any]) -> str:
    """sha256 of the config's `pruned_shapes` and `pruned_attributes` as JSON (sorted keys)."""
    data = {k: config.get(k) for k in ("pruned_shapes", "pruned_attributes")}
    return "sha256:" + hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def record_checksums(config_file: str, files: list[str]) -> None:
    """Add `pruned_checksums` (tensors, manifest) to a written config.json."""
    with open(config_file, encoding="utf-8") as f:
        config = json.load(f)
    config[CHECKSUMS_FIELD] = {"tensors": tensor_checksum(files), "manifest": manifest_checksum(config)}
    with open(config_file, "w", encoding="utf-8") as f:
        f.write(json.dumps(config, indent=2, sort_keys=True) + "\n")


def verify_checksums(config_file: str, files: list[str]) -> None:
    """Raise when the weights or the shape manifest differ from the digests recorded at save time."""
    with open(config_file, encoding="utf-8") as f:
        config = json.load(f)
    recorded = config.get(CHECKSUMS_FIELD)
    if recorded is None:
        return  # saved before checksums were recorded
    if not isinstance(recorded, dict) or not all(isinstance(recorded.get(k), str) for k in ("tensors", "manifest")):
        raise PrunedCheckpointError(f"{config_file} has a damaged {CHECKSUMS_FIELD!r} entry; save the model again.")
    if manifest_checksum(config) != recorded["manifest"]:
        raise PrunedCheckpointError(
            f"{config_file}: pruned_shapes / pruned_attributes were edited after saving (their checksum differs from "
            f"{CHECKSUMS_FIELD}); the widths would not match the weights. Save the model again."
        )
    if tensor_checksum(files) != recorded["tensors"]:
        raise PrunedCheckpointError(
            f"{', '.join(files)}: the tensor data differs from the checksum recorded in {config_file}; the weights were "
            "modified or damaged after saving (flipped bytes, a copy from another run). Save the model again."
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
            f"{where} does not hold exactly the model's tensors: "
            + "; ".join(problems)
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
    """Run `write(staging_dir, previous_dir_or_None)` and swap the result into `save_directory`.

    The staging directory sits beside the target and replaces it in one atomic exchange (Linux `renameat2`), so a
    kill at any point leaves either the old or the new checkpoint at the target; where the exchange is not available
    the old folder is renamed to a `.previous` sibling first, which `recover_interrupted_save` (run by every save and
    load) puts back. Files that optimum-isoprune writes (`PACKAGE_FILES`, weights, a generated card) are replaced as a
    whole; other files of the previous folder (the user's own, an image processor) are kept. The folder keeps its
    permissions; a new one gets the umask's.
    """
    target = os.path.abspath(os.fspath(save_directory))
    if os.path.exists(target) and not os.path.isdir(target):
        raise NotADirectoryError(f"Cannot save a checkpoint to {target}: it is a file, not a directory.")
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    recover_interrupted_save(target)
    previous = target if os.path.isdir(target) else None
    staging = os.path.join(parent, f".{name}{_SAVING}{os.getpid()}-{secrets.token_hex(4)}")
    os.mkdir(staging, 0o777)  # the umask applies, as for any folder the user creates
    try:
        write(staging, previous)
        if previous is not None:
            logger.info(
                "Replacing the checkpoint in %s (files written by optimum-isoprune are replaced; others kept).", target
            )
            for entry in os.listdir(previous):
                src, dst = os.path.join(previous, entry), os.path.join(staging, entry)
                if os.path.lexists(dst) or _is_package_file(previous, entry):
                    continue
                if os.path.isdir(src) and not os.path.islink(src):
                    shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
                else:
                    _link_or_copy(src, dst)
            os.chmod(staging, stat.S_IMODE(os.stat(previous).st_mode))
        _swap_into_place(staging, target, replace=previous is not None)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _is_package_file(folder: str, entry: str) -> bool:
    if entry in PACKAGE_FILES or _STALE_WEIGHTS.match(entry):
        return True
    return entry == "README.md" and _is_generated_card(os.path.join(folder, entry))


def _is_generated_card(path: str) -> bool:
    """A README.md written by optimum-isoprune's card (its metadata carries the `isomorphic-pruning` tag)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            head = f.read(8192)
    except OSError:
        return False
    front = head.split("\n---", 1)[0] if head.startswith("---") else ""
    return "isomorphic-pruning" in front


def _swap_into_place(staging: str, target: str, replace: bool) -> None:
    if not replace:
        os.rename(staging, target)
        return
    if _exchange(staging, target):
        shutil.rmtree(staging, ignore_errors=True)  # now holds the old checkpoint
        return
    backup = staging + _PREVIOUS
    os.rename(target, backup)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(backup, target)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def _exchange(a: str, b: str) -> bool:
    """Atomically exchange two paths (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this file system / kernel cannot exchange
        return False
    raise OSError(errno, os.strerror(errno), b)


def _renameat2() -> Any:
    if not hasattr(_renameat2, "function"):
        function = None
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
            function = libc.renameat2
            function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        except (OSError, AttributeError):
            function = None
        _renameat2.function = function
    return _renameat2.function


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def recover_interrupted_save(directory: str | os.PathLike) -> None:
    """Undo what a killed save left beside `directory`: put back its `.previous` folder, delete stale staging folders.

    Folders of saves still running (their process is alive) are left alone.
    """
    target = os.path.abspath(os.fspath(directory))
    parent, name = os.path.split(target)
    prefix = f".{name}{_SAVING}"
    try:
        entries = sorted(e for e in os.listdir(parent) if e.startswith(prefix))
    except OSError:
        return
    stale = []
    for entry in entries:
        pid = entry[len(prefix) :].split("-", 1)[0]
        if not pid.isdigit() or not _pid_alive(int(pid)):
            stale.append(os.path.join(parent, entry))
    # A missing target with a `.previous` beside it is always restored, even if its pid looks alive (pids are reused).
    backups = [
        os.path.join(parent, e) for e in entries if e.endswith(_PREVIOUS) and os.path.isdir(os.path.join(parent, e))
    ]
    if backups and not os.path.lexists(target):
        try:
            os.rename(backups[-1], target)
        except OSError as err:
            raise PrunedCheckpointError(
                f"An interrupted save left the checkpoint of {target} in {backups[-1]}, and it cannot be moved back "
                f"({err.strerror or err}); rename that folder to {name} yourself."
            ) from err
        stale = [path for path in stale if path != backups[-1]]
        logger.warning(
            "Restored %s from %s, left by a save that was interrupted.", target, os.path.basename(backups[-1])
        )
    for path in stale:
        logger.info("Removing %s, left by an interrupted save.", path)
        shutil.rmtree(path, ignore_errors=True)


def non_finite_tensors(model: nn.Module) -> list[str]:
    """Names of parameters holding NaN or inf, and of floating buffers holding NaN."""
    bad = [n for n, p in model.named_parameters() if p.is_floating_point() and not bool(torch.isfinite(p).all())]
    bad += [n for n, b in model.named_buffers() if b.is_floating_point() and bool(torch.isnan(b).any())]
    return bad


# ----------------------------------------------------------------------------------------------
# The generic pruned model
# ----------------------------------------------------------------------------------------------


class PrunedModelMixin:
    """Builds the stock model from the config, resizes it to the recorded widths; strict, atomic I/O.

    Mix in front of a stock `...ForImageClassification` class and set `config_class`.
    """

    config: PrunedConfigMixin
    # The model type whose stock image processor a default one is built from, when not the base model type's.
    image_processor_model_type: str | None = None
    # The Auto class that loads it: classifiers; backbones without a head set "AutoModel".
    auto_class: str = "AutoModelForImageClassification"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "config_class" in vars(cls):  # a concrete pruned class: saving it copies this file beside the weights
            cls.register_for_auto_class(cls.auto_class)

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
        if not os.path.isdir(local):
            recover_interrupted_save(local)  # a save killed mid-swap may have left the folder as a `.previous`
        if os.path.isdir(local):
            cls._check_local_checkpoint(local, kwargs)
        try:
            model, info = super().from_pretrained(path, *model_args, output_loading_info=True, **kwargs)
        except (PrunedCheckpointError, FileNotFoundError):
            raise
        except Exception as err:
            raise PrunedCheckpointError(f"Could not load the pruned checkpoint at {path}: {err}") from err
        check_loading_info(info, f"The checkpoint at {path}")
        if os.path.isdir(local):
            verify_checksums(os.path.join(local, "config.json"), local_weight_files(local))
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
        check_attention_shapes(skeleton)

    def save_pretrained(
        self, save_directory: str | os.PathLike, *args: Any, image_processor: Any = None, **kwargs: Any
    ) -> None:
        """`PreTrainedModel.save_pretrained`, written atomically, plus an image processor so `pipeline()` works.

        The image processor is `image_processor` when given, else the one already in `save_directory`,
        else a default one for the base architecture at the model's input size.
        """
        if kwargs.get("push_to_hub"):
            raise ValueError(
                "save_pretrained(push_to_hub=True) is not supported for pruned models; save, then upload with "
                "model.push_to_hub(repo_id) or optimum_isoprune's hub helpers."
            )

        bad = non_finite_tensors(self)
        if bad:
            raise ValueError(f"Refusing to save: {len(bad)} tensor(s) hold NaN or inf (e.g. {', '.join(bad[:3])}).")
        atomic_save(
            save_directory,
            lambda staging, previous: self.write_checkpoint(
                staging, previous, *args, image_processor=image_processor, **kwargs
            ),
        )

    def write_checkpoint(
        self, directory: str, previous: str | None, *args: Any, image_processor: Any = None, **kwargs: Any
    ) -> None:
        """Write config, weights, code and image processor into `directory` (not atomic: see `save_pretrained`).

        `previous` is the checkpoint directory being replaced, if any: its image processor is kept.
        """
        super().save_pretrained(directory, *args, **kwargs)
        record_checksums(os.path.join(directory, "config.json"), local_weight_files(directory))
        if image_processor is not None:
            image_processor.save_pretrained(directory)
        elif previous is None or not os.path.isfile(os.path.join(previous, IMAGE_PROCESSOR_NAME)):
            processor = self.default_image_processor()
            if processor is not None:
                processor.save_pretrained(directory)

    def default_image_processor(self) -> Any:
        """The stock image processor class of the base architecture, set to this model's input size."""
        from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES

        names = IMAGE_PROCESSOR_MAPPING_NAMES.get(self.image_processor_model_type or self.config.base_model_type)
        if isinstance(names, Mapping):
            names = [names.get("torchvision"), names.get("pil")]
        for name in names if isinstance(names, (list, tuple)) else [names]:
            processor_class = getattr(transformers, name, None) if name else None
            if processor_class is not None:
                return processor_class(**self._image_processor_kwargs())
        return None

    def _image_processor_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        channels = getattr(self._image_config(), "num_channels", 3)
        if channels != 3:
            kwargs.update(image_mean=[0.5] * channels, image_std=[0.5] * channels)
        return kwargs

    def _image_config(self) -> Any:
        """The config holding the image fields: a composite one's `vision_config` (CLIP, SigLIP), else the config."""
        return getattr(self.config, "vision_config", None) or self.config

    def _config_image_size(self) -> int | None:
        size = getattr(self._image_config(), "image_size", None)
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
            if self.config.base_model_type in (
                "deit",
                "beit",
                "data2vec-vision",
            ):  # their processors center-crop after resizing
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


class PrunedRegNetForImageClassification(PrunedModelMixin, RegNetForImageClassification):
    config_class = PrunedRegNetConfig


class PrunedEfficientNetForImageClassification(_FixedSizeProcessorMixin, EfficientNetForImageClassification):
    """Its stock processor resizes straight to (height, width), as the EfficientNet checkpoints on the Hub do."""

    config_class = PrunedEfficientNetConfig
    image_processor_model_type = "align"  # transformers maps no processor to efficientnet; ALIGN's is EfficientNet's


class _ResizeAndCropProcessorMixin(PrunedModelMixin):
    """Models whose processor resizes the shortest edge, then center-crops: both to the model's input size."""

    def _image_processor_kwargs(self) -> dict[str, Any]:
        kwargs = super()._image_processor_kwargs()
        size = self._config_image_size()
        if size is not None:
            kwargs.update(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        return kwargs


class PrunedMobileNetV2ForImageClassification(_ResizeAndCropProcessorMixin, MobileNetV2ForImageClassification):
    config_class = PrunedMobileNetV2Config


class PrunedDinov2ForImageClassification(_ResizeAndCropProcessorMixin, Dinov2ForImageClassification):
    config_class = PrunedDinov2Config


class PrunedDinov2WithRegistersForImageClassification(
    _ResizeAndCropProcessorMixin, Dinov2WithRegistersForImageClassification
):
    config_class = PrunedDinov2WithRegistersConfig
    image_processor_model_type = (
        "dinov2"  # transformers maps no processor to dinov2_with_registers; its hub repos use this
    )


class PrunedBeitForImageClassification(_FixedSizeProcessorMixin, BeitForImageClassification):
    config_class = PrunedBeitConfig


class PrunedData2VecVisionForImageClassification(_FixedSizeProcessorMixin, Data2VecVisionForImageClassification):
    config_class = PrunedData2VecVisionConfig


class PrunedCLIPForImageClassification(_ResizeAndCropProcessorMixin, CLIPForImageClassification):
    config_class = PrunedCLIPConfig


class PrunedSiglipForImageClassification(_FixedSizeProcessorMixin, SiglipForImageClassification):
    config_class = PrunedSiglipConfig


# Backbones without a head, pruned on their features (optimum_isoprune/adapters/backbones.py)


class PrunedViTModel(_FixedSizeProcessorMixin, ViTModel):
    config_class = PrunedViTModelConfig
    auto_class = "AutoModel"


class PrunedDinov2Model(_ResizeAndCropProcessorMixin, Dinov2Model):
    config_class = PrunedDinov2ModelConfig
    auto_class = "AutoModel"


class PrunedCLIPVisionModel(_ResizeAndCropProcessorMixin, CLIPVisionModel):
    config_class = PrunedCLIPVisionConfig
    auto_class = "AutoModel"
    image_processor_model_type = "clip"  # transformers maps no processor to clip_vision_model


class PrunedSwinForImageClassification(PrunedModelMixin, SwinForImageClassification):
    config_class = PrunedSwinConfig


class PrunedSwinv2ForImageClassification(PrunedModelMixin, Swinv2ForImageClassification):
    config_class = PrunedSwinv2Config


class PrunedLevitForImageClassification(_ResizeAndCropProcessorMixin, LevitForImageClassification):
    config_class = PrunedLevitConfig


class PrunedLevitForImageClassificationWithTeacher(
    _ResizeAndCropProcessorMixin, LevitForImageClassificationWithTeacher
):
    config_class = PrunedLevitWithTeacherConfig


class PrunedTimmWrapperForImageClassification(PrunedModelMixin, TimmWrapperForImageClassification):
    config_class = PrunedTimmWrapperConfig

    def default_image_processor(self) -> None:
        return None  # timm checkpoints keep preprocessing in config.json (`pretrained_cfg`)


__all__ = [
    "PrunedBeitForImageClassification",
    "PrunedCLIPForImageClassification",
    "PrunedCLIPVisionModel",
    "PrunedDinov2Model",
    "PrunedViTModel",
    "PrunedConvNextForImageClassification",
    "PrunedConvNextV2ForImageClassification",
    "PrunedData2VecVisionForImageClassification",
    "PrunedDeiTForImageClassification",
    "PrunedDeiTForImageClassificationWithTeacher",
    "PrunedDinov2ForImageClassification",
    "PrunedDinov2WithRegistersForImageClassification",
    "PrunedEfficientNetForImageClassification",
    "PrunedLevitForImageClassification",
    "PrunedLevitForImageClassificationWithTeacher",
    "PrunedMobileNetV2ForImageClassification",
    "PrunedRegNetForImageClassification",
    "PrunedResNetForImageClassification",
    "PrunedSiglipForImageClassification",
    "PrunedSwinForImageClassification",
    "PrunedSwinv2ForImageClassification",
    "PrunedTimmWrapperForImageClassification",
    "PrunedViTForImageClassification",
    "PrunedCheckpointError",
    "PrunedModelMixin",
    "apply_shape_manifest",
    "atomic_save",
    "check_attention_shapes",
    "check_loading_info",
    "check_weights_against_model",
    "local_weight_files",
    "non_finite_tensors",
    "read_safetensors_header",
    "record_checksums",
    "recover_interrupted_save",
    "verify_checksums",
]
