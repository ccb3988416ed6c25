"""Export a (pruned or stock) image classifier or backbone to ONNX, and check the exported graph against PyTorch.

`export_onnx` writes a folder that needs nothing from this package to run: `model.onnx` (input
`pixel_values` with a dynamic batch dimension, output `logits`, or `features` for a backbone without a head:
the tensor it is pruned on, e.g. a transformers backbone's last hidden state), `config.json`,
`preprocessor_config.json` (resize / rescale / normalise), `labels.json` (class names by index, classifiers only)
and `onnx_export.json` (how it was exported, and the measured parity). Export goes through `torch.onnx` (the dynamo exporter, with
onnxscript); every export is checked with onnxruntime on random inputs at two batch sizes.

Needs the `onnx` extra: `pip install "optimum-isoprune[onnx]"`.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from transformers.utils import CONFIG_NAME
from transformers.utils import IMAGE_PROCESSOR_NAME as PREPROCESSOR_NAME

from .adapters import ModelAdapter, get_adapter
from .errors import IsoPruneError

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_OPSET",
    "SUPPORTED_OPSETS",
    "OnnxExport",
    "OnnxExportError",
    "OnnxParityError",
    "InvalidOnnxModelError",
    "NotACheckpointError",
    "export_onnx",
    "check_onnx_model",
    "verify_onnx",
    "onnx_session",
    "evaluate_onnx",
]

ONNX_NAME = "model.onnx"
LABELS_NAME = "labels.json"
EXPORT_INFO_NAME = "onnx_export.json"
INPUT_NAME = "pixel_values"
OUTPUT_NAME = "logits"
FEATURES_NAME = "features"  # the output of a backbone without a classification head
DEFAULT_OPSET = 18
# Opsets the exporter writes and onnxruntime / OpenVINO run here (tested with torch 2.14, onnxruntime 1.32, OpenVINO 2026.4).
SUPPORTED_OPSETS = range(17, 26)
DEFAULT_ATOL = 1e-4
# Above this many bytes of weights a single .onnx file would pass protobuf's 2 GB limit: weights go beside it.
_EXTERNAL_DATA_BYTES = 1_800_000_000
_EXTRA_HINT = 'install the ONNX extra: pip install "optimum-isoprune[onnx]"'


class OnnxExportError(IsoPruneError, RuntimeError):
    """`torch.onnx` could not export the model; `op` names the operator it failed on, when known."""

    def __init__(self, message: str, op: str | None = None) -> None:
        super().__init__(message)
        self.op = op


class OnnxParityError(OnnxExportError):
    """The exported graph's logits differ from PyTorch's by more than the tolerance."""

    def __init__(self, message: str, max_abs_diff: float) -> None:
        super().__init__(message)
        self.max_abs_diff = max_abs_diff


class InvalidOnnxModelError(IsoPruneError, ValueError):
    """A file that is not a valid ONNX model (truncated, corrupt, or not ONNX at all)."""


class NotACheckpointError(IsoPruneError, FileNotFoundError):
    """A path that is not a saved model folder (no config.json)."""


@dataclass
class OnnxExport:
    """What `export_onnx` wrote and measured."""

    path: str
    output_dir: str
    opset: int
    architecture: str
    input_shape: list[int]  # (channels, height, width); the batch dimension is dynamic unless dynamic_batch=False
    dynamic_batch: bool
    num_labels: int  # 0 for a backbone
    file_bytes: int
    max_abs_diff: float | None = None
    parity_batch_sizes: list[int] = field(default_factory=list)
    atol: float = DEFAULT_ATOL
    export_seconds: float = 0.0
    exporter: str = ""
    output_name: str = OUTPUT_NAME

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------- helpers


def require(module: str) -> Any:
    """Import an optional dependency or raise an ImportError that says which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        extra = "openvino" if module.startswith("openvino") else "onnx"
        hint = (
            _EXTRA_HINT if extra == "onnx" else 'install the OpenVINO extra: pip install "optimum-isoprune[openvino]"'
        )
        raise ImportError(f"{module} is not installed; {hint}.") from err


