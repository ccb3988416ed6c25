"""`optimum-isoprune`: the console script (prune, distill, evaluate, push, demo).

Every command prints one clear line on stderr and exits non-zero on failure; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import traceback
from typing import Any, Sequence

from ._startup import restore_default_handler
from .configuration import BUDGET_POLICY_CHOICES, RECONSTRUCTION_CHOICES

logger = logging.getLogger("optimum_isoprune.cli")

PROG = "optimum-isoprune"
BUILTIN_DATASETS = ("fashion-mnist", "fashion_mnist")
_UNITS = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_AMOUNT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmgt]?)\s*(?:macs?|flops|params?)?\s*$", re.IGNORECASE)

EXAMPLES = """\
examples:
  # the main job end to end, offline (Fashion-MNIST teacher -> prune -> distill -> card)
  optimum-isoprune demo --output-dir outputs/demo

  # prune a Hub model to 1.2 GMACs (Taylor importance from 8 calibration batches)
  optimum-isoprune prune facebook/deit-small-distilled-patch16-224 --target-macs 1.2G \\
      --calibration-dataset imagenet-1k --output out/deit-small-1.2G

  # a timm model to 5 M parameters; a local folder to half its MACs, magnitude importance
  optimum-isoprune prune timm/deit_tiny_distilled_patch16_224.fb_in1k --target-params 5M --output out/t
  optimum-isoprune prune ./my-vit --target-macs 50% --importance magnitude --output out/my-vit-half

  # recover accuracy by distilling from the unpruned model, then evaluate and publish
  optimum-isoprune distill --student out/my-vit-half --teacher ./my-vit --dataset ./images --output out/my-vit-half-kd
  optimum-isoprune evaluate out/my-vit-half-kd --dataset ./images --split test
  optimum-isoprune push out/my-vit-half-kd my-user/my-vit-half

Amounts take unit suffixes: 1.2G = 1.2e9, 500M = 5e8, 5M, 300K, or a share of the model: 50%.
"""


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2 for bad usage, 1 otherwise."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# ------------------------------------------------------------------------------------------- units


def parse_amount(text: str | float | int) -> float:
    """'1.2G' -> 1.2e9, '500M' -> 5e8, '5M' -> 5e6, '300k' -> 3e5, '1.2e9' -> 1.2e9 (case-insensitive).

    A trailing 'MACs', 'FLOPs' or 'params' is allowed ('1.2GMACs'). Raises ValueError naming the bad value.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        match = _AMOUNT.match(str(text))
        if not match:
            raise ValueError(
                f"cannot read the amount {text!r}; expected a number with an optional unit K, M, G or T, "
                "e.g. 1.2G, 500M, 5M or 1.2e9"
            )
        value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if not value > 0:
        raise ValueError(f"the amount {text!r} must be positive")
    return value


def parse_target(text: str) -> tuple[float, bool]:
    """(value, is_fraction): '50%' -> (0.5, True), '1.2G' -> (1.2e9, False)."""
    text = str(text).strip()
    if text.endswith("%"):
        try:
            share = float(text[:-1]) / 100
        except ValueError:
            raise ValueError(f"cannot read the share {text!r}; expected e.g. 50%") from None
        if not 0 < share < 1:
            raise ValueError(f"the share {text!r} must be between 0% and 100% (exclusive)")
        return share, True
    return parse_amount(text), False


def format_amount(value: float) -> str:
    """1.2e9 -> '1.2G', 5.74e6 -> '5.74M' (three significant digits)."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


def _amount_arg(text: str) -> tuple[float, bool]:
    try:
        return parse_target(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _ratio_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; expected a ratio in [0, 1), e.g. 0.5") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"ratio {text} must be in [0, 1), e.g. 0.5 removes half of every class")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a positive number")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be a positive integer")
    return value


# ------------------------------------------------------------------------------------- models, data


def is_pruned_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is a local folder written by `save_pruned_model`."""
    from .configuration import CONFIG_NAME

    return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG_NAME))


def load_any_model(name: str, random_weights: bool = False) -> Any:
    """A pruned checkpoint folder, a transformers folder / Hub id, or a `timm/<name>` model."""
    if is_pruned_checkpoint(name):
        from .checkpoint import load_pruned_model

        return load_pruned_model(name)
    if name.startswith("timm/") and random_weights:
        import timm

        return timm.create_model(name[len("timm/"):].split(".")[0], pretrained=False)
    if random_weights:
        raise CLIError(f"--random-weights works with timm/<name> models only, not {name!r}", exit_code=2)
    if not os.path.exists(name) and (name.startswith((".", "/", "~")) or (name.count("/") > 1 and not name.startswith("timm/"))):
        raise CLIError(f"no model folder at {name!r}; give a local folder, a Hub id (org/name) or timm/<name>")
    from .pruner import load_model

    try:
        return load_model(name)
    except OSError as err:
        raise CLIError(
            f"could not load the model {name!r}: {_first_line(err)} "
            "(a Hub id needs network access or a local cache; a folder needs config.json and weights)"
        ) from err


