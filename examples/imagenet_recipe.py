#!/usr/bin/env python
"""Paper-scale recipe: prune a model to a target, then distil it with the DeiT training recipe, on 1..N GPUs.

    # one GPU (or the CPU): ImageNet-1k from an imagefolder (train/ and val/ sub-folders), DeiT-B -> 4.2 GMACs
    python examples/imagenet_recipe.py --model timm/deit_base_distilled_patch16_224.fb_in1k \
        --teacher timm/regnety_160.deit_in1k --dataset /data/imagenet --eval-split validation \
        --target-macs 4.2e9 --output-dir deit-4.2G --bf16

    # one node, 8 GPUs (the paper's setting): the same command under torchrun or accelerate
    torchrun --nproc_per_node 8 examples/imagenet_recipe.py ...same arguments...
    accelerate launch --config_file examples/accelerate_config.yaml examples/imagenet_recipe.py ...

    # offline check on the CPU in about a minute (tiny random ViT, 64 images), also with 2 gloo processes:
    python examples/imagenet_recipe.py --smoke --output-dir /tmp/recipe-smoke
    torchrun --nproc_per_node 2 examples/imagenet_recipe.py --smoke --output-dir /tmp/recipe-smoke-ddp

Pruning runs in every process on the same data: Taylor gradients are computed on each process's share of the
calibration batches and summed, and the pruned models are compared by hash before DDP starts. Training resumes
with `--resume <output-dir>/checkpoint-N` (student, optimizer, scheduler, RNG, EMA and augmentation seeds).

Where the defaults come from (P = the paper's scripts, VainF/Isomorphic-Pruning `scripts/finetuning/deit_*.sh` and
`scripts/pruning/deit_*.sh` over its `train.py` / `prune.py`; D = facebookresearch/deit `main.py`):
  epochs 300 (P, D); batch 256 per GPU on 8 GPUs (P; D: 64 per GPU with lr scaled by batch/512); AdamW (P, D),
  lr 5e-4 (P, D) not rescaled (P; --scale-lr applies D's rule), weight decay 0.05 (P, D); cosine schedule, no warmup
  (P: --lr-warmup-epochs 0; D: 5); label smoothing 0.1 (P, D); mixup 0.8 / cutmix 1.0 (P, D), switch prob 0.5 (D);
  RandAugment rand-m9-mstd0.5-inc1 (D; P: torchvision 'ra', magnitude 9); random erasing 0.25 (P, D), pixel mode (D);
  bicubic (P, D); hard distillation, alpha 0.5, teacher regnety_160.deit_in1k (P, D's DeiT-distilled recipe);
  mixed precision (P: --amp); EMA decay 0.99996 (D; P's DeiT scripts train without EMA, its ConvNeXt scripts use
  0.9999); Taylor importance from 50 batches of 64 images (P: --taylor-batchs 50, --train-batch-size 64);
  round_to 2 (P). Not reproduced: repeated augmentation (P: --ra-sampler, D: --repeated-aug), which needs a custom
  sampler the Trainer does not take.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

import torch

from optimum_isoprune import IsomorphicPruner, IsomorphicPruningConfig, load_pruned_model, save_pruned_model
from optimum_isoprune.adapters import adapter_for
from optimum_isoprune.augmentation import (
    DEIT_AUTO_AUGMENT,
    DEIT_CUTMIX,
    DEIT_MIXUP,
    DEIT_RE_PROB,
    DEIT_SMOOTHING,
    AugmentationEpochCallback,
    DeiTTrainTransform,
    deit_mixup,
)
from optimum_isoprune.data import (
    FASHION_MNIST_DIR,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    add_index_column,
    load_fashion_mnist,
    load_image_dataset,
    prepare_dataset,
)
from optimum_isoprune.distillation import DistillationTrainer, DistillationTrainingArguments
from optimum_isoprune.distributed import end_process_group
from optimum_isoprune.ema import EMACallback
from optimum_isoprune.metrics import compute_metrics, evaluate_model
from optimum_isoprune.pruner import load_model

logger = logging.getLogger("imagenet_recipe")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("models")
    g.add_argument("--model", help="model to prune: Hub id, local directory, or timm/<name>")
    g.add_argument("--pruned", help="an already pruned student directory: skip pruning")
    g.add_argument("--teacher", help="teacher (same forms as --model); default: the unpruned --model")
    g = p.add_argument_group("pruning")
    g.add_argument("--target-macs", type=float, default=None)
    g.add_argument("--target-params", type=float, default=None)
    g.add_argument("--pruning-ratio", type=float, default=None, help="instead of a target: the global channel ratio")
    g.add_argument("--num-calibration-batches", type=int, default=50, help="Taylor batches (P: --taylor-batchs 50)")
    g.add_argument("--calibration-batch-size", type=int, default=64, help="(P: --train-batch-size 64)")
    g.add_argument("--round-to", type=int, default=2, help="(P: --round-to 2)")
    g.add_argument(
        "--reconstruction",
        default=None,
        choices=["none", "bias", "least_squares"],
        help="refit after cutting (P: none); default: the package's default, least_squares",
    )
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="fashion-mnist", help="'fashion-mnist', an imagefolder dir, or a Hub id")
    g.add_argument("--data-dir", default=None, help=f"Fashion-MNIST IDX files (default {FASHION_MNIST_DIR})")
    g.add_argument("--train-split", default="train")
    g.add_argument("--eval-split", default="test")
    g.add_argument("--image-column", default="image")
    g.add_argument("--label-column", default="label")
    g.add_argument("--train-limit", type=int, default=None, help="use only the first N training examples")
    g.add_argument("--eval-limit", type=int, default=None, help="use only the first N evaluation examples")
    g.add_argument("--num-workers", type=int, default=8, help="dataloader worker processes per GPU")
    g = p.add_argument_group("DeiT recipe")
    g.add_argument("--epochs", type=float, default=300.0)
    g.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps (beats --epochs)")
    g.add_argument("--batch-size", type=int, default=256, help="per device (P: 256 on 8 GPUs)")
    g.add_argument("--lr", type=float, default=5e-4)
    g.add_argument("--scale-lr", action="store_true", help="D's rule: lr * total batch / 512")
    g.add_argument("--weight-decay", type=float, default=0.05)
    g.add_argument("--warmup-ratio", type=float, default=0.0, help="fraction of the steps warming up, < 1 (P: none)")
    g.add_argument("--smoothing", type=float, default=DEIT_SMOOTHING)
    g.add_argument("--mixup", type=float, default=DEIT_MIXUP, help="mixup alpha (0 with --cutmix 0: no mixing)")
    g.add_argument("--cutmix", type=float, default=DEIT_CUTMIX, help="cutmix alpha")
    g.add_argument(
        "--augmentation",
        choices=["deit", "flip"],
        default="deit",
        help="'deit': timm's RandAugment pipeline with random erasing; 'flip': random flips only",
    )
    g.add_argument("--aa", default=DEIT_AUTO_AUGMENT, help="timm auto-augment policy ('none' to turn it off)")
    g.add_argument("--reprob", type=float, default=DEIT_RE_PROB, help="random erasing probability")
    g.add_argument("--distillation-type", choices=["hard", "soft", "none"], default="hard")
    g.add_argument("--alpha", type=float, default=0.5)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--ema-decay", type=float, default=0.99996, help="EMA of the student's weights (D)")
    g.add_argument("--ema-warmup", action="store_true", help="decay min(decay, (1+step)/(10+step)): for short runs")
    g.add_argument("--no-ema", action="store_true")
    g.add_argument("--max-grad-norm", type=float, default=0.0, help="gradient clipping (P, D: none)")
    g = p.add_argument_group("speed and checkpoints")
    g.add_argument("--bf16", action="store_true", help="bf16 autocast of the student (P: --amp)")
    g.add_argument("--fp16", action="store_true", help="fp16 autocast with loss scaling")
    g.add_argument(
        "--teacher-dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="default: bfloat16 with --bf16, float16 with --fp16, else float32",
    )
    g.add_argument("--teacher-channels-last", action="store_true")
    g.add_argument("--teacher-compile", action="store_true")
    g.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps (0: every epoch)")
    g.add_argument("--save-total-limit", type=int, default=2)
    g.add_argument("--resume", default=None, help="checkpoint directory to resume from ('last': the newest one)")
    g.add_argument("--no-eval", action="store_true", help="no evaluation during training (only at the end)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default="recipe-output")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny random ViT, 64 images, 6 steps of batch 8 with mixup/cutmix and EMA: runs on the CPU",
    )
    args = p.parse_args(argv)
    if not args.smoke and not (args.model or args.pruned):
        p.error("--model (to prune) or --pruned (already pruned) is required, or pass --smoke")
    targets = [t for t in (args.target_macs, args.target_params, args.pruning_ratio) if t is not None]
    if not args.smoke and not args.pruned and len(targets) != 1:
        p.error("give exactly one of --target-macs, --target-params, --pruning-ratio (or --pruned)")
    if args.bf16 and args.fp16:
        p.error("--bf16 and --fp16 exclude each other")
    if args.smoke:
        args.pruning_ratio = args.pruning_ratio if targets else 0.5
        args.num_calibration_batches, args.calibration_batch_size = 4, 8
        args.batch_size, args.num_workers, args.no_eval = min(args.batch_size, 8), 0, True
        args.max_steps = 6 if args.max_steps < 0 else args.max_steps
        args.save_steps = args.save_steps or 3
        args.ema_decay, args.ema_warmup = min(args.ema_decay, 0.9), True
        args.train_limit, args.eval_limit = args.train_limit or 64, args.eval_limit or 32
    return args


def smoke_model() -> torch.nn.Module:
    """A tiny random ViT for 28 px grey images (no download)."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    return ViTForImageClassification(
        ViTConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            image_size=28,
            patch_size=7,
            num_channels=1,
            num_labels=10,
            attn_implementation="eager",
        )
    )