def check_opset(opset: int) -> int:
    """`opset` if the exporter and the runtimes handle it, else a ValueError naming the supported range."""
    if isinstance(opset, bool) or not isinstance(opset, int) or opset not in SUPPORTED_OPSETS:
        raise ValueError(
            f"Unsupported ONNX opset {opset!r}: give an integer from {SUPPORTED_OPSETS.start} to "
            f"{SUPPORTED_OPSETS.stop - 1} (default {DEFAULT_OPSET}, which onnxruntime >= 1.14 and OpenVINO read)."
        )
    return opset


def output_name(adapter: ModelAdapter) -> str:
    """The exported graph's output: `logits`, or `features` for a backbone pruned on its features."""
    return OUTPUT_NAME if adapter.objective == "logits" else FEATURES_NAME


class _OutputModule(nn.Module):
    """One tensor in (pixel_values), one tensor out (logits, or a backbone's features): the graph an ONNX user
    sees."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter) -> None:
        super().__init__()
        self.model = model
        self.adapter = adapter

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.adapter.outputs(self.model, pixel_values)


@contextlib.contextmanager
def _export_mode(model: nn.Module):
    """eval() and, for transformers models, eager attention (SDPA paths of some models do not export)."""
    was_training = model.training
    config = getattr(model, "config", None)
    original = getattr(config, "_attn_implementation", None)
    switched = False
    if original not in (None, "eager") and hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation("eager")
            switched = True
        except (ValueError, AttributeError, NotImplementedError) as err:  # a wrapper that keeps its own kernels
            logger.debug("Kept %s attention for export (%s).", original, err)
    model.eval()
    try:
        yield
    finally:
        if switched:
            model.set_attn_implementation(original)
        model.train(was_training)


def _random_inputs(adapter: ModelAdapter, batch_size: int, seed: int) -> torch.Tensor:
    size, channels = adapter.image_size(), adapter.num_channels()
    return torch.randn(batch_size, channels, size, size, generator=torch.Generator().manual_seed(seed))


_OP_PATTERNS = (
    re.compile(r"torch\.ops\.aten\.([A-Za-z0-9_]+)"),
    re.compile(r"\baten(?:::|\.)([A-Za-z0-9_]+)"),
    re.compile(r"for (?:the )?(?:node|op(?:erator)?) ['`\"]?([A-Za-z0-9_.:]+)"),
)


def failing_op(message: str) -> str | None:
    """The operator an exporter or runtime error names (e.g. 'aten.view' or 'aten::_upsample'), if any."""
    for pattern in _OP_PATTERNS[:2]:
        match = pattern.search(message)
        if match:
            return f"aten.{match.group(1)}"
    match = _OP_PATTERNS[2].search(message)
    return match.group(1) if match else None


def _summary(message: str) -> str:
    """The exception summary of a dynamo export error, else its first non-empty line."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if "## Exception summary" in lines:
        following = lines[lines.index("## Exception summary") + 1 :]
        if following:
            return following[0]
    return lines[0] if lines else message


# --------------------------------------------------------------------------------------------- input


def load_for_export(model_or_dir: nn.Module | str | os.PathLike) -> tuple[nn.Module, str | None]:
    """(model, checkpoint folder or None): a model passes through; a folder is loaded with `load_pruned_model`."""
    if isinstance(model_or_dir, nn.Module):
        return model_or_dir, None
    if not isinstance(model_or_dir, (str, os.PathLike)):
        raise TypeError(f"Expected a torch.nn.Module or a checkpoint folder, got {type(model_or_dir).__name__}.")
    directory = os.fspath(model_or_dir)
    if not os.path.isdir(directory):
        raise NotACheckpointError(
            f"{directory!r} is not a folder: give a model, or a checkpoint folder written by save_pretrained "
            "(e.g. `optimum-isoprune prune ... --output DIR`)."
        )
    if not os.path.isfile(os.path.join(directory, CONFIG_NAME)):
        found = sorted(os.listdir(directory))[:8]
        raise NotACheckpointError(
            f"{directory!r} is not a checkpoint folder: it has no {CONFIG_NAME} (found {found or 'nothing'}). "
            "Give a folder written by save_pretrained / `optimum-isoprune prune --output DIR` "
            "(config.json + model.safetensors)."
        )
    from .checkpoint import load_pruned_model

    return load_pruned_model(directory), directory


