#!/usr/bin/env python
"""Fine-tune a (pruned) student with knowledge distillation from its teacher.

    # Fashion-MNIST from Debian's dataset-fashion-mnist, a pruned student saved by IsomorphicPruner:
    python examples/distill.py --teacher ./vit-teacher --student ./vit-pruned --dataset fashion-mnist \
        --distillation-type hard --alpha 0.5 --epochs 1 --output-dir ./vit-pruned-distilled

    # an imagefolder directory (one sub-folder per class) or a Hub dataset id:
    python examples/distill.py --teacher ./teacher --student ./student --dataset ./my_images --eval-split test

    # offline check in seconds, on tiny random ViTs:
    python examples/distill.py --smoke --output-dir /tmp/distill-smoke

Models are transformers checkpoints (directories or Hub ids, loaded with `trust_remote_code=True` so pruned
students load) or timm models written `timm:<name>`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

import torch

from optimum_isoprune.data import (
    FASHION_MNIST_DIR,
    add_index_column,
    load_fashion_mnist,
    load_image_dataset,
    prepare_dataset,
)
from optimum_isoprune.distillation import DistillationTrainer, DistillationTrainingArguments
from optimum_isoprune.distributed import end_process_group
from optimum_isoprune.metrics import compute_metrics, evaluate_model

logger = logging.getLogger("distill")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", help="teacher: transformers checkpoint dir / Hub id, or timm:<name>")
    parser.add_argument("--student", help="student (e.g. a pruned checkpoint dir): same forms as --teacher")
    parser.add_argument("--dataset", default="fashion-mnist", help="'fashion-mnist', an imagefolder dir, or a Hub id")
    parser.add_argument("--data-dir", default=None, help=f"Fashion-MNIST IDX files (default {FASHION_MNIST_DIR})")
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--eval-split", default="test")
    parser.add_argument("--train-limit", type=int, default=None, help="use only the first N training examples")
    parser.add_argument("--eval-limit", type=int, default=None, help="use only the first N evaluation examples")
    parser.add_argument("--distillation-type", choices=["soft", "hard", "none"], default="hard")
    parser.add_argument("--alpha", type=float, default=0.5, help="weight of the distillation term in [0, 1]")
    parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of soft distillation")
    parser.add_argument(
        "--cache-teacher-logits", action="store_true", help="run the teacher once per example (no flips)"
    )
    parser.add_argument("--no-flip", action="store_true", help="no random horizontal flips (implied by the cache)")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (overrides --epochs)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="distilled-student")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny random ViTs and 64 examples: runs offline in seconds"
    )
    args = parser.parse_args(argv)
    if not args.smoke and args.student is None:
        parser.error("--student is required (or pass --smoke)")
    if not args.smoke and args.teacher is None and args.distillation_type != "none":
        parser.error(f"--distillation-type {args.distillation_type} needs --teacher (or use --distillation-type none)")
    return args


def load_classifier(name: str) -> torch.nn.Module:
    """A transformers image classifier (directory or Hub id) or a timm model (`timm:<name>`)."""
    if name.startswith("timm:"):
        import timm

        return timm.create_model(name[len("timm:") :], pretrained=True)
    from transformers import AutoModelForImageClassification

    return AutoModelForImageClassification.from_pretrained(name, trust_remote_code=True)


def tiny_vit(hidden: int, seed: int, num_labels: int = 10) -> torch.nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        image_size=28,
        patch_size=7,
        num_channels=1,
        num_labels=num_labels,
    )
    return ViTForImageClassification(config)


def synthetic_split(n: int, seed: int):
    """Random 28x28 grey images with `image` / `label` columns, for --smoke where Fashion-MNIST is not installed."""
    import numpy as np
    from datasets import ClassLabel, Dataset, Features, Image

    rng = np.random.default_rng(seed)
    features = Features({"image": Image(), "label": ClassLabel(num_classes=10)})
    images = list(rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8))
    return Dataset.from_dict({"image": images, "label": rng.integers(0, 10, size=n)}, features=features)


def load_splits(args: argparse.Namespace):
    if args.smoke:
        if os.path.isfile(os.path.join(args.data_dir or FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")):
            return load_fashion_mnist("train", args.data_dir, limit=64), load_fashion_mnist(
                "test", args.data_dir, limit=32
            )
        return synthetic_split(64, 0), synthetic_split(32, 1)
    if args.dataset == "fashion-mnist":
        return (
            load_fashion_mnist(args.train_split, args.data_dir, limit=args.train_limit),
            load_fashion_mnist(args.eval_split, args.data_dir, limit=args.eval_limit),
        )
    train, evaluation = (
        load_image_dataset(args.dataset, args.train_split),
        load_image_dataset(args.dataset, args.eval_split),
    )
    if args.train_limit:
        train = train.select(range(min(args.train_limit, len(train))))
    if args.eval_limit:
        evaluation = evaluation.select(range(min(args.eval_limit, len(evaluation))))
    return train, evaluation


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.smoke:
        teacher, student = tiny_vit(48, seed=1), tiny_vit(32, seed=0)
        args.max_steps = 4 if args.max_steps < 0 else args.max_steps
        args.batch_size = min(args.batch_size, 16)
    else:
        student = load_classifier(args.student)
        teacher = load_classifier(args.teacher) if args.distillation_type != "none" else None
    train_raw, eval_raw = load_splits(args)
    random_flip = not (args.no_flip or args.cache_teacher_logits)
    if args.cache_teacher_logits:
        train_raw = add_index_column(train_raw)
    train_set = prepare_dataset(train_raw, train=random_flip, model=student)
    eval_set = prepare_dataset(eval_raw, model=student)

    training_args = DistillationTrainingArguments(
        output_dir=args.output_dir,
        distillation_type=args.distillation_type,
        alpha=args.alpha,
        temperature=args.temperature,
        cache_teacher_logits=args.cache_teacher_logits,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        warmup_steps=0 if args.smoke else 50,
        weight_decay=0.05,
        eval_strategy="no" if args.smoke else "epoch",
        save_strategy="no" if args.smoke else "epoch",
        save_total_limit=1,
        logging_steps=10,
        seed=args.seed,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
    )
    trainer = DistillationTrainer(
        model=student,
        args=training_args,
        teacher_model=teacher,
        train_dataset=train_set,
        eval_dataset=eval_set,
        compute_metrics=compute_metrics,
    )
    start = time.perf_counter()
    train_result = trainer.train()
    seconds = time.perf_counter() - start
    trainer.save_model()
    results = {
        "distillation_type": args.distillation_type,
        "steps": train_result.global_step,
        "seconds_per_step": seconds / max(train_result.global_step, 1),
        "student": evaluate_model(trainer.model, eval_set, batch_size=args.batch_size),
    }
    if teacher is not None:
        results["teacher"] = evaluate_model(teacher, eval_set, batch_size=args.batch_size)
    with open(os.path.join(args.output_dir, "distillation_results.json"), "w") as handle:
        json.dump(results, handle, indent=2)
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
    end_process_group()  # a live gloo group can abort the process at exit
