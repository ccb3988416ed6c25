"""optimum-isoprune: Isomorphic Pruning (Fang et al., ECCV 2024) for Hugging Face and timm vision models."""

from .checkpoint import load_pruned_model, save_pruned_model
from .configuration import IsomorphicPruningConfig
from .counting import count_macs, count_params
from .data import collate_fn, load_fashion_mnist, load_image_dataset, prepare_dataset
from .distillation import DistillationTrainer, DistillationTrainingArguments
from .deployment import benchmark_deployment
from .errors import BudgetError, CalibrationDataError, IsoPruneError, UnsupportedModelError
from .export import (
    InvalidOnnxModelError, NotACheckpointError, OnnxExportError, OnnxParityError, evaluate_onnx, export_onnx, verify_onnx,
)
from .hub import HubPublishError, create_model_card, plot_layer_widths, push_to_hub, save_model_card
from .latency import compare_latency, measure_latency
from .metrics import compute_metrics, evaluate_model
from .modeling import PrunedCheckpointError, to_pruned_model
from .pruner import IsomorphicPruner
from .quantization import quantize_onnx
from .report import ClassAmount, LayerWidth, PruningReport

__version__ = "0.1.0"

__all__ = [
    "BudgetError",
    "CalibrationDataError",
    "ClassAmount",
    "DistillationTrainer",
    "DistillationTrainingArguments",
    "HubPublishError",
    "InvalidOnnxModelError",
    "IsoPruneError",
    "IsomorphicPruner",
    "IsomorphicPruningConfig",
    "LayerWidth",
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
