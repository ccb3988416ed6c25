"""optimum-isoprune: Isomorphic Pruning (Fang et al., ECCV 2024) for Hugging Face and timm vision models."""

from . import _startup  # noqa: F401  (first: Ctrl-C while the console script imports torch gives one line)
from .checkpoint import load_pruned_model, save_pruned_model
from .configuration import IsomorphicPruningConfig
from .counting import count_macs, count_params
from .data import collate_fn, load_fashion_mnist, load_image_dataset, prepare_dataset
from .distillation import DistillationTrainer, DistillationTrainingArguments
from .errors import BudgetError, CalibrationDataError, IsoPruneError, UnsupportedModelError
from .hub import HubPublishError, create_model_card, plot_layer_widths, push_to_hub, save_model_card
from .latency import compare_latency, measure_latency
from .metrics import compute_metrics, evaluate_model
from .modeling import PrunedCheckpointError, to_pruned_model
from .pruner import IsomorphicPruner
from .report import ClassAmount, LayerWidth, PruningReport

__version__ = "0.1.0"

__all__ = [
    "BudgetError",
    "CalibrationDataError",
    "ClassAmount",
    "DistillationTrainer",
    "DistillationTrainingArguments",
    "HubPublishError",
    "IsoPruneError",
    "IsomorphicPruner",
    "IsomorphicPruningConfig",
    "LayerWidth",
    "PrunedCheckpointError",
    "PruningReport",
    "UnsupportedModelError",
    "collate_fn",
    "compare_latency",
    "compute_metrics",
    "count_macs",
    "count_params",
    "create_model_card",
    "evaluate_model",
    "load_fashion_mnist",
    "load_image_dataset",
    "load_pruned_model",
    "measure_latency",
    "plot_layer_widths",
    "prepare_dataset",
    "push_to_hub",
    "save_model_card",
    "save_pruned_model",
    "to_pruned_model",
    "__version__",
]
