"""Knowledge distillation for pruned students: `DistillationTrainingArguments` and `DistillationTrainer`.

The trainer extends `transformers.Trainer` through its documented hooks (`compute_loss`, `prediction_step`):

    loss = (1 - alpha) * CE(student, labels) + alpha * distill(student, teacher)

with `distill` the temperature-scaled KL divergence (`"soft"`, times T^2) or the cross-entropy against the teacher's
argmax (`"hard"`, as in DeiT). Students with a distillation token (transformers `DeiTForImageClassificationWithTeacher`,
timm `*_distilled` models) learn the labels with their class head and the teacher with their distillation head.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import PreTrainedModel, Trainer, TrainingArguments
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.trainer_callback import ProgressCallback

from .adapters import adapter_for
from .adapters.io import output_logits
from .data import INDEX_COLUMN, collate_fn, dataset_transform, ensure_prepared
from .guards import check_finite_parameters, check_labels, require_finite
from .losses import label_loss
from .metrics import IGNORE_INDEX
from .teacher import TEACHER_DTYPES, StepTimeCallback, TeacherRunner
from .training_defaults import DISTILLATION_TYPES

logger = logging.getLogger(__name__)


@dataclass
class DistillationTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus how to learn from a teacher (checked in `__post_init__`)."""

    distillation_type: str = field(
        default="hard",
        metadata={
            "help": "'soft': KL divergence to the teacher's temperature-softened probabilities (scaled by T^2); "
            "'hard': cross-entropy to the teacher's top class (DeiT); 'none': labels only, no teacher.",
            "choices": list(DISTILLATION_TYPES),
        },
    )
    alpha: float = field(
        default=0.5,
        metadata={
            "help": "Weight of the distillation term in [0, 1]: loss = (1 - alpha) * CE(labels) + alpha * distill."
        },
    )
    temperature: float = field(
        default=1.0, metadata={"help": "Softmax temperature (> 0) of 'soft' distillation; ignored by 'hard'."}
    )
    cache_teacher_logits: bool = field(
        default=False,
        metadata={
            "help": "Keep the teacher's training-set logits in memory, keyed by the `teacher_cache_column` index, so the "
            "teacher runs once per example. Only valid without random augmentation (the same index must give the same "
            "pixels every epoch)."
        },
    )
    teacher_dtype: str = field(
        default="float32",
        metadata={
            "help": "Dtype of the teacher's weights and inputs: 'bfloat16' / 'float16' make the per-step teacher "
            "forward cheaper on accelerators; logits are returned in float32.",
            "choices": list(TEACHER_DTYPES),
        },
    )
    teacher_channels_last: bool = field(
        default=False, metadata={"help": "Run the teacher in channels_last memory format (faster for CNN teachers)."}
    )
    teacher_compile: bool = field(
        default=False,
        metadata={"help": "Wrap the teacher in torch.compile; falls back to eager mode, with a warning, if it fails."},
    )
    teacher_cache_column: str = field(
        default=INDEX_COLUMN,
        metadata={"help": "Dataset column holding each training example's position (see `data.add_index_column`)."},
    )
    # Distillation batches carry extra keys (an index column) the student's forward does not take.
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Kept False: the trainer itself picks the inputs the student and teacher need."},
    )
    label_names: list[str] | None = field(
        default_factory=lambda: ["labels"],
        metadata={"help": "The keys of the batch holding the labels."},
    )

    def __post_init__(self) -> None:
        if self.distillation_type not in DISTILLATION_TYPES:
            raise ValueError(
                f"distillation_type={self.distillation_type!r} is not one of {DISTILLATION_TYPES}; use 'soft' (KL with "
                "temperature), 'hard' (teacher's top class, DeiT) or 'none' (labels only)."
            )
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha={self.alpha!r} must be a number in [0, 1] (the weight of the distillation term).")
        if (
            isinstance(self.temperature, bool)
            or not isinstance(self.temperature, (int, float))
            or not math.isfinite(self.temperature)
            or self.temperature <= 0
        ):
            raise ValueError(
                f"temperature={self.temperature!r} must be a finite number > 0 (1.0 leaves the logits as they are)."
            )
        if self.teacher_dtype not in TEACHER_DTYPES:
            raise ValueError(f"teacher_dtype={self.teacher_dtype!r} is not one of {sorted(TEACHER_DTYPES)}.")
        if self.cache_teacher_logits and self.distillation_type == "none":
            raise ValueError(
                "cache_teacher_logits=True needs a teacher, but distillation_type='none' uses none; drop one."
            )
        if self.distillation_type == "hard" and self.temperature != 1.0:
            logger.warning("temperature=%s is ignored by distillation_type='hard'.", self.temperature)
        if self.distillation_type == "none" and self.alpha not in (0.0, 0.5):
            logger.warning("alpha=%s is ignored by distillation_type='none' (labels only).", self.alpha)
        if self.max_steps <= 0 and not (isinstance(self.num_train_epochs, (int, float)) and self.num_train_epochs > 0):
            raise ValueError(
                f"num_train_epochs={self.num_train_epochs!r} with max_steps={self.max_steps!r} trains "
                "nothing; give a positive number of epochs or max_steps > 0."
            )
        if self.label_names is not None and list(self.label_names) != ["labels"]:
            raise ValueError(
                f"label_names={self.label_names!r}: DistillationTrainer reads the labels from 'labels' only."
            )
        if self.dataloader_pin_memory and (self.use_cpu or not torch.cuda.is_available()):
            self.dataloader_pin_memory = False  # pinning needs an accelerator; on the CPU torch warns every epoch
        super().__post_init__()