# ----------------------------------------------------------------------------------------- side files


def _labels(model: nn.Module, num_labels: int) -> list[str]:
    config = getattr(model, "config", None)
    id2label = getattr(config, "id2label", None) or {}
    if len(id2label) == num_labels:
        return [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(num_labels)]
    names = (getattr(model, "pretrained_cfg", None) or {}).get("label_names")
    if names and len(names) == num_labels:
        return [str(n) for n in names]
    return [f"LABEL_{i}" for i in range(num_labels)]


def _preprocessor_dict(model: nn.Module, adapter: ModelAdapter) -> dict[str, Any]:
    """A ViTImageProcessor-style config for models without a saved processor (timm, in-memory models)."""
    size, channels = adapter.image_size(), adapter.num_channels()
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if "mean" in cfg and "std" in cfg and len(cfg["mean"]) == channels:
        mean, std = list(cfg["mean"]), list(cfg["std"])
    elif channels == 3:
        from .data import IMAGENET_MEAN, IMAGENET_STD

        mean, std = list(IMAGENET_MEAN), list(IMAGENET_STD)
    else:
        mean, std = [0.5] * channels, [0.5] * channels
    return {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": True,
        "size": {"height": size, "width": size},
        "resample": 3 if cfg.get("interpolation") == "bicubic" else 2,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": mean,
        "image_std": std,
    }


def _write_side_files(
    model: nn.Module,
    adapter: ModelAdapter,
    checkpoint_dir: str | None,
    output_dir: str,
    num_labels: int,
    image_processor: Any = None,
) -> None:
    config_target = os.path.join(output_dir, CONFIG_NAME)
    if checkpoint_dir is not None:
        shutil.copyfile(os.path.join(checkpoint_dir, CONFIG_NAME), config_target)
    elif hasattr(getattr(model, "config", None), "to_json_file"):
        model.config.to_json_file(config_target)
    else:  # a timm model
        from timm.models._hub import save_config_for_hf

        save_config_for_hf(model, config_target)

    processor_target = os.path.join(output_dir, PREPROCESSOR_NAME)
    if image_processor is not None:
        image_processor.to_json_file(processor_target)
    elif checkpoint_dir is not None and os.path.isfile(os.path.join(checkpoint_dir, PREPROCESSOR_NAME)):
        shutil.copyfile(os.path.join(checkpoint_dir, PREPROCESSOR_NAME), processor_target)
    else:
        default = getattr(model, "default_image_processor", None)
        processor = default() if callable(default) else None
        if processor is not None:
            processor.to_json_file(processor_target)
        else:
            with open(processor_target, "w", encoding="utf-8") as f:
                json.dump(_preprocessor_dict(model, adapter), f, indent=2)

    if num_labels:  # a backbone has no classes
        with open(os.path.join(output_dir, LABELS_NAME), "w", encoding="utf-8") as f:
            json.dump(_labels(model, num_labels), f, indent=2, ensure_ascii=False)


# -------------------------------------------------------------------------------------------- export


