"""optimum-isoprune: Isomorphic Pruning (Fang et al., ECCV 2024) for Hugging Face and timm vision models."""

from .configuration import IsomorphicPruningConfig
from .counting import count_macs, count_params
from .errors import BudgetError, CalibrationDataError, IsoPruneError, UnsupportedModelError
from .pruner import IsomorphicPruner
from .report import ClassAmount, LayerWidth, PruningReport

__version__ = "0.1.0"

__all__ = [
    "BudgetError",
    "CalibrationDataError",
    "ClassAmount",
    "IsoPruneError",
    "IsomorphicPruner",
    "IsomorphicPruningConfig",
    "LayerWidth",
    "PruningReport",
    "UnsupportedModelError",
    "count_macs",
    "count_params",
    "__version__",
]