def _check_teacher(student: nn.Module, teacher: nn.Module) -> None:
    """Fail early when the teacher cannot teach this student: other classes or other input images."""
    if not isinstance(teacher, nn.Module):
        raise TypeError(
            f"teacher_model is a {type(teacher).__name__}; pass a torch.nn.Module classifier (transformers or timm)."
        )
    student_io, teacher_io = adapter_for(student), adapter_for(teacher)
    student_labels, teacher_labels = student_io.num_labels(), teacher_io.num_labels()
    if student_labels is not None and teacher_labels is not None and student_labels != teacher_labels:
        raise ValueError(
            f"The teacher predicts {teacher_labels} classes but the student {student_labels}; distillation needs the same "
            "label set (fine-tune the teacher's head on the student's labels first)."
        )
    (student_size, student_channels), (teacher_size, teacher_channels) = (
        student_io.input_spec(),
        teacher_io.input_spec(),
    )
    if student_size is not None and teacher_size is not None and student_size != teacher_size:
        raise ValueError(
            f"The student expects {student_size}-pixel images but the teacher {teacher_size}: both see the same batch. "
            "Use a teacher built for the student's image size."
        )
    if student_channels is not None and teacher_channels is not None and student_channels != teacher_channels:
        raise ValueError(f"The student expects {student_channels}-channel images but the teacher {teacher_channels}.")


def split_heads(outputs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(class-head logits, distillation-head logits or None) of a student's output."""
    cls_logits = getattr(outputs, "cls_logits", None)
    dist_logits = getattr(outputs, "distillation_logits", None)
    if cls_logits is not None and dist_logits is not None:
        return cls_logits, dist_logits
    if isinstance(outputs, (tuple, list)) and len(outputs) == 2 and all(isinstance(o, torch.Tensor) for o in outputs):
        return outputs[0], outputs[1]  # timm distilled model in training mode with distilled_training=True
    return output_logits(outputs), None


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str, temperature: float
) -> torch.Tensor:
    """Per-example distillation term: T^2-scaled KL (`soft`) or cross-entropy to the teacher's argmax (`hard`)."""
    if kind == "soft":
        t = temperature
        log_p_student = F.log_softmax(student_logits.float() / t, dim=-1)
        log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
        return F.kl_div(log_p_student, log_p_teacher, reduction="none", log_target=True).sum(-1) * (t * t)
    if kind == "hard":
        return F.cross_entropy(student_logits.float(), teacher_logits.argmax(-1), reduction="none")
    raise ValueError(f"Unknown distillation kind {kind!r}; expected 'soft' or 'hard'.")


class _NumericProgressCallback(ProgressCallback):
    """transformers' progress bar, with logged metrics written as numbers (4 significant digits), not strings."""

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if state.is_world_process_zero and self.training_bar is not None and logs:
            shown = {k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in logs.items() if k != "total_flos"}
            self.training_bar.write(str(shown))


