"""`optimum-isoprune`: the console script (prune, distill, evaluate, push, export, demo).

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
from dataclasses import replace
from typing import Any, Sequence

from ._startup import restore_default_handler
from .errors import ConfigurationError, IsoPruneError
from .training_defaults import DISTILLATION_TYPES, TRAINING_DEFAULTS

logger = logging.getLogger("optimum_isoprune.cli")

PROG = "optimum-isoprune"
BUILTIN_DATASETS = ("fashion-mnist", "fashion_mnist")
_UNITS = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_AMOUNT = re.compile(
    r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmgt]?)\s*(?:macs?|flops|params?)?\s*$", re.IGNORECASE
)

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


class CLIError(IsoPruneError):
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


def _target_arg(text: str) -> tuple[float, bool]:
    """A MACs / params target; a bare number that cannot be a model's size (50, 0.5) suggests the percentage."""
    value, share = _amount_arg(text)
    if not share and value < 1000 and not re.search(r"[a-z]", str(text), re.IGNORECASE):
        percent = f"{value * 100:g}%" if value < 1 else f"{value:g}%"
        raise argparse.ArgumentTypeError(
            f"{text!r} reads as {value:g} in absolute units, far below any model; did you mean {percent} "
            "(a share of the model), or an amount with a unit such as 1.2G or 5M?"
        )
    return value, share


def _latency_arg(text: str) -> float:
    """A latency in milliseconds: '20ms', '20' (ms) or '0.02s'."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)\s*(ms|s)?\s*", text, re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a latency; expected milliseconds such as 20ms or 0.02s")
    value = float(match.group(1))
    return value * 1e3 if (match.group(2) or "ms").lower() == "s" else value


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


def load_any_model(name: str, random_weights: bool = False) -> Any:
    """`pruner.load_model` (a pruned checkpoint folder, a transformers folder / Hub id, or `timm/<name>`), with its
    failures said in one line."""
    from .checkpoint import is_pruned_checkpoint

    if random_weights and not name.startswith("timm/") and not is_pruned_checkpoint(name):
        raise CLIError(f"--random-weights works with timm/<name> models only, not {name!r}", exit_code=2)
    if not os.path.exists(name) and (
        name.startswith((".", "/", "~")) or (name.count("/") > 1 and not name.startswith("timm/"))
    ):
        raise CLIError(f"no model folder at {name!r}; give a local folder, a Hub id (org/name) or timm/<name>")
    from .pruner import load_model

    try:
        return load_model(name, random_weights=random_weights)
    except OSError as err:
        if is_pruned_checkpoint(name):
            raise
        raise CLIError(
            f"could not load the model {name!r}: {_first_line(err)} "
            "(a Hub id needs network access or a local cache; a folder needs config.json and weights)"
        ) from err


def load_split(name: str, split: str, limit: int | None = None, data_dir: str | None = None) -> Any:
    """One split of the built-in offline Fashion-MNIST ('fashion-mnist'), a Hub dataset or an imagefolder dir."""
    from .data import load_fashion_mnist, load_image_dataset

    if name.lower() in BUILTIN_DATASETS:
        return load_fashion_mnist(split, data_dir=data_dir, limit=limit)
    if not os.path.exists(name) and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise CLIError(
            f"no such folder: {name!r}; give an imagefolder directory, a Hub dataset id (org/name) "
            f"or {BUILTIN_DATASETS[0]!r}"
        )
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

    try:
        return prepare_dataset(dataset, train=train, model=model, image_processor=processor)
    except ValueError as err:  # the data's classes do not fit the model: said before any work
        raise CLIError(_first_line(err)) from err


def _fingerprint(name: str) -> str:
    """A model or dataset name, plus the size and time of its files when it is a local folder."""
    if not os.path.exists(name):
        return name
    stats = []
    for root, _, files in os.walk(name):
        for file in files:
            info = os.stat(os.path.join(root, file))
            stats.append((os.path.relpath(os.path.join(root, file), name), info.st_size, info.st_mtime_ns))
    return json.dumps([os.path.abspath(name), sorted(stats)])


def cached_evaluation(model_name: str, dataset: str, split: str, limit: int | None, evaluate: Any) -> dict[str, Any]:
    """`evaluate()` (the accuracy of an unchanged model on an unchanged split), remembered in the user cache."""
    import hashlib

    from .demo import default_cache_dir

    key = hashlib.sha256(
        json.dumps([_fingerprint(model_name), _fingerprint(dataset), split, limit]).encode()
    ).hexdigest()
    path = default_cache_dir() / "evaluations.json"
    try:
        cache = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        logger.info("Accuracy of %s on %s/%s from the cache (%s).", model_name, dataset, split, path)
        return cache[key]
    result = evaluate()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        cache[key] = result
        path.write_text(json.dumps(cache, indent=1), encoding="utf-8")
    except OSError as err:  # a read-only cache is no reason to fail
        logger.debug("Could not write %s (%s).", path, err)
    return result


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


# -------------------------------------------------------------------------------------------- commands


def _count_macs(pruner: Any, image_size: int | None) -> float:
    """The model's MACs at --image-size; a size the model cannot run at is a usage error."""
    from .counting import count_macs
    from .guards import image_size_error

    native = pruner.adapter.image_size()
    try:
        return count_macs(pruner.model, image_size=image_size)
    except Exception as error:
        if image_size in (None, native):
            raise
        raise CLIError(str(image_size_error(image_size, native, error)), exit_code=2) from error