def load_splits(args: argparse.Namespace):
    """(train, eval) `datasets.Dataset`s with `image` / `label` columns."""
    if args.dataset == "fashion-mnist":
        train = load_fashion_mnist(args.train_split, args.data_dir, limit=args.train_limit)
        return train, load_fashion_mnist(args.eval_split, args.data_dir, limit=args.eval_limit)
    train = load_image_dataset(args.dataset, args.train_split, args.image_column, args.label_column)
    evaluation = load_image_dataset(args.dataset, args.eval_split, args.image_column, args.label_column)
    if args.train_limit:
        train = train.select(range(min(args.train_limit, len(train))))
    if args.eval_limit:
        evaluation = evaluation.select(range(min(args.eval_limit, len(evaluation))))
    return train, evaluation


def train_transform(args: argparse.Namespace, model: torch.nn.Module, train_raw):
    """The training set: DeiT's augmentation (or flips only), normalised as the model expects."""
    if args.augmentation == "flip":
        return prepare_dataset(train_raw, train=True, model=model)
    size, channels = adapter_for(model).input_spec()
    if not isinstance(size, int) or channels is None:
        raise ValueError(f"Cannot tell the model's square input size and channels (got {size}, {channels}).")
    known = adapter_for(model).normalization()
    mean, std = (
        known
        if known is not None
        else ((FASHION_MNIST_MEAN, FASHION_MNIST_STD) if channels == 1 else (IMAGENET_MEAN, IMAGENET_STD))
    )
    transform = DeiTTrainTransform(
        size,
        channels,
        mean,
        std,
        auto_augment=None if args.aa == "none" else args.aa,
        re_prob=args.reprob,
        seed=args.seed,
    )
    return train_raw.with_transform(transform)


