"""optimum-isoprune: Isomorphic Pruning (Fang et al., ECCV 2024) for Hugging Face and timm vision models."""

from __future__ import annotations

from . import _startup  # noqa: F401  (first: Ctrl-C while the console script imports torch gives one line)

import importlib
from typing import TYPE_CHECKING, Any

# Public names and the module that defines each. They are imported on first use, so `optimum-isoprune --help`
# and `import optimum_isoprune` do not pay for torch, transformers, timm and datasets up front.
_LAZY = {
    "load_pruned_model": "checkpoint",
    "save_pruned_model": "checkpoint",
    "IsomorphicPruningConfig": "configuration",
    "count_macs": "counting",
    "count_params": "counting",
    "collate_fn": "data",
    "load_fashion_mnist": "data",
    "load_image_dataset": "data",
    "prepare_dataset": "data",
    "DistillationTrainer": "distillation",
    "DistillationTrainingArguments": "distillation",
    "BudgetError": "errors",
    "CalibrationDataError": "errors",
    "ConfigurationError": "errors",
    "DataError": "errors",
    "ModelStateError": "errors",
    "IsoPruneError": "errors",
    "UnsupportedModelError": "errors",
    "NonFiniteError": "errors",
    "HubPublishError": "hub",
    "create_model_card": "card",
    "plot_layer_widths": "card",
    "push_to_hub": "hub",
    "save_model_card": "card",
    "compare_latency": "latency",
    "measure_latency": "latency",
    "compute_metrics": "metrics",
    "evaluate_model": "metrics",
    "PrunedCheckpointError": "modeling",
    "to_pruned_model": "modeling",
    "IsomorphicPruner": "pruner",
    "ClassAmount": "report",
    "LayerWidth": "report",
    "PruningReport": "report",
    "benchmark_deployment": "deployment",
    "InvalidOnnxModelError": "export",
    "NotACheckpointError": "export",
    "OnnxExportError": "export",
    "OnnxParityError": "export",
    "evaluate_onnx": "export",
    "export_onnx": "export",
    "verify_onnx": "export",
    "quantize_onnx": "quantization",
}

if TYPE_CHECKING:
    from .checkpoint import load_pruned_model, save_pruned_model
    from .configuration import IsomorphicPruningConfig
    from .counting import count_macs, count_params
    from .data import collate_fn, load_fashion_mnist, load_image_dataset, prepare_dataset
    from .distillation import DistillationTrainer, DistillationTrainingArguments
    from .errors import (
        BudgetError,
        CalibrationDataError,
        ConfigurationError,
        DataError,
        IsoPruneError,
        ModelStateError,
        NonFiniteError,
        UnsupportedModelError,
    )
    from .card import create_model_card, plot_layer_widths, save_model_card
    from .hub import HubPublishError, push_to_hub
    from .latency import compare_latency, measure_latency
    from .metrics import compute_metrics, evaluate_model
    from .modeling import PrunedCheckpointError, to_pruned_model
    from .pruner import IsomorphicPruner
    from .report import ClassAmount, LayerWidth, PruningReport
    from .deployment import benchmark_deployment
    from .export import (
        InvalidOnnxModelError,
        NotACheckpointError,
        OnnxExportError,
        OnnxParityError,
        evaluate_onnx,
        export_onnx,
        verify_onnx,
    )
    from .quantization import quantize_onnx


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"

__all__ = [
    "BudgetError",
    "CalibrationDataError",
    "ConfigurationError",
    "DataError",
    "ClassAmount",
    "DistillationTrainer",
    "DistillationTrainingArguments",
    "HubPublishError",
    "InvalidOnnxModelError",
    "IsoPruneError",
    "ModelStateError",
    "IsomorphicPruner",
    "IsomorphicPruningConfig",
    "LayerWidth",
    "NonFiniteError",
    "NotACheckpointError",
    "OnnxExportError",
    "OnnxParityError",
    "PrunedCheckpointError",
    "PruningReport",
    "UnsupportedModelError",
    "benchmark_deployment",
    "collate_fn",
    "compare_latency",
    "compute_metrics",
    "count_macs",
    "count_params",
    "create_model_card",
    "evaluate_model",
    "evaluate_onnx",
    "export_onnx",
    "load_fashion_mnist",
    "load_image_dataset",
    "load_pruned_model",
    "measure_latency",
    "plot_layer_widths",
    "prepare_dataset",
    "push_to_hub",
    "quantize_onnx",
    "save_model_card",
    "save_pruned_model",
    "to_pruned_model",
    "verify_onnx",
    "__version__",
]
