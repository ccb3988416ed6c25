"""The fine-tuning settings `optimum-isoprune distill` and the demo share, in one place (imports no torch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DISTILLATION_TYPES = ("soft", "hard", "none")


@dataclass(frozen=True)
class TrainingDefaults:
    """AdamW with weight decay and a cosine schedule; soft distillation (KL at a temperature) weighted by alpha."""

    epochs: float = 3.0
    batch_size: int = 128
    learning_rate: float = 5e-4
    weight_decay: float = 0.05
    lr_scheduler_type: str = "cosine"
    distillation_type: str = "soft"
    alpha: float = 0.7
    temperature: float = 2.0

    def training_arguments(self, output_dir: str, **settings: Any) -> Any:
        """`DistillationTrainingArguments` with this optimiser and schedule, no checkpoints and no reporting; the
        distillation settings (`distillation_type`, `alpha`, `temperature`) and anything else come in `settings`."""
        from .distillation import DistillationTrainingArguments

        return DistillationTrainingArguments(
            output_dir=output_dir,
            num_train_epochs=self.epochs,
            per_device_train_batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            weight_decay=self.weight_decay,
            lr_scheduler_type=self.lr_scheduler_type,
            **{"save_strategy": "no", "report_to": "none", **settings},
        )


TRAINING_DEFAULTS = TrainingDefaults()