def training_arguments(args: argparse.Namespace) -> DistillationTrainingArguments:
    """Trainer settings of the recipe; creating them also sets up the process group under torchrun / accelerate."""
    cuda = torch.cuda.is_available()
    teacher_dtype = args.teacher_dtype or ("bfloat16" if args.bf16 else "float16" if args.fp16 else "float32")
    save_strategy = "steps" if args.save_steps else "epoch"
    return DistillationTrainingArguments(
        output_dir=args.output_dir,
        distillation_type=args.distillation_type,
        alpha=args.alpha,
        temperature=args.temperature,
        teacher_dtype=teacher_dtype,
        teacher_channels_last=args.teacher_channels_last,
        teacher_compile=args.teacher_compile,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        lr_scheduler_type="cosine",
        warmup_steps=args.warmup_ratio,  # a float < 1: a fraction of the steps
        label_smoothing_factor=args.smoothing,
        max_grad_norm=args.max_grad_norm,
        bf16=args.bf16,
        fp16=args.fp16,
        dataloader_num_workers=args.num_workers,
        dataloader_drop_last=True,  # mixup pairs examples: every batch even and full (D: drop_last=True)
        eval_strategy="no" if args.no_eval else "epoch",
        save_strategy=save_strategy,
        save_steps=args.save_steps or 500,
        save_total_limit=args.save_total_limit,
        logging_steps=max(1, min(50, args.save_steps or 50)),
        seed=args.seed,
        report_to=[],
        use_cpu=not cuda,
        ddp_backend="gloo" if not cuda and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        ddp_find_unused_parameters=False,  # every student weight takes part in the loss
        disable_tqdm=args.smoke,
    )