def cmd_prune(args: argparse.Namespace) -> int:
    from .card import RANDOM_WEIGHTS_NOTE
    from .checkpoint import check_writable, is_pruned_checkpoint
    from .counting import count_params
    from .pruner import IsomorphicPruner, load_image_processor

    check_writable(args.output)  # before loading and pruning, not after
    if is_pruned_checkpoint(args.output):
        logger.warning("--output %s holds a checkpoint; it will be replaced once pruning succeeds.", args.output)
    model = load_any_model(args.model, random_weights=args.random_weights)
    base_name = args.model + (RANDOM_WEIGHTS_NOTE if args.random_weights else "")  # the card must not claim pretrained
    pruner = IsomorphicPruner(model, base_model_name_or_path=base_name)
    target: dict[str, float] = {}
    if args.target_macs is not None or args.target_params is not None:
        name, (value, share) = (
            ("MACs", args.target_macs) if args.target_macs is not None else ("params", args.target_params)
        )
        total = _count_macs(pruner, args.image_size) if name == "MACs" else count_params(model)
        target["target_macs" if name == "MACs" else "target_params"] = goal = value * total if share else value
        if goal >= total:
            raise CLIError(
                f"the target {format_amount(goal)} {name} is not below the model's {format_amount(total)} "
                f"{name}: nothing to prune; give a smaller amount or a share such as 50%",
                exit_code=2,
            )
        print(
            f"Pruning {args.model}: keeping {format_amount(goal)} of {format_amount(total)} {name} "
            f"({goal / total:.0%}), removing the rest."
        )
    elif args.target_latency is not None:
        target["target_latency"] = args.target_latency
        print(
            f"Pruning {args.model} to {args.target_latency:g} ms per batch of {args.latency_batch_size or 1}, "
            "as measured on this machine (a latency model is timed first, then cached)."
        )
    else:
        target["pruning_ratio"] = args.ratio
        print(
            f"Pruning {args.model}: removing {args.ratio:.0%} of every isomorphic class (heads, MLP neurons, "
            f"channels); the MACs kept follow from it."
        )
    config = config_from_args(args, **target)
    processor = load_image_processor(args.model)
    calibration = None
    if args.calibration_dataset:
        limit = config.num_calibration_batches * config.calibration_batch_size * 4
        dataset = load_split(args.calibration_dataset, args.calibration_split, limit=limit, data_dir=args.data_dir)
        calibration = prepare_for(model, dataset, processor)
    try:
        pruner.prune(config, calibration_dataset=calibration)
    except ConfigurationError as err:  # an option's value the model cannot take (--ignore, --image-size): usage
        raise CLIError(_first_line(err), exit_code=2) from err
    pruner.save_pretrained(args.output, image_processor=processor)
    print(pruner.report.summary())
    print(f"Saved the pruned model to {args.output}")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from .card import save_model_card
    from .checkpoint import check_writable, is_pruned_checkpoint, save_pruned_model
    from .configuration import IsomorphicPruningConfig
    from .distillation import DistillationTrainer
    from .metrics import evaluate_model
    from .pruner import load_image_processor
    from .report import PruningReport

    if not is_pruned_checkpoint(args.student):
        raise CLIError(
            f"--student {args.student!r} is not a pruned checkpoint folder (no pruning_config.json); "
            "make one with `optimum-isoprune prune ... --output DIR`",
            exit_code=2,
        )
    import tempfile

    check_writable(args.output)
    # Everything the save needs is read before training, so a bad folder fails now, not after hours of training.
    report = PruningReport.from_pretrained(args.student)
    pruning_config = IsomorphicPruningConfig.from_pretrained(args.student)
    student = load_any_model(args.student)
    teacher = load_any_model(args.teacher, random_weights=args.random_teacher)
    processor = load_image_processor(args.student)
    train = prepare_for(
        student, load_split(args.dataset, args.train_split, args.limit, args.data_dir), processor, train=True
    )
    test = None
    if args.eval_split:  # loaded (and its labels checked) before training, so a missing split fails in seconds
        try:
            test_rows = load_split(args.dataset, args.eval_split, args.eval_limit, args.data_dir)
        except CLIError as err:
            raise CLIError(
                f"{str(err).rstrip('.')}; pass --eval-split with a split the dataset has, or --eval-split '' to skip "
                "the evaluation (nothing was trained yet)"
            ) from err
        test = prepare_for(student, test_rows, processor)
    before: dict[str, Any] = {}
    if test is not None:  # the base and the pruned model on the same split, so the card shows the change
        print(f"Evaluating the teacher and the pruned student on the {args.eval_split!r} split before training...")

        def teacher_accuracy() -> dict[str, Any]:
            return evaluate_model(teacher, prepare_for(teacher, test_rows, load_image_processor(args.teacher)))

        builtin = args.dataset.lower() in BUILTIN_DATASETS
        data_key = (args.data_dir or args.dataset) if builtin else args.dataset
        before = {
            "before": teacher_accuracy()
            if args.random_teacher
            else cached_evaluation(args.teacher, data_key, args.eval_split, args.eval_limit, teacher_accuracy),
            "pruned_no_finetune": evaluate_model(student, test),
        }
    trainer_dir = tempfile.TemporaryDirectory(prefix="isoprune-distill-")  # the Trainer's scratch folder, removed after
    recipe = replace(
        TRAINING_DEFAULTS, epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate
    )
    training_args = recipe.training_arguments(
        trainer_dir.name,
        max_steps=args.max_steps,
        distillation_type=args.distillation_type,
        alpha=args.alpha,
        temperature=args.temperature,
        use_cpu=args.cpu,
        seed=args.seed,
    )
    trainer = DistillationTrainer(model=student, args=training_args, teacher_model=teacher, train_dataset=train)
    with trainer_dir:
        output = trainer.train()
    student.eval()
    save_pruned_model(student, args.output, pruning_config=pruning_config, report=report, image_processor=processor)
    saved = f"; the distilled weights are saved in {args.output}"
    card: dict[str, Any] = {
        "finetuning": {
            "dataset": args.dataset,
            "split": args.train_split,
            "steps": int(output.global_step),
            "epochs": args.epochs if args.max_steps <= 0 else None,
            "distillation": args.distillation_type,
            "teacher": args.teacher,
            "learning_rate": args.learning_rate,
            "batch_size": args.batch_size,
        }
    }
    try:
        if test is not None:
            after = evaluate_model(student, test)
            metrics = {
                stage: {k: v[k] for k in ("top1", "top5") if k in v} for stage, v in {**before, "after": after}.items()
            }
            card["eval_results"] = {
                "dataset": args.dataset,
                "split": args.eval_split,
                "num_examples": after["num_examples"],
                **metrics,
            }
            print(json.dumps({"split": args.eval_split, **after}))
        if args.latency_repeats:
            from .adapters import adapter_for
            from .latency import compare_latency

            size, channels = adapter_for(student).input_spec()
            card["latency"] = compare_latency(
                teacher,
                student,
                image_size=size or report.image_size,
                num_channels=channels or 3,
                repeats=args.latency_repeats,
                warmup=max(1, args.latency_repeats // 10),
            )
        save_model_card(args.output, report, **card)
    except CLIError as err:
        raise CLIError(f"{err}{saved} (without evaluation or card)", err.exit_code) from err
    except Exception as err:
        raise CLIError(f"{type(err).__name__}: {_first_line(err)}{saved} (without evaluation or card)") from err
    print(f"Saved the distilled model to {args.output}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .metrics import evaluate_model
    from .pruner import load_image_processor

    model = load_any_model(args.model, random_weights=args.random_weights)
    processor = load_image_processor(args.model)
    dataset = prepare_for(model, load_split(args.dataset, args.split, args.limit, args.data_dir), processor)
    result = evaluate_model(model, dataset, batch_size=args.batch_size)
    print(json.dumps({"model": args.model, "dataset": args.dataset, "split": args.split, **result}))
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from .hub import HubPublishError, push_to_hub

    try:
        commit = push_to_hub(
            args.folder,
            args.repo_id,
            token=args.token,
            private=args.private or None,
            revision=args.revision,
            create_pr=args.create_pr,
        )
    except HubPublishError as err:
        raise CLIError(_first_line(err)) from err
    print(f"Pushed {args.folder} to {getattr(commit, 'commit_url', None) or args.repo_id}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import NotACheckpointError, evaluate_onnx, export_onnx, load_for_export, verify_onnx
    from .pruner import load_image_processor
    from .quantization import quantize_onnx

    if args.format != "onnx":
        raise CLIError(f"--format {args.format!r} is not supported; use onnx", exit_code=2)
    if "int8-static" in (args.quantize or []) and not args.calibration_dataset:
        raise CLIError(
            "--quantize int8-static needs --calibration-dataset (the images used for pruning); int8-dynamic needs none",
            exit_code=2,
        )
    local = os.path.exists(args.model) or args.model.startswith((".", "/", "~"))
    try:
        model, source = (
            load_for_export(args.model) if local else (load_any_model(args.model, args.random_weights), None)
        )
    except NotACheckpointError as err:
        raise CLIError(str(err), exit_code=2) from err
    processor = load_image_processor(source) if source else None
    result = export_onnx(
        model, args.output, opset=args.opset, dynamic_batch=not args.static_batch, atol=args.atol, source_dir=source
    )
    print(
        json.dumps(
            {
                "file": result.path,
                "precision": "fp32",
                "opset": result.opset,
                "max_abs_diff": result.max_abs_diff,
                "parity_batch_sizes": result.parity_batch_sizes,
            }
        )
    )
    files = {"fp32": result.path}
    calibration = None
    if args.calibration_dataset:
        dataset = load_split(
            args.calibration_dataset,
            args.calibration_split,
            limit=args.num_calibration_batches * args.calibration_batch_size * 4,
            data_dir=args.data_dir,
        )
        calibration = prepare_for(model, dataset, processor)
    for mode in args.quantize or []:
        files[mode] = quantize_onnx(
            result.path,
            mode,
            calibration_dataset=calibration,
            num_calibration_batches=args.num_calibration_batches,
            calibration_batch_size=args.calibration_batch_size,
            seed=args.seed,
        )
        diff = verify_onnx(files[mode], model, atol=None)
        print(json.dumps({"file": files[mode], "precision": mode, "max_abs_diff": diff}))
    evaluation = None
    if args.eval_dataset:
        evaluation = prepare_for(
            model, load_split(args.eval_dataset, args.eval_split, args.eval_limit, args.data_dir), processor
        )
        if not args.benchmark:
            for mode, path in files.items():
                print(
                    json.dumps(
                        {
                            "file": path,
                            "precision": mode,
                            "split": args.eval_split,
                            **evaluate_onnx(path, evaluation, threads=args.threads),
                        }
                    )
                )
    if args.benchmark:
        from .deployment import benchmark_deployment

        deployment = benchmark_deployment(
            model,
            args.output,
            batch_sizes=args.batch_sizes,
            threads=args.threads,
            rounds=args.rounds,
            eval_dataset=evaluation,
            checkpoint_dir=source,
        )
        for row in deployment["rows"]:
            print(
                json.dumps(
                    {k: row.get(k) for k in ("runtime", "precision", "file", "file_bytes", "latency_ms", "top1")}
                )
            )
        if source and os.path.isfile(os.path.join(source, "pruning_report.json")):
            from .card import save_model_card
            from .report import PruningReport

            save_model_card(args.output, PruningReport.from_pretrained(source), deployment=deployment)
    print(f"Exported {args.model} to {args.output}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo

    overrides = {
        k: v
        for k, v in {
            "teacher_epochs": args.teacher_epochs,
            "distill_epochs": args.distill_epochs,
            "distill_max_steps": args.distill_steps,
            "target_macs_ratio": args.target_macs_ratio,
            "seed": args.seed,
            "num_threads": args.threads,
        }.items()
        if v is not None
    }
    if args.no_cache:
        overrides["use_cache"] = False
    config = DemoConfig.smoke(**overrides) if args.smoke else DemoConfig(**overrides)
    result = run_demo(
        args.output_dir, config=config, data_dir=args.data_dir, cache_dir=args.cache_dir, push_to_hub=args.push_to_hub
    )
    print(result.summary_table())
    if result.push_error:
        raise CLIError(
            f"the push to {args.push_to_hub} failed; the local output in {result.output_dir} is complete: "
            f"{_first_line(Exception(result.push_error))}"
        )
    return 0


# ---------------------------------------------------------------------------------------------- parser


def _add_data_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument(
        "--dataset",
        required=required,
        metavar="NAME_OR_DIR",
        help="'fashion-mnist' (offline, Debian's dataset-fashion-mnist), a Hub dataset id, or an imagefolder directory",
    )
    parser.add_argument("--data-dir", help="folder of Fashion-MNIST's IDX files (default: Debian's)")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' line breaks and appends each option's default (when it has one) to its help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            action.option_strings
            and default not in (None, False, argparse.SUPPRESS)
            and "%(default)" not in text
            and "default" not in text
            and action.help is not argparse.SUPPRESS
        ):
            text += " (default: %(default)s)"
        return text


class _DeprecatedRatio(argparse.Action):
    """`--ratio`: the old name of `--prune-ratio`, kept working with a warning."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        print(
            "warning: --ratio is deprecated, use --prune-ratio (the share REMOVED from every class; "
            "--target-macs 50%% is the share KEPT)".replace("%%", "%"),
            file=sys.stderr,
        )
        setattr(namespace, self.dest, values)


# `prune` has one option per IsomorphicPruningConfig field (help and choices from the field's metadata), except the
# targets, which take units and shares; a few keep shorter names.
_TARGET_FIELDS = ("target_macs", "target_params", "target_latency", "pruning_ratio")
_OPTION_NAMES = {
    "head_pruning_ratio": "--head-ratio",
    "head_dim_pruning_ratio": "--head-dim-ratio",
    "ignored_modules": "--ignore",
}


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    """One option per `IsomorphicPruningConfig` field; unset options keep the config's defaults."""
    from dataclasses import MISSING, fields

    from .configuration import IsomorphicPruningConfig

    for f in fields(IsomorphicPruningConfig):
        if f.name in _TARGET_FIELDS:
            continue
        default = f.default_factory() if f.default is MISSING else f.default
        text = f.metadata["help"].replace("%", "%%").rstrip(".")
        if default not in (None, []):
            text += f" (default: {default})"
        kind = str(f.type).removesuffix("| None").strip()
        options: dict[str, Any] = {"dest": f.name, "default": None, "help": text}
        if "choices" in f.metadata:
            options["choices"] = f.metadata["choices"]
        elif kind == "bool":
            options["action"] = argparse.BooleanOptionalAction
        elif kind == "int":
            options.update(type=int if f.name in ("seed", "search_finalists") else _positive_int, metavar="N")
        elif kind == "float":
            options.update(type=_ratio_arg if f.name.endswith("ratio") else float, metavar="X")
        elif kind == "list[str]":
            options.update(action="append", metavar="MODULE", help=text + "; repeat the option for more")
        parser.add_argument(_OPTION_NAMES.get(f.name, "--" + f.name.replace("_", "-")), **options)


def config_from_args(args: argparse.Namespace, **target: float) -> Any:
    """The `IsomorphicPruningConfig` of `prune`'s options: the options given, the config's defaults for the rest."""
    from dataclasses import fields

    from .configuration import IsomorphicPruningConfig

    given = {f.name: getattr(args, f.name) for f in fields(IsomorphicPruningConfig) if f.name not in _TARGET_FIELDS}
    try:
        return IsomorphicPruningConfig(**target, **{k: v for k, v in given.items() if v is not None})
    except ConfigurationError as err:  # an option's value: bad usage, said in the option's words
        raise CLIError(
            f"invalid option value: {str(err).replace('IsomorphicPruningConfig.', '')}", exit_code=2
        ) from err


def build_parser() -> argparse.ArgumentParser:
    formatter = _HelpFormatter
    parser = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=formatter,
        epilog=EXAMPLES,
        description="Isomorphic Pruning (Fang et al., ECCV 2024) of Hugging Face and timm vision models.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("--quiet", action="store_true", help="only warnings and errors in the log")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    prune = commands.add_parser(
        "prune",
        help="prune a model to a MACs / params budget or ratio",
        formatter_class=formatter,
        epilog="examples:\n  optimum-isoprune prune facebook/deit-base-distilled-patch16-224 --target-macs 4.2G "
        "--calibration-dataset imagenet-1k --output out/deit-4.2G\n"
        "  optimum-isoprune prune ./my-vit --prune-ratio 0.5 --importance magnitude --output out/half\n"
        "  optimum-isoprune prune timm/deit_small_patch16_224 --random-weights --target-macs 1.2G --output out/s",
    )
    prune.add_argument("model", help="Hub id, local folder or timm/<name>")
    target = prune.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--target-macs",
        type=_target_arg,
        metavar="AMOUNT",
        help="MACs per image to KEEP, e.g. 1.2G, or 50%% of the model's",
    )
    target.add_argument(
        "--target-params",
        type=_target_arg,
        metavar="AMOUNT",
        help="parameters to KEEP, e.g. 5M, or 50%% of the model's",
    )
    target.add_argument(
        "--target-latency",
        type=_latency_arg,
        metavar="TIME",
        help="latency per batch on this machine, e.g. 20ms (see --latency-batch-size/-device/-threads)",
    )
    target.add_argument(
        "--prune-ratio",
        dest="ratio",
        type=_ratio_arg,
        metavar="R",
        help="fraction REMOVED from every isomorphic class, e.g. 0.5 (keeps about half the MACs)",
    )
    target.add_argument("--ratio", dest="ratio", type=_ratio_arg, action=_DeprecatedRatio, help=argparse.SUPPRESS)
    prune.add_argument(
        "--calibration-dataset",
        metavar="NAME_OR_DIR",
        help="images for Taylor importance: 'fashion-mnist', a Hub dataset id or an imagefolder dir",
    )
    prune.add_argument("--calibration-split", default="train", help="split of the calibration dataset")
    prune.add_argument("--data-dir", help="folder of Fashion-MNIST's IDX files (default: Debian's)")
    _add_config_options(prune)
    prune.add_argument("--random-weights", action="store_true", help="timm/<name> with random weights (offline tries)")
    prune.add_argument("--output", required=True, metavar="DIR", help="folder for the pruned checkpoint and its card")
    prune.set_defaults(func=cmd_prune)

    distill = commands.add_parser(
        "distill",
        help="recover accuracy: distill a pruned student from a teacher",
        formatter_class=formatter,
        epilog="example:\n  optimum-isoprune distill --student out/half --teacher ./my-vit --dataset fashion-mnist "
        "--epochs 3 --output out/half-kd",
    )
    distill.add_argument("--student", required=True, metavar="DIR", help="pruned checkpoint folder")
    distill.add_argument("--teacher", required=True, metavar="MODEL", help="Hub id, local folder or timm/<name>")
    _add_data_args(distill)
    distill.add_argument("--train-split", default="train", help="split trained on")
    distill.add_argument(
        "--eval-split",
        default="test",
        help="split on which teacher, pruned and distilled student are evaluated ('' to skip)",
    )
    distill.add_argument("--limit", type=_positive_int, help="train on the first N examples only")
    distill.add_argument("--eval-limit", type=_positive_int, help="evaluate on the first N examples only")
    recipe = TRAINING_DEFAULTS
    distill.add_argument("--epochs", type=_positive_float, default=recipe.epochs, help="training epochs")
    distill.add_argument("--max-steps", type=_positive_int, default=-1, help="training steps; overrides --epochs")
    distill.add_argument("--batch-size", type=_positive_int, default=recipe.batch_size, help="training batch size")
    distill.add_argument(
        "--learning-rate", type=float, default=recipe.learning_rate, help="AdamW peak learning rate (cosine decay)"
    )
    distill.add_argument(
        "--distillation-type",
        default=recipe.distillation_type,
        choices=DISTILLATION_TYPES,
        help="soft: KL to the teacher's softened logits; hard: its top class; none: labels only",
    )
    distill.add_argument("--alpha", type=float, default=recipe.alpha, help="weight of the distillation term")
    distill.add_argument(
        "--temperature", type=float, default=recipe.temperature, help="softmax temperature of soft distillation"
    )
    distill.add_argument(
        "--latency-repeats",
        type=int,
        default=30,
        metavar="N",
        help="timed batch-1 forward passes of teacher and student for the card (0 to skip)",
    )
    distill.add_argument("--random-teacher", action="store_true", help="timm/<name> teacher with random weights")
    distill.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    distill.add_argument("--seed", type=int, default=0, help="seed of initialisation and data order")
    distill.add_argument(
        "--output", required=True, metavar="DIR", help="folder for the distilled checkpoint and its card"
    )
    distill.set_defaults(func=cmd_distill)

    evaluate = commands.add_parser(
        "evaluate",
        help="top-1 / top-5 accuracy of a model on a dataset split",
        formatter_class=formatter,
        epilog="example:\n  optimum-isoprune evaluate out/half-kd --dataset fashion-mnist --split test",
    )
    evaluate.add_argument("model", metavar="DIR", help="pruned checkpoint folder, local folder, Hub id or timm/<name>")
    _add_data_args(evaluate)
    evaluate.add_argument("--split", default="test", help="split evaluated")
    evaluate.add_argument("--limit", type=_positive_int, help="first N examples only")
    evaluate.add_argument("--batch-size", type=_positive_int, default=128, help="evaluation batch size")
    evaluate.add_argument("--random-weights", action="store_true", help=argparse.SUPPRESS)
    evaluate.set_defaults(func=cmd_evaluate)

    push = commands.add_parser(
        "push",
        help="upload a saved folder (weights, config, card) to the Hub",
        formatter_class=formatter,
        epilog="example:\n  optimum-isoprune push out/half-kd my-user/vit-half",
    )
    push.add_argument("folder", metavar="DIR", help="a folder written by prune or distill (weights, config, README.md)")
    push.add_argument("repo_id", metavar="REPO", help="namespace/name on the Hub")
    push.add_argument("--private", action="store_true", help="create the repo as private")
    push.add_argument("--revision", help="branch to push to (default: main)")
    push.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    push.add_argument("--token", help="Hub token (default: the logged-in one)")
    push.set_defaults(func=cmd_push)

    export = commands.add_parser(
        "export",
        help="export to ONNX (checked against PyTorch), optionally int8, latency and accuracy",
        formatter_class=formatter,
        description="Write model.onnx (dynamic batch), config.json, preprocessor_config.json and labels.json into "
        "--output (a backbone: its features, no labels); onnxruntime's outputs are checked against PyTorch's on "
        "random inputs (max abs diff "
        "below --atol). Needs the onnx extra: pip install 'optimum-isoprune[onnx]'.",
        epilog="examples:\n  optimum-isoprune export out/half --format onnx --output out/half-onnx\n"
        "  optimum-isoprune export out/half --output out/half-onnx --quantize int8-dynamic int8-static "
        "--calibration-dataset fashion-mnist\n"
        "  optimum-isoprune export out/half --output out/half-onnx --quantize int8-dynamic "
        "--eval-dataset fashion-mnist --benchmark --threads 2",
    )
    export.add_argument(
        "model", metavar="DIR", help="pruned checkpoint folder (or a model folder, Hub id, timm/<name>)"
    )
    export.add_argument("--format", default="onnx", choices=("onnx",))
    export.add_argument("--output", required=True, metavar="DIR", help="folder for model.onnx and its files")
    export.add_argument("--opset", type=int, default=18, help="ONNX opset, 17 to 25 (18)")
    export.add_argument("--static-batch", action="store_true", help="fixed batch size instead of a dynamic one")
    export.add_argument("--atol", type=float, default=1e-4, help="largest allowed |onnxruntime - PyTorch| logit (1e-4)")
    export.add_argument(
        "--quantize",
        nargs="+",
        choices=("int8-dynamic", "int8-static"),
        metavar="MODE",
        help="also write int8 copies: int8-dynamic and/or int8-static (needs --calibration-dataset)",
    )
    export.add_argument("--calibration-dataset", metavar="NAME_OR_DIR", help="images to calibrate int8-static")
    export.add_argument("--calibration-split", default="train")
    export.add_argument("--num-calibration-batches", type=_positive_int, default=8, metavar="N")
    export.add_argument("--calibration-batch-size", type=_positive_int, default=16, metavar="N")
    export.add_argument("--eval-dataset", metavar="NAME_OR_DIR", help="measure the top-1 of every exported file")
    export.add_argument("--eval-split", default="test")
    export.add_argument("--eval-limit", type=_positive_int, metavar="N", help="first N examples only")
    export.add_argument("--data-dir", help="folder of Fashion-MNIST's IDX files (default: Debian's)")
    export.add_argument(
        "--benchmark",
        action="store_true",
        help="time PyTorch vs onnxruntime (vs OpenVINO) side by side; writes deployment.json (and "
        "a card with the deployment table for a pruned checkpoint)",
    )
    export.add_argument("--batch-sizes", type=_positive_int, nargs="+", default=[1, 32], metavar="N")
    export.add_argument("--threads", type=_positive_int, metavar="N", help="CPU threads of every runtime")
    export.add_argument("--rounds", type=_positive_int, default=10, metavar="N", help="timed rounds per batch size")
    export.add_argument("--random-weights", action="store_true", help=argparse.SUPPRESS)
    export.add_argument("--seed", type=int, default=0)
    export.set_defaults(func=cmd_export)

    demo = commands.add_parser(
        "demo",
        help="the main job end to end on Fashion-MNIST, offline (about 8 minutes on 2 cores, 3 with the teacher cached)",
        formatter_class=formatter,
        description="Train a small ViT teacher on Fashion-MNIST (cached for the next run), prune it to a share of "
        "its MACs, distill the student from the teacher, evaluate, time, save and write the model card.",
        epilog="examples:\n  optimum-isoprune demo\n  optimum-isoprune demo --smoke --output-dir /tmp/demo   # seconds\n"
        "  optimum-isoprune demo --target-macs-ratio 0.3 --distill-epochs 5 --push-to-hub my-user/vit-fmnist",
    )
    demo.add_argument(
        "--output-dir",
        default=os.path.join("outputs", "demo"),
        metavar="DIR",
        help="folder for the checkpoint, card, plot and demo_summary.json",
    )
    demo.add_argument("--data-dir", help="folder of Fashion-MNIST's IDX files (default: Debian's)")
    demo.add_argument("--cache-dir", help="where the trained teacher is cached (default: ~/.cache/optimum-isoprune)")
    demo.add_argument("--no-cache", action="store_true", help="always train the teacher, and do not store it")
    demo.add_argument("--teacher-epochs", type=float, metavar="N", help="teacher training epochs (default: 3)")
    demo.add_argument("--distill-epochs", type=float, metavar="N", help="distillation epochs (default: 3)")
    demo.add_argument("--distill-steps", type=int, metavar="N", help="distillation steps (overrides epochs)")
    demo.add_argument("--target-macs-ratio", type=float, metavar="R", help="pruned MACs / teacher MACs (0.5)")
    demo.add_argument("--push-to-hub", metavar="REPO", help="upload the result to this Hub repo at the end")
    demo.add_argument("--smoke", action="store_true", help="tiny model and data subset: seconds, for tests")
    demo.add_argument(
        "--threads",
        type=_positive_int,
        metavar="N",
        help="torch CPU threads (default: one per core; 1 is faster on a machine busy with other work)",
    )
    demo.add_argument("--seed", type=int, help="seed of initialisation, data order and pruning (default: 0)")
    demo.set_defaults(func=cmd_demo)
    return parser


def _configure_logging(debug: bool, quiet: bool) -> None:
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("optimum_isoprune").setLevel(level)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity(logging.INFO if debug else logging.WARNING)
    if quiet:  # "Loading weights" / "Writing model shards" bars
        hf_logging.disable_progress_bar()
    # Offline, every Hub retry logs a warning; the one-line error at the end says what happened.
    logging.getLogger("huggingface_hub").setLevel(logging.DEBUG if debug else logging.ERROR)


def _reject_unknown_options(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """Name a mistyped option first (argparse would only say which required one is missing), with a suggestion."""
    import difflib

    commands = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    current = parser
    for token in argv:
        if token == "--":
            return
        if current is parser and commands is not None and token in commands.choices:
            current = commands.choices[token]
            continue
        if not token.startswith("--") or len(token) < 3:
            continue
        name = token.split("=", 1)[0]
        known = [o for o in current._option_string_actions if o.startswith("--")]
        if any(o.startswith(name) for o in known):  # argparse accepts unambiguous prefixes
            continue
        close = difflib.get_close_matches(name, known, n=1)
        current.error(f"unrecognized option {name}" + (f"; did you mean {close[0]}?" if close else ""))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `optimum-isoprune` and `python -m optimum_isoprune`; returns the exit code."""
    parser = build_parser()
    _reject_unknown_options(parser, sys.argv[1:] if argv is None else list(argv))
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    _configure_logging(args.debug, args.quiet)
    try:
        restore_default_handler()  # from here on Ctrl-C raises KeyboardInterrupt, answered below
        code = int(args.func(args) or 0)
        if "torch.distributed" in sys.modules:  # under torchrun: a live gloo group can abort the process at exit
            from .distributed import end_process_group

            end_process_group()
        return code
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
        print(
            f"{PROG} {args.command}: error: {type(err).__name__}: {_first_line(err)}"
            + ("" if args.debug else " (run with --debug for the traceback)"),
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