class TeacherLogitCache:
    """The teacher's logits of every training example, filled on first use (`cache_teacher_logits=True`): one
    teacher forward pass per example for the whole run, exact while the examples are not randomly augmented."""

    def __init__(self, size: int, num_labels: int | None):
        if num_labels is None:
            raise ValueError(
                "cache_teacher_logits=True needs the number of classes (config.num_labels or num_classes)."
            )
        self.logits = torch.zeros(size, num_labels, dtype=torch.float32)
        self.filled = torch.zeros(size, dtype=torch.bool)

    def check(self, index: torch.Tensor, column: str) -> None:
        """Indices must be positions in the training set (`column` names the dataset's index column)."""
        size = len(self.filled)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= size):
            raise ValueError(
                f"Index column {column!r} holds {int(index.min())}..{int(index.max())}, outside "
                f"0..{size - 1}: it must hold positions in the training set (data.add_index_column)."
            )

    def get(self, index: torch.Tensor) -> torch.Tensor | None:
        """The cached logits of the examples `index`, or None unless every one of them is cached."""
        index = index.cpu()
        return self.logits[index] if bool(self.filled[index].all()) else None

    def put(self, index: torch.Tensor, logits: torch.Tensor) -> None:
        index = index.cpu()
        self.logits[index] = logits.cpu()
        self.filled[index] = True