def prune(args: argparse.Namespace, model: torch.nn.Module, calibration_raw) -> IsomorphicPruner:
    """Prune `model` to the target; every process runs this (gradients summed, models compared by hash)."""
    config = IsomorphicPruningConfig(
        target_macs=args.target_macs,
        target_params=args.target_params,
        pruning_ratio=args.pruning_ratio,
        importance="taylor",
        round_to=args.round_to,
        num_calibration_batches=args.num_calibration_batches,
        calibration_batch_size=args.calibration_batch_size,
        seed=args.seed,
        **({"reconstruction": args.reconstruction} if args.reconstruction else {}),
    )
    pruner = IsomorphicPruner(model, base_model_name_or_path=None if args.smoke else args.model)
    pruner.prune(config, calibration_dataset=prepare_dataset(calibration_raw, model=model))
    logger.info("%s", pruner.report.summary())
    return pruner


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    training_args = training_arguments(args)  # first: sets up the process group that pruning shares
    if args.scale_lr:
        training_args.learning_rate = args.lr * args.batch_size * training_args.world_size / 512.0
    if args.smoke:
        args.dataset = (
            args.dataset
            if os.path.isfile(os.path.join(args.data_dir or FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz"))
            else "synthetic"
        )
    train_raw, eval_raw = _synthetic_splits() if args.dataset == "synthetic" else load_splits(args)

    model = smoke_model() if args.smoke else (load_model(args.model) if args.model else None)
    if args.pruned:
        student = load_pruned_model(args.pruned)  # transformers or timm, never running code from the folder
    else:
        pruner = prune(args, model, train_raw)
        student = pruner.pruned_model
        if training_args.should_save:
            pruner.save_pretrained(os.path.join(args.output_dir, "pruned"))  # with its report and card
    teacher = None
    if args.distillation_type != "none":
        teacher = load_model(args.teacher) if args.teacher else model
        if teacher is None:
            raise SystemExit("--pruned without --model: pass --teacher (or --distillation-type none).")

    num_labels = adapter_for(student).num_labels()
    mixup = deit_mixup(num_labels, args.mixup, args.cutmix, label_smoothing=args.smoothing)
    callbacks = [AugmentationEpochCallback()]
    ema = None if args.no_ema else EMACallback(args.ema_decay, warmup=args.ema_warmup)
    if ema is not None:
        callbacks.append(ema)
    train_set = train_transform(args, student, add_index_column(train_raw))
    eval_set = prepare_dataset(eval_raw, model=student)
    trainer = DistillationTrainer(
        model=student,
        args=training_args,
        teacher_model=teacher,
        mixup_fn=mixup,
        train_dataset=train_set,
        eval_dataset=eval_set,
        compute_metrics=compute_metrics,
        callbacks=callbacks,
    )
    resume = args.resume
    if resume == "last":
        from transformers.trainer_utils import get_last_checkpoint

        resume = get_last_checkpoint(args.output_dir)
    started = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - started

    results = {
        "steps": output.global_step,
        "world_size": training_args.world_size,
        "train_seconds": seconds,
        "images_per_second": output.metrics.get("train_samples_per_second"),
        "teacher_share": trainer.step_timer.teacher_share() if teacher is not None else None,
    }
    trainer.save_model(args.output_dir)  # every process calls it; the main one writes
    if training_args.should_save:
        results["student"] = evaluate_model(trainer.model, eval_set, batch_size=args.batch_size, disable_tqdm=True)
        if ema is not None:
            save_pruned_model(ema.ema_model, os.path.join(args.output_dir, "ema"))
            results["ema"] = evaluate_model(ema.ema_model, eval_set, batch_size=args.batch_size, disable_tqdm=True)
        with open(os.path.join(args.output_dir, "recipe_results.json"), "w") as handle:
            json.dump(results, handle, indent=2)
        print(json.dumps(results))
    return results


def _synthetic_splits():
    """Random 28x28 grey images with `image` / `label` columns, for --smoke where Fashion-MNIST is not installed."""
    import numpy as np
    from datasets import ClassLabel, Dataset, Features, Image

    def split(n: int, seed: int):
        rng = np.random.default_rng(seed)
        features = Features({"image": Image(), "label": ClassLabel(num_classes=10)})
        images = list(rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8))
        return Dataset.from_dict({"image": images, "label": rng.integers(0, 10, size=n)}, features=features)

    return split(64, 0), split(32, 1)


if __name__ == "__main__":
    main()
    end_process_group()  # a live gloo group can abort the process at exit