def export_onnx(
    model_or_dir: nn.Module | str | os.PathLike,
    output_dir: str | os.PathLike,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    check: bool = True,
    atol: float = DEFAULT_ATOL,
    image_processor: Any = None,
    source_dir: str | os.PathLike | None = None,
) -> OnnxExport:
    """Export a supported classifier or backbone (a model, or a checkpoint folder) to `output_dir/model.onnx`, with
    its config, preprocessor config and (for a classifier) labels beside it.

    With `check` (the default) onnxruntime runs the graph on random inputs at batch sizes 1 and 3 (or the
    export batch size when `dynamic_batch=False`) and the largest absolute output difference to PyTorch must
    stay below `atol`, else `OnnxParityError`. The model is not modified. `source_dir`: the checkpoint folder
    a model passed in was loaded from (its config.json and preprocessor config are copied).
    """
    check_opset(opset)
    require("onnx")
    require("onnxscript")
    model, checkpoint_dir = load_for_export(model_or_dir)
    checkpoint_dir = checkpoint_dir or (os.fspath(source_dir) if source_dir is not None else None)
    adapter = get_adapter(model)
    output_dir = os.fspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, ONNX_NAME)
    example = _random_inputs(adapter, 2, seed=0)  # batch 2: torch.export specialises sizes 0 and 1
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    dynamic_shapes = {INPUT_NAME: {0: torch.export.Dim("batch_size")}} if dynamic_batch else None
    start = time.perf_counter()
    output = output_name(adapter)
    with _export_mode(model), torch.no_grad():
        wrapper = _OutputModule(model, adapter).eval()
        num_labels = int(wrapper(example).shape[-1]) if output == OUTPUT_NAME else 0
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log):
                torch.onnx.export(
                    wrapper,
                    (example,),
                    path,
                    dynamo=True,
                    opset_version=opset,
                    input_names=[INPUT_NAME],
                    output_names=[output],
                    dynamic_shapes=dynamic_shapes,
                    verbose=False,
                    external_data=weight_bytes > _EXTERNAL_DATA_BYTES,
                )
        except Exception as err:
            logger.debug("torch.onnx output:\n%s", log.getvalue())
            message = str(err)
            cause = err.__cause__
            while cause is not None:  # the op is named in the innermost error
                message += "\n" + str(cause)
                cause = cause.__cause__
            op = failing_op(message)
            raise OnnxExportError(
                f"Exporting {adapter.architecture} to ONNX (opset {opset}) failed"
                + (f" at op {op}" if op else "")
                + f": {_summary(str(err.__cause__ or err))}",
                op=op,
            ) from err
    seconds = time.perf_counter() - start
    _write_side_files(model, adapter, checkpoint_dir, output_dir, num_labels, image_processor)
    result = OnnxExport(
        path=path,
        output_dir=output_dir,
        opset=opset,
        architecture=adapter.architecture,
        input_shape=list(example.shape[1:]),
        dynamic_batch=dynamic_batch,
        num_labels=num_labels,
        file_bytes=onnx_file_bytes(path),
        atol=atol,
        export_seconds=round(seconds, 2),
        exporter=f"torch.onnx dynamo (torch {torch.__version__})",
        output_name=output,
    )
    if check:
        check_onnx_model(path)
        batch_sizes = [1, 3] if dynamic_batch else [int(example.shape[0])]
        result.max_abs_diff = verify_onnx(path, model, batch_sizes=batch_sizes, atol=atol)
        result.parity_batch_sizes = batch_sizes
        logger.info(
            "Exported %s to %s: max |%s - PyTorch| = %.2e at batch sizes %s.",
            adapter.architecture,
            path,
            output,
            result.max_abs_diff,
            batch_sizes,
        )
    with open(os.path.join(output_dir, EXPORT_INFO_NAME), "w", encoding="utf-8") as f:
        info = {k: v for k, v in result.to_dict().items() if k not in ("path", "output_dir")}
        json.dump({"file": ONNX_NAME, "input": INPUT_NAME, "output": OUTPUT_NAME, **info}, f, indent=2)
    return result


