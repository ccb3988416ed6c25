"""Pruned checkpoints in Hugging Face format: config/model classes that rebuild per-layer widths.

`to_pruned_model(model)` turns a physically pruned model into a saveable one. Every pruned family is one row
of `families.FAMILIES`; its config and model classes are exported here and registered with `AutoConfig` /
`AutoModelForImageClassification` (backbones without a head: `AutoModel`) on import, and their code travels with every saved checkpoint so
`trust_remote_code=True` loads it without this package.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from .configuration_pruned import PrunedConfigMixin
from .convert import compute_shape_manifest, to_pruned_model
from .families import FAMILIES, PRUNED_CONFIG_CLASSES, PRUNED_MODEL_CLASSES, SUPPORTED_ARCHITECTURES, Family
from .modeling_pruned import PrunedCheckpointError, PrunedModelMixin, apply_shape_manifest

for _family in FAMILIES:
    AutoConfig.register(_family.config_class.model_type, _family.config_class, exist_ok=True)
    _auto = AutoModel if _family.pruned_class.auto_class == "AutoModel" else AutoModelForImageClassification
    _auto.register(_family.config_class, _family.pruned_class, exist_ok=True)
    # PrunedViTConfig, PrunedViTForImageClassification, ...: importable from here
    globals()[_family.config_class.__name__] = _family.config_class
    globals()[_family.pruned_class.__name__] = _family.pruned_class

__all__ = [
    "to_pruned_model",
    "compute_shape_manifest",
    "apply_shape_manifest",
    "SUPPORTED_ARCHITECTURES",
    "FAMILIES",
    "Family",
    "PrunedCheckpointError",
    "PrunedConfigMixin",
    "PrunedModelMixin",
    "PRUNED_CONFIG_CLASSES",
    "PRUNED_MODEL_CLASSES",
    *(c.__name__ for c in PRUNED_CONFIG_CLASSES),
    *(c.__name__ for c in PRUNED_MODEL_CLASSES),
]
