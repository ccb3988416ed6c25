"""Pruned checkpoints in Hugging Face format: config/model classes that rebuild per-layer widths.

`to_pruned_model(model)` turns a physically pruned model into a saveable one; the classes here are
registered with `AutoConfig` / `AutoModelForImageClassification` on import, and their code travels
with every saved checkpoint so `trust_remote_code=True` loads it without this package.
"""

from transformers import AutoConfig, AutoModelForImageClassification

from .configuration_pruned import (
    PRUNED_CONFIG_CLASSES,
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
from .convert import SUPPORTED_ARCHITECTURES, compute_shape_manifest, to_pruned_model
from .modeling_pruned import (
    PRUNED_MODEL_CLASSES,
    PrunedCheckpointError,
    PrunedConvNextForImageClassification,
    PrunedConvNextV2ForImageClassification,
    PrunedDeiTForImageClassification,
    PrunedDeiTForImageClassificationWithTeacher,
    PrunedMobileNetV2ForImageClassification,
    PrunedSwinForImageClassification,
    PrunedModelMixin,
    PrunedResNetForImageClassification,
    PrunedTimmWrapperForImageClassification,
    PrunedViTForImageClassification,
    apply_shape_manifest,
)

for _config_class in PRUNED_CONFIG_CLASSES:
    AutoConfig.register(_config_class.model_type, _config_class, exist_ok=True)
for _model_class in PRUNED_MODEL_CLASSES:
    AutoModelForImageClassification.register(_model_class.config_class, _model_class, exist_ok=True)

__all__ = [
    "to_pruned_model",
    "compute_shape_manifest",
    "apply_shape_manifest",
    "SUPPORTED_ARCHITECTURES",
    "PrunedCheckpointError",
    "PrunedConfigMixin",
    "PrunedModelMixin",
    "PRUNED_CONFIG_CLASSES",
    "PRUNED_MODEL_CLASSES",
    "PrunedViTConfig",
    "PrunedDeiTConfig",
    "PrunedDeiTWithTeacherConfig",
    "PrunedConvNextConfig",
    "PrunedConvNextV2Config",
    "PrunedResNetConfig",
    "PrunedSwinConfig",
    "PrunedMobileNetV2Config",
    "PrunedTimmWrapperConfig",
    "PrunedViTForImageClassification",
    "PrunedDeiTForImageClassification",
    "PrunedDeiTForImageClassificationWithTeacher",
    "PrunedConvNextForImageClassification",
    "PrunedConvNextV2ForImageClassification",
    "PrunedResNetForImageClassification",
    "PrunedMobileNetV2ForImageClassification",
    "PrunedSwinForImageClassification",
    "PrunedTimmWrapperForImageClassification",
]