def load_processor(name: str) -> Any | None:
    """The image processor saved with a model, or None (timm names, folders without one, offline Hub ids)."""
    if name.startswith("timm/"):
        return None
    try:
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(name, trust_remote_code=False)
    except Exception as err:  # a missing processor is not an error: the model's config still gives size/channels
        logger.debug("No image processor for %s (%s).", name, err)
        return None


def load_split(name: str, split: str, limit: int | None = None, data_dir: str | None = None) -> Any:
    """One split of the built-in offline Fashion-MNIST ('fashion-mnist'), a Hub dataset or an imagefolder dir."""
    from .data import load_fashion_mnist, load_image_dataset

    if name.lower() in BUILTIN_DATASETS:
        return load_fashion_mnist(split, data_dir=data_dir, limit=limit)
    try:
        dataset = load_image_dataset(name, split=split)
    except (FileNotFoundError, ValueError, OSError) as err:
        raise CLIError(f"could not load split {split!r} of dataset {name!r}: {_first_line(err)}") from err
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return dataset


def prepare_for(model: Any, dataset: Any, processor: Any | None, train: bool = False) -> Any:
    """Attach the transform the model needs: its size and channels, the processor's normalisation if any."""
    from .data import prepare_dataset

    kwargs: dict[str, Any] = {}
    if processor is not None:
        mean, std = getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
        if mean is not None and std is not None:
            kwargs.update(mean=list(mean), std=list(std))
    return prepare_dataset(dataset, train=train, model=model, **kwargs)


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


# -------------------------------------------------------------------------------------------- commands