class DistillationTrainer(Trainer):
    """`Trainer` whose loss mixes the labels with a frozen teacher's predictions (see the module docstring).

    The teacher is any transformers (`.logits`) or timm (tensor) classifier with the student's labels and input size.
    It is frozen, kept in eval mode on the student's device, and is not part of the student's checkpoints.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        args: DistillationTrainingArguments | None = None,
        teacher_model: nn.Module | None = None,
        mixup_fn: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
        **kwargs: Any,
    ) -> None:
        if args is None:
            args = DistillationTrainingArguments(
                output_dir="trainer_output", distillation_type="hard" if teacher_model is not None else "none"
            )
        if not isinstance(args, DistillationTrainingArguments):
            raise TypeError(
                f"args is a {type(args).__name__}; DistillationTrainer needs DistillationTrainingArguments (same fields "
                "plus distillation_type, alpha, temperature, cache_teacher_logits)."
            )
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("DistillationTrainer computes its own loss; do not pass compute_loss_func.")
        if model is None:
            raise ValueError("DistillationTrainer needs the student model (model_init is not supported).")
        if mixup_fn is not None and not (args.dataloader_drop_last and args.per_device_train_batch_size % 2 == 0):
            raise ValueError(
                f"mixup_fn pairs the examples of a batch: it needs an even per_device_train_batch_size (got "
                f"{args.per_device_train_batch_size}) and dataloader_drop_last=True (got {args.dataloader_drop_last})."
            )
        if mixup_fn is not None and args.cache_teacher_logits:
            raise ValueError(
                "mixup_fn mixes every batch anew, so cached teacher logits would be those of other "
                "pixels; set cache_teacher_logits=False (the teacher then runs on each mixed batch)."
            )
        if args.distillation_type != "none" and teacher_model is None:
            raise ValueError(
                f"distillation_type={args.distillation_type!r} needs teacher_model=; pass one, or set distillation_type='none'."
            )
        if args.distillation_type == "none" and teacher_model is not None:
            logger.warning("distillation_type='none': the teacher model is not used.")
            teacher_model = None
        if teacher_model is not None:
            _check_teacher(model, teacher_model)
            check_finite_parameters(teacher_model, "The teacher")
        if isinstance(model, nn.Module):
            check_finite_parameters(model, "The student")
        kwargs.setdefault("data_collator", collate_fn)
        if kwargs.get("train_dataset") is not None:  # raw image / label rows: prepared for the student, labels checked
            kwargs["train_dataset"] = ensure_prepared(
                kwargs["train_dataset"], model, train=not args.cache_teacher_logits
            )
        super().__init__(model=model, args=args, **kwargs)

        # compute_loss normalises by `num_items_in_batch` when the Trainer passes it (it then counts the labels of the
        # whole accumulated batch), so the Trainer must compute it and must not divide the loss again; without it
        # (no labels) compute_loss returns a per-batch mean, which the Trainer divides by the accumulation steps.
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = None
        if self.pop_callback(ProgressCallback) is not None:
            self.add_callback(_NumericProgressCallback)

        self.teacher_model = teacher_model
        self.mixup_fn = mixup_fn
        self.teacher_runner: TeacherRunner | None = None
        if teacher_model is not None:
            teacher_model.to(self._student_device())
            self.teacher_runner = TeacherRunner(
                teacher_model, args.teacher_dtype, args.teacher_channels_last, args.teacher_compile
            )
            self.step_timer = StepTimeCallback(self.teacher_runner)  # logs `teacher_share` of the step time
            self.add_callback(self.step_timer)
        if args.distillation_type != "none" and hasattr(self.model, "set_distilled_training"):
            self.model.set_distilled_training(True)  # timm: train mode returns (cls, dist) logits
            logger.info("timm distilled student: the distillation head learns from the teacher.")
        self._teacher_cache: TeacherLogitCache | None = None
        if not any(p.requires_grad for p in self.model.parameters()):
            raise ValueError(
                "The student has no trainable parameters (was it frozen, e.g. used as a teacher before?); "
                "call student.requires_grad_(True) first."
            )
        self._check_dataset(self.train_dataset)

    # ---- checks before training -------------------------------------------------------------------------------

    def _student_device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _check_dataset(self, dataset: Any) -> None:
        """Fail before training when a batch lacks what the loss needs, or when caching would be wrong."""
        if dataset is not None and hasattr(dataset, "__len__") and len(dataset) == 0:
            raise ValueError("The training set is empty; give train_dataset at least one example.")
        if dataset is None or not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            return
        args = self.args
        if args.cache_teacher_logits:
            transform = dataset_transform(dataset)
            if getattr(transform, "is_random", False):
                raise ValueError(
                    "cache_teacher_logits=True with a randomly augmented training set: the cached logits would be those "
                    "of another augmentation. Turn random augmentation off (prepare_dataset(..., train=False)) or the cache off."
                )
        batch = self.data_collator([dataset[0]])
        if "pixel_values" not in batch:
            raise ValueError(
                f"Training batches have no 'pixel_values' (keys: {sorted(batch)}); use data.prepare_dataset."
            )
        needs_labels = args.distillation_type == "none" or args.alpha < 1
        if needs_labels and "labels" not in batch:
            raise ValueError(
                f"Training batches have no 'labels' (keys: {sorted(batch)}) but alpha={args.alpha} < 1 weights the label "
                "loss; add labels, or set alpha=1.0 to learn from the teacher only."
            )
        if "labels" in batch:
            check_labels(
                batch["labels"],
                adapter_for(self.model).num_labels(),
                "of the first training example",
                allow_all_ignored=True,
            )
        if args.cache_teacher_logits and args.teacher_cache_column not in batch:
            raise ValueError(
                f"cache_teacher_logits=True needs a {args.teacher_cache_column!r} index column in the training set (keys: "
                f"{sorted(batch)}); add it with data.add_index_column(dataset) before prepare_dataset."
            )
        size, channels = adapter_for(self.model).input_spec()
        shape = tuple(batch["pixel_values"].shape[1:])
        expected = (channels, *((size, size) if isinstance(size, int) else size)) if size and channels else None
        if expected is not None and shape != expected:
            raise ValueError(
                f"Training images are {shape} (C, H, W) but the student expects {expected}; resize them "
                "with prepare_dataset(..., image_size=, num_channels=)."
            )

    # ---- teacher -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _teacher_logits(self, pixel_values: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        """Teacher logits (float32), from the cache when every example of the batch is in it."""
        cache = self._logit_cache(index) if self.args.cache_teacher_logits and index is not None else None
        if cache is not None:
            cached = cache.get(index)
            if cached is not None:
                return cached.to(pixel_values.device)
        logits = self.teacher_runner(pixel_values)
        require_finite(
            logits,
            "The teacher's logits",
            f"at training step {self.state.global_step}",
            "Stopping before the student learns from them; check the teacher's weights and the inputs.",
        )
        if cache is not None:
            cache.put(index, logits)
        return logits

    def _logit_cache(self, index: torch.Tensor) -> TeacherLogitCache:
        if self._teacher_cache is None:
            num_labels = adapter_for(self.teacher_model).num_labels() or adapter_for(self.model).num_labels()
            self._teacher_cache = TeacherLogitCache(len(self.train_dataset), num_labels)
        self._teacher_cache.check(index, self.args.teacher_cache_column)
        return self._teacher_cache

    # ---- Trainer hooks -------------------------------------------------------------------------------------------

    def _student_outputs(self, model: nn.Module, inputs: dict[str, Any]) -> Any:
        unwrapped = self.accelerator.unwrap_model(model)
        if adapter_for(unwrapped).accepts_keyword("pixel_values"):
            return model(**inputs)
        return model(inputs["pixel_values"])

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, ImageClassifierOutput]:
        """(1 - alpha) * CE(class head, labels) + alpha * distill(distillation head, teacher), per example, then reduced.

        With `num_items_in_batch` (the labelled examples of the whole accumulated batch, all processes) the sum is
        divided by it, so gradient accumulation equals one larger batch; otherwise the batch mean is returned.
        """
        args = self.args
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        index = inputs.pop(args.teacher_cache_column, None)
        targets = labels
        if self.mixup_fn is not None and model.training and labels is not None:
            if bool(labels.eq(IGNORE_INDEX).any()):
                raise ValueError(
                    f"mixup_fn needs a label for every example, but the batch at training step "
                    f"{self.state.global_step} has {IGNORE_INDEX} (ignored) labels."
                )
            inputs["pixel_values"], targets = self.mixup_fn(inputs["pixel_values"], labels)  # soft targets (B, C)
        outputs = self._student_outputs(model, inputs)
        cls_logits, dist_logits = split_heads(outputs)
        if labels is not None:
            check_labels(
                labels,
                cls_logits.shape[-1],
                f"of the batch at training step {self.state.global_step}",
                allow_all_ignored=True,
            )
        smoothing = args.label_smoothing_factor
        eval_logits = cls_logits if dist_logits is None else (cls_logits + dist_logits) / 2

        if args.distillation_type == "none":
            if labels is None:
                raise ValueError("distillation_type='none' trains on labels, but the batch has no 'labels'.")
            per_example = label_loss(cls_logits, targets, smoothing)
            if dist_logits is not None:
                per_example = (per_example + label_loss(dist_logits, targets, smoothing)) / 2
        else:
            teacher_logits = self._teacher_logits(inputs["pixel_values"], index if model.training else None)
            student_logits = cls_logits if dist_logits is None else dist_logits
            per_example = args.alpha * distillation_loss(
                student_logits, teacher_logits, args.distillation_type, args.temperature
            )
            if args.alpha < 1:
                if labels is None:
                    raise ValueError(f"alpha={args.alpha} < 1 weights the label loss, but the batch has no 'labels'.")
                per_example = per_example + (1 - args.alpha) * label_loss(cls_logits, targets, smoothing)

        if labels is None:
            loss = per_example.mean()
        else:
            mask = labels.ne(IGNORE_INDEX)
            total = per_example.masked_fill(~mask, 0.0).sum()
            if num_items_in_batch is not None:
                loss = total / num_items_in_batch
                if args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                    # num_items_in_batch counts every process's labels while DDP averages the gradients.
                    loss = loss * self.accelerator.num_processes
            else:
                loss = total / mask.sum().clamp(min=1)
        require_finite(
            loss.detach(),
            "The distillation loss",
            f"at training step {self.state.global_step}",
            "Stopping before the student's weights turn NaN; lower the learning rate or check the data.",
        )
        if return_outputs:
            return loss, ImageClassifierOutput(loss=loss, logits=eval_logits)
        return loss

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Evaluation: the training loss when labels are present, and the student's (head-averaged) logits."""
        inputs = self._prepare_inputs(inputs)
        labels = inputs.get("labels")
        with torch.no_grad(), self.compute_loss_context_manager():
            if labels is not None:
                loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
                loss, logits = loss.detach(), outputs.logits.detach()
            else:
                student_inputs = {k: v for k, v in inputs.items() if k != self.args.teacher_cache_column}
                loss, logits = None, output_logits(self._student_outputs(model, student_inputs)).detach()
        if prediction_loss_only:
            return loss, None, None
        return loss, logits, labels

    # ---- checkpoints -------------------------------------------------------------------------------------------------
    # transformers 5.24 saves checkpoints in the original layout (`save_original_format=True`: e.g. ViT's
    # `encoder.layer.*.attention.attention.query`), but `Trainer._load_from_checkpoint` / `_load_best_model` read them
    # back with `load_state_dict(strict=False)`, which silently skips every renamed weight: a resumed ViT restarts
    # its encoder from the initial weights. These overrides load through `from_pretrained`, which maps the names.

    def _load_student_weights(self, checkpoint: str, model: nn.Module | None = None) -> bool:
        """Load a transformers student from `checkpoint` with every weight matched; False when not applicable."""
        unwrapped = self.accelerator.unwrap_model(model if model is not None else self.model)
        weights_file = os.path.join(checkpoint, "model.safetensors")
        if (
            not isinstance(unwrapped, PreTrainedModel)
            or not os.path.isfile(weights_file)
            or self.is_deepspeed_enabled
            or self.is_fsdp_enabled
        ):
            return False
        from .modeling.modeling_pruned import read_safetensors_header

        read_safetensors_header(weights_file)  # a truncated file: an error naming it, not safetensors' own
        state_dict = load_file(weights_file, device="cpu")
        if set(state_dict) != set(unwrapped.state_dict()):
            state_dict = type(unwrapped).from_pretrained(checkpoint, config=unwrapped.config).state_dict()
        unwrapped.load_state_dict(state_dict, strict=True)
        logger.info("Loaded the student's weights from %s.", checkpoint)
        return True

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        if not self._load_student_weights(resume_from_checkpoint, model):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        if not self._load_student_weights(self.state.best_model_checkpoint):
            super()._load_best_model()
