"""optimum-isoprune: Isomorphic Pruning (Fang et al., ECCV 2024) for Hugging Face and timm vision models."""

from .configuration import IsomorphicPruningConfig
from .report import ClassAmount, LayerWidth, PruningReport

__version__ = "0.1.0"

__all__ = ["IsomorphicPruningConfig", "PruningReport", "LayerWidth", "ClassAmount", "__version__"]