def cmd_prune(args: argparse.Namespace) -> int:
    from .checkpoint import check_writable
    from .configuration import IsomorphicPruningConfig
    from .counting import count_macs, count_params
    from .pruner import IsomorphicPruner

    check_writable(args.output)  # before loading and pruning, not after
    if is_pruned_checkpoint(args.output):
        logger.warning("--output %s holds a checkpoint; it will be replaced once pruning succeeds.", args.output)
    model = load_any_model(args.model, random_weights=args.random_weights)
    pruner = IsomorphicPruner(model, base_model_name_or_path=args.model)
    target: dict[str, float] = {}
    if args.target_macs is not None:
        value, share = args.target_macs
        target["target_macs"] = value * count_macs(model, image_size=args.image_size) if share else value
    elif args.target_params is not None:
        value, share = args.target_params
        target["target_params"] = value * count_params(model) if share else value
    else:
        target["pruning_ratio"] = args.ratio
    optional = {
        "head_pruning_ratio": args.head_ratio,
        "head_dim_pruning_ratio": args.head_dim_ratio,
        "round_to": args.round_to,
        "num_calibration_batches": args.num_calibration_batches,
        "calibration_batch_size": args.calibration_batch_size,
        "image_size": args.image_size,
        "budget_policy": args.budget_policy,
        "reconstruction": args.reconstruction,
    }
    config = IsomorphicPruningConfig(
        importance=args.importance, grouping=args.grouping, seed=args.seed,
        ignored_modules=args.ignore or [], **target, **{k: v for k, v in optional.items() if v is not None},
    )
    processor = load_processor(args.model)
    calibration = None
    if args.calibration_dataset:
        limit = config.num_calibration_batches * config.calibration_batch_size * 4
        dataset = load_split(args.calibration_dataset, args.calibration_split, limit=limit, data_dir=args.data_dir)
        calibration = prepare_for(model, dataset, processor)
    elif config.importance == "taylor":
        logger.warning("No --calibration-dataset: Taylor importance needs data, using magnitude importance instead.")
    pruner.prune(config, calibration_dataset=calibration)
    pruner.save_pretrained(args.output, image_processor=processor)
    print(pruner.report.summary())
    print(f"Saved the pruned model to {args.output}")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from .checkpoint import check_writable, save_pruned_model
    from .configuration import IsomorphicPruningConfig
    from .distillation import DistillationTrainer, DistillationTrainingArguments
    from .hub import save_model_card
    from .metrics import evaluate_model
    from .report import PruningReport

    if not is_pruned_checkpoint(args.student):
        raise CLIError(f"--student {args.student!r} is not a pruned checkpoint folder (no pruning_config.json); "
                       "make one with `optimum-isoprune prune ... --output DIR`", exit_code=2)
    check_writable(args.output)
    # Everything the save needs is read before training, so a bad folder fails now, not after hours of training.
    report = PruningReport.from_pretrained(args.student)
    pruning_config = IsomorphicPruningConfig.from_pretrained(args.student)
    student = load_any_model(args.student)
    teacher = load_any_model(args.teacher, random_weights=args.random_teacher)
    processor = load_processor(args.student)
    train = prepare_for(student, load_split(args.dataset, args.train_split, args.limit, args.data_dir), processor,
                        train=True)
    training_args = DistillationTrainingArguments(
        output_dir=os.path.join(args.output, "trainer"),
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        weight_decay=0.05,
        lr_scheduler_type="cosine",
        distillation_type=args.distillation_type,
        alpha=args.alpha,
        temperature=args.temperature,
        save_strategy="no",
        report_to="none",
        use_cpu=args.cpu,
        seed=args.seed,
    )
    trainer = DistillationTrainer(model=student, args=training_args, teacher_model=teacher, train_dataset=train)
    output = trainer.train()
    student.eval()
    save_pruned_model(student, args.output, pruning_config=pruning_config, report=report, image_processor=processor)
    saved = f"; the distilled weights are saved in {args.output}"
    card: dict[str, Any] = {
        "finetuning": {
            "dataset": args.dataset, "split": args.train_split, "steps": int(output.global_step),
            "epochs": args.epochs if args.max_steps <= 0 else None, "distillation": args.distillation_type,
            "teacher": args.teacher, "learning_rate": args.learning_rate, "batch_size": args.batch_size,
        }
    }
    try:
        if args.eval_split:
            test = prepare_for(student, load_split(args.dataset, args.eval_split, args.eval_limit, args.data_dir), processor)
            after = evaluate_model(student, test)
            card["eval_results"] = {"dataset": args.dataset, "split": args.eval_split, "num_examples": after["num_examples"],
                                    "after": {k: after[k] for k in ("top1", "top5") if k in after}}
            print(json.dumps({"split": args.eval_split, **after}))
        save_model_card(args.output, report, **card)
    except CLIError as err:
        raise CLIError(f"{err}{saved} (without evaluation or card)", err.exit_code) from err
    except Exception as err:
        raise CLIError(f"{type(err).__name__}: {_first_line(err)}{saved} (without evaluation or card)") from err
    print(f"Saved the distilled model to {args.output}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .metrics import evaluate_model

    model = load_any_model(args.model, random_weights=args.random_weights)
    processor = load_processor(args.model)
    dataset = prepare_for(model, load_split(args.dataset, args.split, args.limit, args.data_dir), processor)
    result = evaluate_model(model, dataset, batch_size=args.batch_size)
    print(json.dumps({"model": args.model, "dataset": args.dataset, "split": args.split, **result}))
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from .hub import HubPublishError, push_to_hub

    try:
        commit = push_to_hub(args.folder, args.repo_id, token=args.token, private=args.private or None,
                             revision=args.revision, create_pr=args.create_pr)
    except HubPublishError as err:
        raise CLIError(_first_line(err)) from err
    print(f"Pushed {args.folder} to {getattr(commit, 'commit_url', None) or args.repo_id}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo

    overrides = {
        k: v for k, v in {
            "teacher_epochs": args.teacher_epochs,
            "distill_epochs": args.distill_epochs,
            "distill_max_steps": args.distill_steps,
            "target_macs_ratio": args.target_macs_ratio,
            "seed": args.seed,
            "num_threads": args.threads,
        }.items() if v is not None
    }
    if args.no_cache:
        overrides["use_cache"] = False
    config = DemoConfig.smoke(**overrides) if args.smoke else DemoConfig(**overrides)
    result = run_demo(args.output_dir, config=config, data_dir=args.data_dir, cache_dir=args.cache_dir,
                      push_to_hub=args.push_to_hub)
    print(result.summary_table())
    if result.push_error:
        raise CLIError(f"the push to {args.push_to_hub} failed; the local output in {result.output_dir} is complete: "
                       f"{_first_line(Exception(result.push_error))}")
    return 0


# ---------------------------------------------------------------------------------------------- parser


def _add_data_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--dataset", required=required, metavar="NAME_OR_DIR",
                        help="'fashion-mnist' (offline, Debian's dataset-fashion-mnist), a Hub dataset id, "
                             "or an imagefolder directory")
    parser.add_argument("--data-dir", help="folder of Fashion-MNIST's IDX files (default: Debian's)")


def build_parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=formatter, epilog=EXAMPLES,
        description="Isomorphic Pruning (Fang et al., ECCV 2024) of Hugging Face and timm vision models.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("--quiet", action="store_true", help="only warnings and errors in the log")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    prune = commands.add_parser(
        "prune", help="prune a model to a MACs / params budget or ratio", formatter_class=formatter,
        epilog="examples:\n  optimum-isoprune prune facebook/deit-base-distilled-patch16-224 --target-macs 4.2G "
               "--calibration-dataset imagenet-1k --output out/deit-4.2G\n"
               "  optimum-isoprune prune ./my-vit --ratio 0.5 --importance magnitude --output out/half\n"
               "  optimum-isoprune prune timm/deit_small_patch16_224 --random-weights --target-macs 1.2G --output out/s",
    )
    prune.add_argument("model", help="Hub id, local folder or timm/<name>")
    target = prune.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-macs", type=_amount_arg, metavar="AMOUNT", help="MACs per image, e.g. 1.2G or 50%%")
    target.add_argument("--target-params", type=_amount_arg, metavar="AMOUNT", help="parameters, e.g. 5M or 50%%")
    target.add_argument("--ratio", type=_ratio_arg, help="fraction of channels removed in every class, e.g. 0.5")
    prune.add_argument("--calibration-dataset", metavar="NAME_OR_DIR",
                       help="images for Taylor importance: 'fashion-mnist', a Hub dataset id or an imagefolder dir")
    prune.add_argument("--calibration-split", default="train", help="split of the calibration dataset (train)")
    prune.add_argument("--data-dir", help="folder of Fashion-MNIST's IDX files (default: Debian's)")
    prune.add_argument("--importance", default="taylor", choices=("taylor", "magnitude", "random"))
    prune.add_argument("--grouping", default="isomorphic", choices=("isomorphic", "global", "uniform"))
    prune.add_argument("--budget-policy", choices=BUDGET_POLICY_CHOICES,
                       help="how a target is split across classes (shared; search scores splits on calibration data)")
    prune.add_argument("--reconstruction", choices=RECONSTRUCTION_CHOICES,
                       help="refit after surgery on the calibration data (least_squares)")
    prune.add_argument("--round-to", type=_positive_int, metavar="N", help="kept widths are multiples of N (8)")
    prune.add_argument("--head-ratio", type=_ratio_arg, help="fraction of attention heads removed")
    prune.add_argument("--head-dim-ratio", type=_ratio_arg, help="fraction of dimensions removed inside heads")
    prune.add_argument("--num-calibration-batches", type=_positive_int, metavar="N")
    prune.add_argument("--calibration-batch-size", type=_positive_int, metavar="N")
    prune.add_argument("--image-size", type=_positive_int, metavar="PX", help="input size (default: the model's)")
    prune.add_argument("--ignore", action="append", metavar="MODULE", help="module whose outputs stay whole (repeat)")
    prune.add_argument("--random-weights", action="store_true", help="timm/<name> with random weights (offline tries)")
    prune.add_argument("--seed", type=int, default=0)
    prune.add_argument("--output", required=True, metavar="DIR", help="folder for the pruned checkpoint and its card")
    prune.set_defaults(func=cmd_prune)

    distill = commands.add_parser(
        "distill", help="recover accuracy: distill a pruned student from a teacher", formatter_class=formatter,
        epilog="example:\n  optimum-isoprune distill --student out/half --teacher ./my-vit --dataset fashion-mnist "
               "--epochs 3 --output out/half-kd",
    )
    distill.add_argument("--student", required=True, metavar="DIR", help="pruned checkpoint folder")
    distill.add_argument("--teacher", required=True, metavar="MODEL", help="Hub id, local folder or timm/<name>")
    _add_data_args(distill)
    distill.add_argument("--train-split", default="train")
    distill.add_argument("--eval-split", default="test", help="split evaluated after training ('' to skip)")
    distill.add_argument("--limit", type=_positive_int, help="train on the first N examples only")
    distill.add_argument("--eval-limit", type=_positive_int, help="evaluate on the first N examples only")
    distill.add_argument("--epochs", type=_positive_float, default=3.0)
    distill.add_argument("--max-steps", type=_positive_int, default=-1, help="training steps; overrides --epochs")
    distill.add_argument("--batch-size", type=_positive_int, default=128)
    distill.add_argument("--learning-rate", type=float, default=5e-4)
    distill.add_argument("--distillation-type", default="soft", choices=("soft", "hard", "none"))
    distill.add_argument("--alpha", type=float, default=0.7, help="weight of the distillation term")
    distill.add_argument("--temperature", type=float, default=2.0)
    distill.add_argument("--random-teacher", action="store_true", help="timm/<name> teacher with random weights")
    distill.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    distill.add_argument("--seed", type=int, default=0)
    distill.add_argument("--output", required=True, metavar="DIR")
    distill.set_defaults(func=cmd_distill)

    evaluate = commands.add_parser(
        "evaluate", help="top-1 / top-5 accuracy of a model on a dataset split", formatter_class=formatter,
        epilog="example:\n  optimum-isoprune evaluate out/half-kd --dataset fashion-mnist --split test",
    )
    evaluate.add_argument("model", metavar="DIR", help="pruned checkpoint folder, local folder, Hub id or timm/<name>")
    _add_data_args(evaluate)
    evaluate.add_argument("--split", default="test")
    evaluate.add_argument("--limit", type=_positive_int, help="first N examples only")
    evaluate.add_argument("--batch-size", type=_positive_int, default=128)
    evaluate.add_argument("--random-weights", action="store_true", help=argparse.SUPPRESS)
    evaluate.set_defaults(func=cmd_evaluate)

    push = commands.add_parser(
        "push", help="upload a saved folder (weights, config, card) to the Hub", formatter_class=formatter,
        epilog="example:\n  optimum-isoprune push out/half-kd my-user/vit-half",
    )
    push.add_argument("folder", metavar="DIR")
    push.add_argument("repo_id", metavar="REPO", help="namespace/name on the Hub")
    push.add_argument("--private", action="store_true")
    push.add_argument("--revision", help="branch to push to")
    push.add_argument("--create-pr", action="store_true")
    push.add_argument("--token", help="Hub token (default: the logged-in one)")
    push.set_defaults(func=cmd_push)

    demo = commands.add_parser(
        "demo", help="the main job end to end on Fashion-MNIST, offline (about 15 minutes on 2 cores)",
        formatter_class=formatter,
        description="Train a small ViT teacher on Fashion-MNIST (cached for the next run), prune it to a share of "
                    "its MACs, distill the student from the teacher, evaluate, time, save and write the model card.",
        epilog="examples:\n  optimum-isoprune demo\n  optimum-isoprune demo --smoke --output-dir /tmp/demo   # seconds\n"
               "  optimum-isoprune demo --target-macs-ratio 0.3 --distill-epochs 5 --push-to-hub my-user/vit-fmnist",
    )
    demo.add_argument("--output-dir", default=os.path.join("outputs", "demo"), metavar="DIR")
    demo.add_argument("--data-dir", help="folder of Fashion-MNIST's IDX files (default: Debian's)")
    demo.add_argument("--cache-dir", help="where the trained teacher is cached (default: ~/.cache/optimum-isoprune)")
    demo.add_argument("--no-cache", action="store_true", help="always train the teacher, and do not store it")
    demo.add_argument("--teacher-epochs", type=float, metavar="N")
    demo.add_argument("--distill-epochs", type=float, metavar="N")
    demo.add_argument("--distill-steps", type=int, metavar="N", help="distillation steps (overrides epochs)")
    demo.add_argument("--target-macs-ratio", type=float, metavar="R", help="pruned MACs / teacher MACs (0.5)")
    demo.add_argument("--push-to-hub", metavar="REPO", help="upload the result to this Hub repo at the end")
    demo.add_argument("--smoke", action="store_true", help="tiny model and data subset: seconds, for tests")
    demo.add_argument("--threads", type=_positive_int, metavar="N",
                      help="torch CPU threads (default: one per core; 1 is faster on a machine busy with other work)")
    demo.add_argument("--seed", type=int)
    demo.set_defaults(func=cmd_demo)
    return parser


def _configure_logging(debug: bool, quiet: bool) -> None:
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("optimum_isoprune").setLevel(level)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity(logging.INFO if debug else logging.WARNING)
    # Offline, every Hub retry logs a warning; the one-line error at the end says what happened.
    logging.getLogger("huggingface_hub").setLevel(logging.DEBUG if debug else logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `optimum-isoprune` and `python -m optimum_isoprune`; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    _configure_logging(args.debug, args.quiet)
    try:
        restore_default_handler()  # from here on Ctrl-C raises KeyboardInterrupt, answered below
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except CLIError as err:
        if args.debug:
            traceback.print_exc()
        print(f"{PROG} {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except Exception as err:  # every other failure: one line, the traceback only with --debug
        if args.debug:
            traceback.print_exc()
        print(f"{PROG} {args.command}: error: {type(err).__name__}: {_first_line(err)}"
              + ("" if args.debug else " (run with --debug for the traceback)"), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