def onnx_file_bytes(path: str | os.PathLike) -> int:
    """Size of an ONNX model on disk, its external-data file included."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    data = path + ".data"
    return size + (os.path.getsize(data) if os.path.isfile(data) else 0)


# ----------------------------------------------------------------------------------------- checking


def check_onnx_model(path: str | os.PathLike) -> None:
    """Raise `InvalidOnnxModelError` (naming the file and the problem) unless `path` is a valid ONNX model."""
    onnx = require("onnx")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No ONNX file at {path!r}.")
    try:
        onnx.checker.check_model(path, full_check=False)
    except Exception as err:  # protobuf DecodeError, onnx ValidationError, OSError for missing external data
        raise InvalidOnnxModelError(
            f"{path} is not a valid ONNX model ({type(err).__name__}: {_summary(str(err))}); it may be truncated or "
            "corrupt. Export it again with optimum_isoprune.export_onnx / `optimum-isoprune export`."
        ) from err


def onnx_session(path: str | os.PathLike, threads: int | None = None) -> Any:
    """An onnxruntime CPU `InferenceSession` (full graph optimisations, `threads` intra-op threads)."""
    ort = require("onnxruntime")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No ONNX file at {path!r}.")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as err:
        message = str(err)
        op = re.search(r"implementation for (\w+)\(", message) or re.search(r"op_type[=:]\s*['\"]?(\w+)", message)
        raise InvalidOnnxModelError(
            f"onnxruntime cannot load {path}" + (f" (op {op.group(1)})" if op else "") + f": {_summary(message)}"
        ) from err


@torch.no_grad()
def verify_onnx(
    path: str | os.PathLike,
    model: nn.Module,
    batch_sizes: Sequence[int] = (1, 3),
    atol: float | None = DEFAULT_ATOL,
    seed: int = 1,
    session: Any = None,
) -> float:
    """Largest |onnxruntime output - PyTorch output| (logits, or a backbone's features) on random inputs at each
    batch size.

    Raises `OnnxParityError` when it exceeds `atol` (pass `atol=None` to only measure, e.g. for int8).
    """
    adapter = get_adapter(model)
    session = session or onnx_session(path)
    worst, output = 0.0, output_name(adapter)
    with _export_mode(model):
        for i, batch_size in enumerate(batch_sizes):
            x = _random_inputs(adapter, batch_size, seed=seed + i)
            expected = adapter.outputs(model, x).float().numpy()
            got = session.run([output], {INPUT_NAME: x.numpy()})[0]
            if got.shape != expected.shape:
                raise OnnxParityError(
                    f"{path} returned {output} of shape {got.shape} for a batch of {batch_size}, PyTorch {expected.shape}.",
                    max_abs_diff=float("inf"),
                )
            worst = max(worst, float(np.abs(got - expected).max()))
    if atol is not None and not worst < atol:
        raise OnnxParityError(
            f"{path}: onnxruntime {output} differ from PyTorch by up to {worst:.3g} (tolerance {atol:g}) on random inputs "
            f"at batch sizes {list(batch_sizes)}; the file is kept for inspection.",
            max_abs_diff=worst,
        )
    return worst


def evaluate_onnx(
    path: str | os.PathLike,
    dataset: Any,
    batch_size: int = 128,
    runtime: str = "onnxruntime",
    threads: int | None = None,
) -> dict[str, float]:
    """Top-1 (and top-5 for more than 5 classes) accuracy of an ONNX model over a dataset of `pixel_values` /
    `labels` (e.g. `prepare_dataset(...)`), run by onnxruntime or OpenVINO."""
    from .metrics import evaluate_model

    if len(dataset) == 0:
        raise ValueError("evaluate_onnx got an empty dataset.")
    return evaluate_model(
        _OnnxClassifier(runner(path, runtime=runtime, threads=threads)),
        dataset,
        batch_size=batch_size,
        device="cpu",
        disable_tqdm=True,
    )


class _OnnxClassifier(nn.Module):
    """An ONNX runner behind the nn.Module interface that `evaluate_model` takes."""

    def __init__(self, run: Any) -> None:
        super().__init__()
        self.run = run

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.run(pixel_values.numpy()))


def runner(path: str | os.PathLike, runtime: str = "onnxruntime", threads: int | None = None):
    """A function numpy pixel_values -> numpy logits (or features) that runs the ONNX file with onnxruntime or
    OpenVINO (CPU)."""
    if runtime == "onnxruntime":
        session = onnx_session(path, threads=threads)
        output = session.get_outputs()[0].name  # logits, or a backbone's features
        return lambda pixels: session.run([output], {INPUT_NAME: np.ascontiguousarray(pixels, dtype=np.float32)})[0]
    if runtime == "openvino":
        ov = require("openvino")
        check_onnx_model(path)
        core = ov.Core()
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = threads
        compiled = core.compile_model(core.read_model(os.fspath(path)), "CPU", config)
        request = compiled.create_infer_request()
        return lambda pixels: np.asarray(request.infer([np.ascontiguousarray(pixels, dtype=np.float32)])[0])
    raise ValueError(f"Unknown runtime {runtime!r}; expected 'onnxruntime' or 'openvino'.")
