"""The main job end to end, offline, on Fashion-MNIST: teacher -> isomorphic pruning -> distillation -> card.

`run_demo` trains a small ViT teacher (cached under the user cache directory, keyed by its settings),
prunes it to a fraction of its MACs with `IsomorphicPruner` (Taylor importance from training images),
distills the pruned student from the teacher with `DistillationTrainer`, measures top-1 / top-5 and
CPU latency of teacher, pruned and student, saves the checkpoint with its pruning config, report and
image processor, and writes the model card and the width picture. `optimum-isoprune demo` runs it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from .configuration import IsomorphicPruningConfig
from .counting import count_macs, count_params
from .data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, add_index_column, load_fashion_mnist, prepare_dataset
from .metrics import evaluate_model
from .pruner import IsomorphicPruner
from .report import PruningReport, format_count
from .training_defaults import TRAINING_DEFAULTS

logger = logging.getLogger(__name__)

SUMMARY_NAME = "demo_summary.json"
TEACHER_DIR_PREFIX = "demo-teacher-"
TEACHER_INFO_NAME = "teacher_training.json"
DATASET_ID = "zalando-datasets/fashion_mnist"
DATASET_NAME = "Fashion-MNIST"
# Not a valid Hub id on purpose: the card must not link the locally trained teacher to a Hub repo.
TEACHER_NAME = "ViT teacher trained on Fashion-MNIST (optimum-isoprune demo)"
_TEACHER_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "patch_size",
    "image_size",
    "teacher_epochs",
    "teacher_learning_rate",
    "batch_size",
    "train_limit",
    "seed",
)


@dataclass
class DemoConfig:
    """Settings of one demo run; the defaults take about 8 minutes on 2 CPU cores (teacher cached: about 3)."""

    hidden_size: int = field(default=96, metadata={"help": "Teacher ViT hidden size."})
    num_hidden_layers: int = field(default=4, metadata={"help": "Teacher ViT depth."})
    num_attention_heads: int = field(default=4, metadata={"help": "Teacher ViT heads per layer."})
    intermediate_size: int = field(default=384, metadata={"help": "Teacher ViT MLP width."})
    patch_size: int = field(default=7, metadata={"help": "Patch size (28 px images: 7 gives 16 patches)."})
    image_size: int = field(default=28, metadata={"help": "Input resolution (Fashion-MNIST is 28 px)."})
    teacher_epochs: float = field(default=3.0, metadata={"help": "Teacher training epochs."})
    teacher_learning_rate: float = field(default=1e-3, metadata={"help": "Teacher AdamW peak learning rate."})
    distill_epochs: float = field(
        default=TRAINING_DEFAULTS.epochs, metadata={"help": "Distillation epochs of the pruned student."}
    )
    distill_max_steps: int = field(default=-1, metadata={"help": "Distillation steps; overrides epochs when > 0."})
    distill_learning_rate: float = field(
        default=TRAINING_DEFAULTS.learning_rate, metadata={"help": "Student AdamW peak learning rate."}
    )
    distillation_type: str = field(
        default=TRAINING_DEFAULTS.distillation_type, metadata={"help": "'soft' (KL), 'hard' (DeiT) or 'none'."}
    )
    alpha: float = field(default=TRAINING_DEFAULTS.alpha, metadata={"help": "Weight of the distillation term."})
    temperature: float = field(
        default=TRAINING_DEFAULTS.temperature, metadata={"help": "Softmax temperature of soft distillation."}
    )
    batch_size: int = field(
        default=TRAINING_DEFAULTS.batch_size, metadata={"help": "Training batch size (teacher and student)."}
    )
    target_macs_ratio: float = field(default=0.5, metadata={"help": "Pruned MACs as a fraction of the teacher's."})
    importance: str = field(default="taylor", metadata={"help": "Importance criterion of the pruner."})
    num_calibration_batches: int = field(default=8, metadata={"help": "Calibration batches (Taylor importance)."})
    calibration_batch_size: int = field(default=64, metadata={"help": "Images per calibration batch."})
    round_to: int = field(default=8, metadata={"help": "Kept widths are multiples of this."})
    train_limit: int | None = field(default=None, metadata={"help": "Use only the first N training images."})
    test_limit: int | None = field(default=None, metadata={"help": "Use only the first N test images."})
    eval_batch_size: int = field(default=256, metadata={"help": "Evaluation batch size."})
    latency_repeats: int = field(default=50, metadata={"help": "Timed forward passes per latency measurement."})
    latency_batch_sizes: tuple[int, ...] = field(default=(1, 256), metadata={"help": "Batch sizes timed."})
    use_cache: bool = field(default=True, metadata={"help": "Reuse / store the trained teacher in the cache dir."})
    cache_teacher_logits: bool = field(
        default=True, metadata={"help": "Run the teacher once per training image (the student then sees no flips)."}
    )
    num_threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default: torch's choice)."})
    seed: int = field(default=0, metadata={"help": "Seed of initialisation, data order and pruning."})

    def __post_init__(self) -> None:
        if not 0.0 < self.target_macs_ratio < 1.0:
            raise ValueError(
                f"target_macs_ratio={self.target_macs_ratio!r} must be in (0, 1), e.g. 0.5 for half the MACs."
            )
        for name in ("teacher_epochs", "distill_epochs"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be positive.")
        for name in ("train_limit", "test_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value!r} must be a positive number of images, or None for the whole split.")
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size={self.patch_size} must divide image_size={self.image_size}.")
        self.latency_batch_sizes = tuple(self.latency_batch_sizes)

    @classmethod
    def smoke(cls, **overrides: Any) -> "DemoConfig":
        """Tiny settings that run the whole job in seconds (tests, CI): tiny model, 512 images, no cache."""
        settings: dict[str, Any] = dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            teacher_epochs=1,
            distill_epochs=1,
            train_limit=512,
            test_limit=256,
            batch_size=64,
            num_calibration_batches=2,
            calibration_batch_size=32,
            round_to=2,
            latency_repeats=10,
            latency_batch_sizes=(1, 32),
            use_cache=False,
            eval_batch_size=128,
        )
        settings.update(overrides)
        return cls(**settings)

    def teacher_key(self) -> str:
        """A short hash of everything the teacher's weights depend on (the cache key)."""
        values = {name: getattr(self, name) for name in _TEACHER_FIELDS}
        text = json.dumps(values, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def teacher_settings(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _TEACHER_FIELDS}


@dataclass
class DemoResult:
    """What the demo measured; saved as `demo_summary.json` beside the checkpoint."""

    output_dir: str
    teacher_dir: str | None
    teacher_cached: bool
    accuracy: dict[str, dict[str, float]]
    macs: dict[str, int]
    params: dict[str, int]
    latency: dict[str, dict[str, float]]
    timings: dict[str, float]
    settings: dict[str, Any]
    machine: str
    files: list[str] = field(default_factory=list)
    pushed_to: str | None = None
    push_error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DemoResult":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, path: str | os.PathLike) -> str:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")
        return os.fspath(path)

    def summary_table(self) -> str:
        """A plain-text table: MACs, params, accuracy and latency of teacher, pruned and student; time per step."""
        stages = (("teacher", "teacher"), ("pruned", "pruned, no fine-tune"), ("student", "student (distilled)"))

        def acc(stage: str, metric: str) -> str:
            value = self.accuracy.get(stage, {}).get(metric)
            return "—" if value is None else f"{100 * value:.2f}"

        header = f"{'':26}" + "".join(f"{label:>22}" for _, label in stages)
        rows = [
            ("MACs", [format_count(self.macs[s]) for s, _ in stages]),
            ("Params", [format_count(self.params[s]) for s, _ in stages]),
            ("Top-1 (%)", [acc(s, "top1") for s, _ in stages]),
            ("Top-5 (%)", [acc(s, "top5") for s, _ in stages]),
        ]
        for batch, values in sorted(self.latency.items(), key=lambda kv: int(kv[0])):
            rows.append(
                (
                    f"Latency, batch {batch} (ms)",
                    [f"{values['teacher']:.2f}", "(as student)", f"{values['student']:.2f}"],
                )
            )
        lines = [header] + [f"{name:26}" + "".join(f"{v:>22}" for v in values) for name, values in rows]
        top1 = self.accuracy["student"]["top1"] - self.accuracy["teacher"]["top1"]
        lines.append(
            f"Student vs teacher: {self.macs['student'] / self.macs['teacher']:.1%} of the MACs, "
            f"{self.params['student'] / self.params['teacher']:.1%} of the parameters, {100 * top1:+.2f} top-1 points."
        )
        cached = " (teacher loaded from cache)" if self.teacher_cached else ""
        lines.append("Time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in self.timings.items()) + cached)
        lines.append(f"Machine: {self.machine}")
        lines.append(f"Saved to {self.output_dir}")
        if self.pushed_to:
            lines.append(f"Pushed to https://huggingface.co/{self.pushed_to}")
        return "\n".join(lines)


def default_cache_dir() -> Path:
    """`$OPTIMUM_ISOPRUNE_CACHE`, else `$XDG_CACHE_HOME/optimum-isoprune`, else `~/.cache/optimum-isoprune`."""
    if os.environ.get("OPTIMUM_ISOPRUNE_CACHE"):
        return Path(os.environ["OPTIMUM_ISOPRUNE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "optimum-isoprune"


def build_teacher(config: DemoConfig) -> nn.Module:
    """A randomly initialised one-channel ViT classifier for Fashion-MNIST's ten classes."""
    from transformers import ViTConfig, ViTForImageClassification

    from .data import FASHION_MNIST_LABELS

    torch.manual_seed(config.seed)
    vit_config = ViTConfig(
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        image_size=config.image_size,
        patch_size=config.patch_size,
        num_channels=1,
        num_labels=len(FASHION_MNIST_LABELS),
        id2label=dict(enumerate(FASHION_MNIST_LABELS)),
        label2id={label: i for i, label in enumerate(FASHION_MNIST_LABELS)},
    )
    return ViTForImageClassification(vit_config)


def build_image_processor(config: DemoConfig) -> Any:
    """The processor that turns a grey image into the model's input (same normalisation as training)."""
    from transformers import ViTImageProcessor

    return ViTImageProcessor(
        do_resize=True,
        size={"height": config.image_size, "width": config.image_size},
        image_mean=list(FASHION_MNIST_MEAN),
        image_std=list(FASHION_MNIST_STD),
    )


def _training_args(
    output_dir: str,
    config: DemoConfig,
    *,
    epochs: float,
    learning_rate: float,
    steps_per_epoch: int,
    max_steps: int = -1,
    **kwargs: Any,
) -> Any:
    total = max_steps if max_steps > 0 else math.ceil(epochs * steps_per_epoch)
    recipe = replace(TRAINING_DEFAULTS, epochs=epochs, batch_size=config.batch_size, learning_rate=learning_rate)
    return recipe.training_arguments(
        output_dir,
        max_steps=max_steps,
        warmup_steps=max(1, total // 20),
        logging_strategy="steps",
        logging_steps=max(1, total // 4),
        eval_strategy="no",
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        seed=config.seed,
        disable_tqdm=False,
        **kwargs,
    )


def train_teacher(config: DemoConfig, train_dataset: Any, work_dir: str) -> tuple[nn.Module, float]:
    """Train the teacher on the labels (DistillationTrainer with distillation_type='none'); returns (model, seconds)."""
    from .distillation import DistillationTrainer

    model = build_teacher(config)
    steps_per_epoch = math.ceil(len(train_dataset) / config.batch_size)
    args = _training_args(
        work_dir,
        config,
        epochs=config.teacher_epochs,
        learning_rate=config.teacher_learning_rate,
        steps_per_epoch=steps_per_epoch,
        distillation_type="none",
    )
    started = time.perf_counter()
    logger.info(
        "Training the teacher: %d parameters, %.3g epochs of %d steps.",
        count_params(model),
        config.teacher_epochs,
        steps_per_epoch,
    )
    DistillationTrainer(model=model, args=args, train_dataset=train_dataset).train()
    model.eval()
    return model, time.perf_counter() - started


def load_or_train_teacher(
    config: DemoConfig, train_dataset: Any, work_dir: str, cache_dir: str | os.PathLike | None = None
) -> tuple[nn.Module, Path | None, bool, float]:
    """The cached teacher for these settings if there is one, else a freshly trained one (then cached).

    Returns (teacher, its cache folder or None, whether it came from the cache, training seconds).
    """
    from transformers import ViTForImageClassification

    folder = (
        Path(cache_dir or default_cache_dir()) / f"{TEACHER_DIR_PREFIX}{config.teacher_key()}"
        if config.use_cache
        else None
    )
    if folder is not None and (folder / "model.safetensors").is_file() and (folder / TEACHER_INFO_NAME).is_file():
        info = json.loads((folder / TEACHER_INFO_NAME).read_text(encoding="utf-8"))
        logger.info("Loading the cached teacher from %s (trained in %.0f s).", folder, info.get("train_time_s", 0))
        teacher = ViTForImageClassification.from_pretrained(folder)
        return teacher.eval(), folder, True, float(info.get("train_time_s", 0.0))
    teacher, seconds = train_teacher(config, train_dataset, work_dir)
    if folder is not None:
        # Write next to the final folder, then rename: an interrupted run never leaves a half-written teacher.
        folder.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
        teacher.save_pretrained(partial)
        info = {"settings": config.teacher_settings(), "train_time_s": seconds}
        (partial / TEACHER_INFO_NAME).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        if folder.exists():
            shutil.rmtree(folder)
        partial.rename(folder)
        logger.info("Cached the teacher in %s.", folder)
    return teacher, folder, False, seconds


def distill_student(
    config: DemoConfig, student: nn.Module, teacher: nn.Module, train_dataset: Any, work_dir: str
) -> dict[str, Any]:
    """Distill the pruned student from the teacher in place; returns the fine-tuning facts for the card."""
    from .distillation import DistillationTrainer

    steps_per_epoch = math.ceil(len(train_dataset) / config.batch_size)
    args = _training_args(
        work_dir,
        config,
        epochs=config.distill_epochs,
        learning_rate=config.distill_learning_rate,
        steps_per_epoch=steps_per_epoch,
        max_steps=config.distill_max_steps,
        distillation_type=config.distillation_type,
        alpha=config.alpha,
        temperature=config.temperature,
        cache_teacher_logits=config.cache_teacher_logits,
    )
    started = time.perf_counter()
    trainer = DistillationTrainer(model=student, args=args, teacher_model=teacher, train_dataset=train_dataset)
    output = trainer.train()
    student.eval()
    facts: dict[str, Any] = {
        "dataset": DATASET_ID,
        "split": "train",
        "epochs": config.distill_epochs if config.distill_max_steps <= 0 else None,
        "steps": int(output.global_step),
        "distillation": config.distillation_type,
        "teacher": TEACHER_NAME,
        "alpha": config.alpha,
        "temperature": config.temperature if config.distillation_type == "soft" else None,
        "learning_rate": config.distill_learning_rate,
        "batch_size": config.batch_size,
        "teacher_logits_cached": config.cache_teacher_logits,
        "train_time_s": round(time.perf_counter() - started, 1),
    }
    return facts


@contextlib.contextmanager
def _step(timings: dict[str, float], name: str) -> Iterator[None]:
    logger.info("== %s ==", name)
    started = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - started


def run_demo(
    output_dir: str | os.PathLike = "outputs/demo",
    config: DemoConfig | None = None,
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    push_to_hub: str | None = None,
) -> DemoResult:
    """Run the whole job (see the module docstring) and return what it measured.

    With `push_to_hub`, the saved folder is uploaded at the end; a failed upload is recorded in
    `result.push_error` (the local folder stays complete) instead of raising.
    """
    from .hub import HubPublishError, validate_repo_id
    from .hub import push_to_hub as hub_push
    from .latency import describe_machine, measure_latency

    config = config or DemoConfig()
    if push_to_hub:
        validate_repo_id(push_to_hub)  # fail before the long part, not after it
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    timings: dict[str, float] = {}
    total_started = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="isoprune-demo-") as work_dir:
        with _step(timings, "data"):
            train = load_fashion_mnist("train", data_dir=data_dir, limit=config.train_limit)
            test = load_fashion_mnist("test", data_dir=data_dir, limit=config.test_limit)
            # The teacher is trained here, so its processor's normalisation is the one given explicitly.
            size = dict(image_size=config.image_size, num_channels=1, mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD)
            train_augmented = prepare_dataset(train, train=True, **size)
            train_plain = prepare_dataset(train, train=False, **size)
            # The student sees fixed images (no flips) so the teacher's logits can be cached, keyed by position.
            train_student = (
                prepare_dataset(add_index_column(train), train=False, **size)
                if config.cache_teacher_logits
                else train_augmented
            )
            test = prepare_dataset(test, train=False, **size)

        with _step(timings, "teacher"):
            teacher, teacher_dir, cached, teacher_seconds = load_or_train_teacher(
                config, train_augmented, os.path.join(work_dir, "teacher"), cache_dir
            )

        with _step(timings, "prune"):
            pruner = IsomorphicPruner(teacher, base_model_name_or_path=TEACHER_NAME)
            macs_teacher = count_macs(teacher)
            pruning_config = IsomorphicPruningConfig(
                target_macs=config.target_macs_ratio * macs_teacher,
                importance=config.importance,
                round_to=config.round_to,
                num_calibration_batches=config.num_calibration_batches,
                calibration_batch_size=config.calibration_batch_size,
                seed=config.seed,
            )
            pruned = pruner.prune(pruning_config, calibration_dataset=train_plain)
            report: PruningReport = pruner.report

        accuracy: dict[str, dict[str, float]] = {}
        with _step(timings, "evaluate"):
            for name, model in (("teacher", teacher), ("pruned", pruned)):
                result = evaluate_model(model, test, batch_size=config.eval_batch_size)
                accuracy[name] = {k: float(v) for k, v in result.items() if k in ("top1", "top5")}
                logger.info("%s: %s", name, accuracy[name])
        macs = {"teacher": report.macs_before, "pruned": report.macs_after}
        params = {"teacher": report.params_before, "pruned": report.params_after}

        student = pruned  # distilled in place: "pruned" above is measured before any fine-tuning
        with _step(timings, "distill"):
            finetuning = distill_student(config, student, teacher, train_student, os.path.join(work_dir, "student"))

        with _step(timings, "evaluate"):
            result = evaluate_model(student, test, batch_size=config.eval_batch_size)
            accuracy["student"] = {k: float(v) for k, v in result.items() if k in ("top1", "top5")}
        macs["student"], params["student"] = count_macs(student), count_params(student)

    with _step(timings, "latency"):
        latency: dict[str, dict[str, float]] = {}
        card_latency: dict[str, Any] = {}
        for batch in tqdm(config.latency_batch_sizes, desc="Latency (teacher, student)", leave=False):
            kwargs = dict(
                image_size=config.image_size,
                num_channels=1,
                batch_size=batch,
                repeats=config.latency_repeats,
                warmup=max(1, config.latency_repeats // 10),
            )
            before, after = measure_latency(teacher, **kwargs), measure_latency(student, **kwargs)
            latency[str(batch)] = {"teacher": before["median_ms"], "student": after["median_ms"]}
            if not card_latency:
                card_latency = {"before": before, "after": after}

    with _step(timings, "save"):
        if output.joinpath("config.json").exists():
            logger.info("Overwriting the checkpoint in %s.", output)
        eval_results = {
            "dataset": DATASET_ID,
            "dataset_name": DATASET_NAME,
            "split": "test",
            "num_examples": len(test),
            "before": accuracy["teacher"],
            "pruned_no_finetune": accuracy["pruned"],
            "after": accuracy["student"],
        }
        # `student` is the pruner's own pruned model, distilled in place: save_pretrained writes its weights.
        pruner.save_pretrained(
            output,
            image_processor=build_image_processor(config),
            eval_results=eval_results,
            finetuning=finetuning,
            latency=card_latency,
            base_model_info={"license": "apache-2.0", "datasets": [DATASET_ID]},
            model_name=f"vit-fashion-mnist-isopruned-{round(100 * config.target_macs_ratio)}pct-macs",
            repo_id=push_to_hub,
        )

    timings["total"] = time.perf_counter() - total_started
    if cached:
        timings["teacher (first run, training)"] = teacher_seconds
    result = DemoResult(
        output_dir=os.fspath(output),
        teacher_dir=os.fspath(teacher_dir) if teacher_dir else None,
        teacher_cached=cached,
        accuracy=accuracy,
        macs=macs,
        params=params,
        latency=latency,
        timings={k: round(v, 2) for k, v in timings.items()},
        settings=asdict(config),
        machine=describe_machine(),
        files=sorted(p.name for p in output.iterdir()),
    )
    result.files = sorted(set(result.files) | {SUMMARY_NAME})
    result.save(output / SUMMARY_NAME)

    if push_to_hub:
        try:
            hub_push(output, push_to_hub)
            result.pushed_to = push_to_hub
        except (HubPublishError, ValueError, FileNotFoundError) as err:
            result.push_error = str(err)
            logger.error("%s", err)
        result.save(output / SUMMARY_NAME)
    return result
