"""The model card: text built from measured numbers (`create_model_card`, `save_model_card`) and the per-layer
width picture (`plot_layer_widths`). Publishing is `hub.py`'s job.

Every function takes a `PruningReport` and/or a saved folder, never a pruner, so it can run (and be tested) on its own.

Shapes of the optional inputs of `create_model_card` (every key optional unless marked):

``eval_results`` — accuracy of three models on ONE dataset split, metrics as fractions in [0, 1]::

    {
        "dataset": "fashion_mnist",          # required: Hub dataset id (or a name)
        "dataset_name": "Fashion-MNIST",     # display name (defaults to "dataset")
        "config": None, "revision": None,    # dataset config / revision when relevant
        "split": "test",                     # required
        "num_examples": 10000,
        "before": {"top1": 0.912, "top5": 0.998},              # the base model
        "pruned_no_finetune": {"top1": 0.401, "top5": 0.87},   # right after pruning
        "after": {"top1": 0.897, "top5": 0.997},               # after fine-tuning / distillation
    }

  Metric keys are "top1" and "top5" (either may be absent). The `model-index` block describes the
  published weights: "after" when given, otherwise "pruned_no_finetune".

``finetuning`` — how the pruned model was trained afterwards::

    {"dataset": "fashion_mnist", "split": "train", "epochs": 3, "steps": 1400,
     "distillation": "hard" | "soft" | "none", "teacher": "org/teacher-id",
     "learning_rate": 1e-3, "batch_size": 128, "train_time_s": 640.0}

``latency`` — ``{"before": measure_latency(base), "after": measure_latency(pruned)}`` (see
`optimum_isoprune.latency.compare_latency`); "before" may be absent.

``deployment`` — `optimum_isoprune.deployment.benchmark_deployment(...)` (also saved as deployment.json)::

    {"machine": "...", "threads": 2, "batch_sizes": [1, 32], "rounds": 10, "rows": [
        {"format": "ONNX", "runtime": "onnxruntime 1.32.0", "precision": "int8 static", "file": "model_int8_static.onnx",
         "file_bytes": 1234, "latency_ms": {"1": 3.1, "32": 61.0}, "top1": 0.85},   # top1 optional
    ]}

``base_model_info`` — what is known about the base model (`base_model_info_from_hub` fills it)::

    {"license": "apache-2.0", "license_name": None, "license_link": None,
     "tags": ["vision", "image-classification"], "pipeline_tag": "image-classification",
     "datasets": ["imagenet-1k"], "checkpoint_bytes": 346_000_000}
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id as _hf_validate_repo_id

from .report import PruningReport

logger = logging.getLogger(__name__)

__all__ = [
    "create_model_card",
    "save_model_card",
    "plot_layer_widths",
    "checkpoint_size",
]

CARD_NAME = "README.md"
WIDTHS_IMAGE_NAME = "layer_widths.png"
TEMPLATE_NAME = "model_card.md"
PIPELINE_TAG = "image-classification"
BACKBONE_PIPELINE_TAG = "image-feature-extraction"  # a backbone without a head, pruned on its features
LIBRARY_NAME = "transformers"
EXTRA_TAGS = ("pruning", "isomorphic-pruning", "optimum")
# The Hub accepts "adapter", "merge", "quantized" and "finetune". A pruned (and usually distilled)
# model is a full set of weights derived from the base: not an adapter, not a merge of several
# models, and not "quantized" (same architecture at lower precision; listing it there would mislead
# people looking for quantizations). "finetune" is the Hub's relation for a full-weight derivative,
# which is what this is; the card's body says it is pruned, with the numbers.
BASE_MODEL_RELATION = "finetune"
PAPER_URL = "https://arxiv.org/abs/2407.04616"
CITATION = """@inproceedings{fang2024isomorphic,
  title         = {Isomorphic Pruning for Vision Models},
  author        = {Fang, Gongfan and Ma, Xinyin and Mi, Michael Bi and Wang, Xinchao},
  booktitle     = {European Conference on Computer Vision (ECCV)},
  year          = {2024},
  eprint        = {2407.04616},
  archivePrefix = {arXiv},
}"""
_METRICS = (("top1", "Top-1 accuracy", "accuracy"), ("top5", "Top-5 accuracy", "top_5_accuracy"))
_EVAL_STAGES = ("before", "pruned_no_finetune", "after")
# Timed passes below which a card shows no speed-up (a median of 3 passes of a tiny model is noise).
MIN_LATENCY_REPEATS = 10
# Appended to the base model's name when the pruned weights were random (`prune --random-weights`).
RANDOM_WEIGHTS_NOTE = " (random weights)"
# Display order of the width kinds in the plot (any other kind follows, alphabetically).
_KIND_ORDER = ("heads", "head_dim", "mlp", "channels", "residual")
_KIND_LABELS = {
    "heads": "attention heads",
    "head_dim": "head dim",
    "mlp": "MLP neurons",
    "channels": "channels",
    "residual": "hidden size (residual stream)",
}


# --------------------------------------------------------------------------------------------- ids


def _hub_id(name: str | None) -> str | None:
    """`name` when it can be a Hub model id (and is not a local path), else None."""
    if not name or os.path.exists(name):
        return None
    try:
        _hf_validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _public_name(name: str | None) -> str | None:
    """A name fit for a public card: a Hub id as it is, a local path as its folder name (no user paths leak)."""
    if not name or _hub_id(name):
        return name
    if os.path.exists(name) or name.startswith((".", "/", "~")) or name.strip("/").count("/") > 1:
        return Path(os.path.abspath(os.path.expanduser(name))).name or name
    return name


def _unit(value: float | None) -> tuple[float, str]:
    """(scale, suffix) of the unit that suits `value`: G, M, K or none."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if value is not None and abs(value) >= scale:
            return scale, suffix
    return 1.0, ""


def format_count(value: float) -> str:
    """3 significant digits with the unit of its magnitude: 1.61e7 -> '16.1M', 1.2e9 -> '1.2G', 512 -> '512'."""
    scale, suffix = _unit(value)
    return f"{value / scale:.3g}{suffix}"


# --------------------------------------------------------------------------------------- numbers


def checkpoint_size(folder: str | os.PathLike) -> int | None:
    """Bytes of the model weights in `folder` (model.safetensors, or the sum of its shards); None if absent."""
    folder = Path(folder)
    single = folder / "model.safetensors"
    if single.is_file():
        return single.stat().st_size
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values())
        return sum((folder / shard).stat().st_size for shard in shards)
    return None


def _fmt_ratio(before: float | None, after: float | None) -> str:
    if not before or after is None:
        return "—"
    return f"{after / before:.3f}× ({after / before - 1:+.1%})"


def _fmt_pair(before: float | None, after: float | None, scale: float) -> tuple[str, str]:
    """Both numbers with the same decimals, enough for 4 significant digits of the smaller one."""
    known = [abs(v) / scale for v in (before, after) if v]
    decimals = max(2, 3 - math.floor(math.log10(min(known)))) if known else 2
    return tuple("—" if v is None else f"{v / scale:.{decimals}f}" for v in (before, after))


def _fmt_pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def _stats_rows(report: PruningReport, size_before: int | None, size_after: int | None) -> list[dict[str, str]]:
    def counted(name: str, before: float, after: float, note: str = "") -> tuple[str, float, float, float]:
        scale, suffix = _unit(max(before or 0, after or 0))
        return (f"{name} ({suffix})" if suffix else name) + note, before, after, scale

    rows = [
        counted("MACs", report.macs_before, report.macs_after),
        counted("FLOPs", 2 * report.macs_before, 2 * report.macs_after, " = 2 × MACs"),
        counted("Parameters", report.params_before, report.params_after),
    ]
    if size_before is not None or size_after is not None:
        rows.append(("Checkpoint size (MB)", size_before, size_after, 1e6))
    table = []
    for name, before, after, scale in rows:
        before_text, after_text = _fmt_pair(before, after, scale)
        table.append({"name": name, "before": before_text, "after": after_text, "ratio": _fmt_ratio(before, after)})
    return table


def _check_eval_results(eval_results: Mapping[str, Any]) -> None:
    for key in ("dataset", "split"):
        if not eval_results.get(key):
            raise ValueError(f"eval_results needs {key!r} (e.g. {{'dataset': 'fashion_mnist', 'split': 'test', ...}}).")
    if not any(eval_results.get(stage) for stage in _EVAL_STAGES):
        raise ValueError(f"eval_results has no metrics: give at least one of {list(_EVAL_STAGES)}.")
    for stage in _EVAL_STAGES:
        for metric, value in (eval_results.get(stage) or {}).items():
            if metric not in {m for m, _, _ in _METRICS}:
                raise ValueError(f"Unknown metric {metric!r} in eval_results[{stage!r}]; use 'top1' and/or 'top5'.")
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(
                    f"eval_results[{stage!r}][{metric!r}] = {value!r}: give accuracy as a fraction in [0, 1] "
                    "(0.8412, not 84.12)."
                )


def _eval_context(eval_results: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not eval_results:
        return None
    _check_eval_results(eval_results)
    stages = [s for s in _EVAL_STAGES if eval_results.get(s)]
    rows = []
    for metric, label, _ in _METRICS:
        values = {s: (eval_results.get(s) or {}).get(metric) for s in _EVAL_STAGES}
        if all(v is None for v in values.values()):
            continue
        final = values["after"] if values["after"] is not None else values["pruned_no_finetune"]
        delta = f"{100 * (final - values['before']):+.2f}" if None not in (final, values["before"]) else "—"
        rows.append({"metric": label, **{s: _fmt_pct(values[s]) for s in _EVAL_STAGES}, "delta": delta})
    dataset = _public_name(eval_results["dataset"])
    return {
        "dataset": dataset,
        "dataset_name": eval_results.get("dataset_name") or dataset,
        "dataset_url": f"https://huggingface.co/datasets/{dataset}" if _hub_id(dataset) else None,
        "config": eval_results.get("config"),
        "split": eval_results["split"],
        "num_examples": eval_results.get("num_examples"),
        "stages": stages,
        "rows": rows,
    }


def _model_index(eval_results: Mapping[str, Any] | None) -> list[EvalResult] | None:
    """EvalResults of the published weights: 'after' when fine-tuned, else 'pruned_no_finetune'."""
    if not eval_results:
        return None
    metrics = eval_results.get("after") or eval_results.get("pruned_no_finetune")
    if not metrics:
        return None
    results = []
    for metric, label, metric_type in _METRICS:
        if metrics.get(metric) is None:
            continue
        results.append(
            EvalResult(
                task_type=PIPELINE_TAG,
                task_name="Image Classification",
                dataset_type=_public_name(eval_results["dataset"]),
                dataset_name=eval_results.get("dataset_name") or _public_name(eval_results["dataset"]),
                dataset_config=eval_results.get("config"),
                dataset_split=eval_results["split"],
                dataset_revision=eval_results.get("revision"),
                metric_type=metric_type,
                metric_name=label,
                metric_value=round(float(metrics[metric]), 6),
            )
        )
    return results or None


def _finetuning_context(finetuning: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not finetuning:
        return None
    parts = []
    length = [
        f"{finetuning[k]:g} {k if finetuning[k] != 1 else k[:-1]}"
        if isinstance(finetuning[k], (int, float))
        else f"{finetuning[k]} {k}"
        for k in ("epochs", "steps")
        if finetuning.get(k) is not None
    ]
    parts.append("Fine-tuned" + (f" for {' / '.join(length)}" if length else ""))
    finetuning = {
        k: _public_name(v) if k in ("dataset", "teacher") and isinstance(v, str) else v for k, v in finetuning.items()
    }
    if finetuning.get("dataset"):
        split = f" ({finetuning['split']} split)" if finetuning.get("split") else ""
        parts.append(f"on `{finetuning['dataset']}`{split}")
    distillation = finetuning.get("distillation")
    if distillation == "none":
        parts.append("with the labels only (no distillation)")
    elif distillation:
        teacher = f" from teacher `{finetuning['teacher']}`" if finetuning.get("teacher") else ""
        parts.append(f"with {distillation} knowledge distillation{teacher}")
    return {
        "sentence": " ".join(parts) + ".",
        "items": [{"key": k, "value": v} for k, v in finetuning.items() if v is not None],
    }


def _latency_context(latency: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not latency:
        return None
    if "median_ms" in latency:  # a single measure_latency() result: the pruned model
        latency = {"after": latency}
    after, before = latency.get("after"), latency.get("before")
    if not after:
        raise ValueError(
            "latency needs an 'after' entry: {'before': measure_latency(base), 'after': measure_latency(pruned)}."
        )
    machines = sorted({m["machine"] for m in (before, after) if m})
    same_setup = (
        before is not None
        and before.get("machine") == after.get("machine")
        and (before.get("input_shape") == after.get("input_shape"))
    )
    rows = [
        {
            "name": "Median latency (ms / batch)",
            "before": f"{before['median_ms']:.2f}" if before else "—",
            "after": f"{after['median_ms']:.2f}",
            "ratio": _fmt_ratio(before["median_ms"], after["median_ms"]) if same_setup else "—",
        }
    ]
    return {
        "rows": rows,
        # Fewer than 10 timed passes cannot carry a speed-up claim: the table shows the medians, nothing more.
        "speedup": f"{before['median_ms'] / after['median_ms']:.2f}" if same_setup and _repeats_ok(after) else None,
        "machines": machines,
        "batch_size": after.get("batch_size"),
        "input_shape": after.get("input_shape"),
        "repeats": after.get("repeats"),
        "warmup": after.get("warmup"),
    }


def _repeats_ok(measurement: Mapping[str, Any]) -> bool:
    return (measurement.get("repeats") or 0) >= MIN_LATENCY_REPEATS


def _deployment_context(deployment: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not deployment:
        return None
    rows = deployment.get("rows") or []
    if not rows:
        raise ValueError("deployment needs 'rows' (see optimum_isoprune.deployment.benchmark_deployment).")
    batch_sizes = [
        str(b)
        for b in deployment.get("batch_sizes") or sorted({k for r in rows for k in r.get("latency_ms", {})}, key=int)
    ]
    reference = rows[0].get("latency_ms", {})
    table = []
    for row in rows:
        latency = row.get("latency_ms", {})
        cells = []
        for b in batch_sizes:
            value = latency.get(b)
            speedup = f" ({reference[b] / value:.2f}×)" if value and reference.get(b) and row is not rows[0] else ""
            cells.append("—" if value is None else f"{value:.2f}{speedup}")
        table.append(
            {
                "format": row.get("format", "—"),
                "runtime": row.get("runtime", "—"),
                "precision": row.get("precision", "—"),
                "file": f"`{row['file']}`" if row.get("file") else "—",
                "size": f"{row['file_bytes'] / 1e6:.2f}" if row.get("file_bytes") is not None else "—",
                "latency": cells,
                "top1": _fmt_pct(row.get("top1")),
            }
        )
    return {
        "rows": table,
        "batch_sizes": batch_sizes,
        "machine": deployment.get("machine"),
        "threads": deployment.get("threads"),
        "rounds": deployment.get("rounds"),
        "eval_examples": deployment.get("eval_examples"),
        "input_shape": ", ".join(str(d) for d in deployment.get("input_shape") or (3, 224, 224)),
    }


def _tags(base_tags: list[str] | None) -> list[str]:
    # Tags with a ':' (license:..., region:..., base_model:..., arxiv:...) are generated by the Hub
    # from other metadata; copying them from the base model would state wrong facts about this repo.
    tags = [t for t in (base_tags or []) if ":" not in t]
    for tag in (PIPELINE_TAG, *EXTRA_TAGS):
        if tag not in tags:
            tags.append(tag)
    return tags


def _template_path() -> Path:
    return Path(str(resources.files("optimum_isoprune") / "templates" / TEMPLATE_NAME))


# ------------------------------------------------------------------------------------------ card


def create_model_card(
    report: PruningReport,
    *,
    eval_results: Mapping[str, Any] | None = None,
    finetuning: Mapping[str, Any] | None = None,
    latency: Mapping[str, Any] | None = None,
    deployment: Mapping[str, Any] | None = None,
    base_model_info: Mapping[str, Any] | None = None,
    model_name: str | None = None,
    repo_id: str | None = None,
    checkpoint_bytes: int | None = None,
    widths_image: str | None = None,
    template_path: str | os.PathLike | None = None,
    timm_checkpoint: bool = False,
) -> ModelCard:
    """Model card of a pruned model, every number taken from `report` and the measured inputs.

    `repo_id` goes into the loading snippets; `checkpoint_bytes` is the size of the pruned weights
    (`checkpoint_size(folder)`); `widths_image` is the path of the width picture relative to the card
    (`save_model_card` draws it); `timm_checkpoint` says the weights are a pruned timm model (loaded by
    `load_pruned_model` only). The input shapes are described in this module's docstring. Local paths
    (base model, datasets, teacher) appear as their folder name only.
    """
    base_model_info = dict(base_model_info or {})
    backbone = _is_backbone_architecture(report.architecture)
    base_name = report.base_model or ""
    random_weights = base_name.endswith(RANDOM_WEIGHTS_NOTE)
    if random_weights:
        base_name = base_name[: -len(RANDOM_WEIGHTS_NOTE)]
    base_id = None if random_weights else _hub_id(base_name)
    model_name = model_name or (repo_id.split("/")[-1] if repo_id else None)
    if model_name is None:
        stem = (_public_name(base_name) or report.architecture).rstrip("/").split("/")[-1]
        model_name = f"{stem}-isopruned-{format_count(report.macs_after)}"
    eval_context = _eval_context(eval_results)
    datasets = [d for d in (base_model_info.get("datasets") or []) if _hub_id(d)]  # local folders stay out of the YAML
    if finetuning and _hub_id(finetuning.get("dataset")) and finetuning["dataset"] not in datasets:
        datasets = [*datasets, finetuning["dataset"]]

    card_data = ModelCardData(
        model_name=model_name,
        base_model=base_id,
        license=base_model_info.get("license"),
        license_name=base_model_info.get("license_name"),
        license_link=base_model_info.get("license_link"),
        library_name=LIBRARY_NAME,
        pipeline_tag=base_model_info.get("pipeline_tag") or (BACKBONE_PIPELINE_TAG if backbone else PIPELINE_TAG),
        tags=_tags(base_model_info.get("tags")),
        datasets=datasets or None,
        metrics=["accuracy"] if eval_context else None,
        eval_results=_model_index(eval_results),
        base_model_relation=BASE_MODEL_RELATION if base_id else None,
        # Both conventions, so a search for either finds the same model: FLOPs = 2 x MACs (one multiply-add each).
        model_stats={
            "image_size": report.image_size,
            "macs": int(report.macs_after),
            "flops": 2 * int(report.macs_after),
            "params": int(report.params_after),
        },
    )
    layers = [
        {
            "name": w.name,
            "kind": "hidden size (residual)" if w.kind == "residual" else w.kind,
            "before": w.before,
            "after": w.after,
            "kept": f"{w.after / w.before:.0%}" if w.before else "—",
        }
        for w in report.layers
    ]
    classes = [
        {"name": c.name, "num_groups": c.num_groups, "before": c.before, "after": c.after, "removed": f"{c.ratio:.1%}"}
        for c in report.classes
    ]
    target = None
    if report.target_macs is not None:
        target = f"{format_count(report.target_macs)} MACs ({format_count(2 * report.target_macs)} FLOPs)"
    elif report.target_params is not None:
        target = f"{format_count(report.target_params)} parameters"
    elif report.target_latency is not None and report.latency:
        lat = report.latency
        target = (
            f"{report.target_latency:.4g} ms per batch of {lat['batch_size']} ({lat['dtype']}, "
            f"{lat['threads']} threads) on {lat['machine']}. The latency model measured on that machine "
            f"predicted {lat['predicted_ms']:.4g} ms; measured end to end: {lat['measured_ms']:.4g} ms "
            f"(base model {lat['base_measured_ms']:.4g} ms, spread of the timed runs "
            f"{lat['measured_spread']:.1%})"
        )
    template_vars = {
        "model_title": model_name,
        "repo_id": repo_id or model_name,
        "base_model": _public_name(base_name) or None,
        "base_model_url": f"https://huggingface.co/{base_id}" if base_id else None,
        "random_weights": random_weights,
        "timm": timm_checkpoint,
        "backbone": backbone,
        "architecture": report.architecture,
        "image_size": report.image_size,
        "stats": _stats_rows(report, base_model_info.get("checkpoint_bytes"), checkpoint_bytes),
        "target": target,
        "target_error": f"{report.target_error:.2%}" if report.target_error is not None else None,
        "ratios": [
            {"name": "Channel pruning ratio", "value": f"{report.pruning_ratio:.4g}"},
            {"name": "Head pruning ratio", "value": f"{report.head_pruning_ratio:.4g}"},
            {"name": "Head-dim pruning ratio", "value": f"{report.head_dim_pruning_ratio:.4g}"},
        ],
        "config_json": json.dumps(report.config, indent=2, sort_keys=True) if report.config else None,
        "reconstruction": _reconstruction_text(report),
        "classes": classes,
        "layers": layers,
        "widths_image": widths_image,
        "eval": eval_context,
        "finetuning": _finetuning_context(finetuning),
        "latency": _latency_context(latency),
        "deployment": _deployment_context(deployment),
        "timings": [{"name": k, "value": f"{v:.2f}"} for k, v in report.timings.items()],
        "peak_memory_mb": f"{report.peak_memory_mb:.0f}" if report.peak_memory_mb is not None else None,
        "paper_url": PAPER_URL,
        "citation": CITATION,
    }
    card = ModelCard.from_template(card_data, template_path=str(template_path or _template_path()), **template_vars)
    # Optional sections leave runs of blank lines behind; Markdown ignores them, readers of README.md do not.
    return ModelCard(re.sub(r"\n{3,}", "\n\n", str(card)))


def _reconstruction_text(report: PruningReport) -> str | None:
    """What the closed-form recovery after surgery did, and how long it took; None when it did not run."""
    if report.reconstruction.get("mode", "none") == "none":
        return None
    from .reconstruction import ReconstructionSummary

    seconds = report.timings.get("reconstruction")
    took = f" in {seconds:.2f} s" if seconds is not None else ""
    return ReconstructionSummary(**report.reconstruction).describe() + took


def save_model_card(
    folder: str | os.PathLike,
    report: PruningReport | None = None,
    **card_kwargs: Any,
) -> ModelCard:
    """Draw the width picture and write README.md into a saved pruned-model folder.

    `report` defaults to the folder's `pruning_report.json`; the checkpoint size is read from the
    folder's weights. Other keyword arguments go to `create_model_card`.
    """
    folder = Path(folder)
    if report is None:
        report = PruningReport.from_pretrained(folder)
    widths_image = None
    if report.layers:
        plot_layer_widths(report, folder / WIDTHS_IMAGE_NAME)
        widths_image = WIDTHS_IMAGE_NAME
    card_kwargs.setdefault("checkpoint_bytes", checkpoint_size(folder))
    card_kwargs.setdefault("timm_checkpoint", _is_timm_folder(folder))
    if not card_kwargs.get("repo_id"):  # not pushed (yet): the snippets load this folder; `push_to_hub` renames it
        card_kwargs["repo_id"] = Path(os.path.abspath(folder)).name
    card = create_model_card(report, widths_image=widths_image, **card_kwargs)
    card.save(folder / CARD_NAME)
    return card


def _is_backbone_architecture(architecture: str) -> bool:
    """Whether the pruned model is a backbone without a head (`ViTModel`, ...: adapters/backbones.py)."""
    from .adapters.backbones import BACKBONE_ADAPTERS

    names = {n for a in BACKBONE_ADAPTERS for n in a.model_types.values()}
    return architecture in names or architecture.removeprefix("Pruned") in names


def _is_timm_folder(folder: Path) -> bool:
    """Whether `folder` holds a timm checkpoint (its config.json names an `architecture`, no `model_type`)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return "architecture" in config and "model_type" not in config


# ------------------------------------------------------------------------------------- picture


def plot_layer_widths(report: PruningReport, path: str | os.PathLike) -> str:
    """Save a PNG with one panel per width kind (heads, head dims, MLP, channels): original vs pruned per layer.

    Uses matplotlib's Agg canvas directly, so it never touches pyplot's global backend.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if not report.layers:
        raise ValueError("The report has no per-layer widths (report.layers is empty); nothing to plot.")
    kinds: dict[str, list] = {}
    rank = {kind: i for i, kind in enumerate(_KIND_ORDER)}
    for width in sorted(report.layers, key=lambda w: (rank.get(w.kind, len(rank)), w.kind)):  # stable panel order
        kinds.setdefault(width.kind, []).append(width)

    figure = Figure(figsize=(max(6.0, 0.35 * max(len(v) for v in kinds.values()) + 2), 2.4 * len(kinds) + 0.8))
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(kinds), 1, squeeze=False)[:, 0]
    for ax, (kind, widths) in zip(axes, kinds.items()):
        positions = list(range(len(widths)))
        ax.bar(positions, [w.before for w in widths], color="#d0d0d0", label="original")
        ax.bar(positions, [w.after for w in widths], color="#e8710a", width=0.6, label="pruned")
        label = _KIND_LABELS.get(kind, kind)
        if kind == "residual":  # one width shared by every block, not a layer of its own
            ax.set_title(f"{label}, shared by all blocks", fontsize=10)
        else:
            ax.set_title(f"{label} per layer", fontsize=10)
        ax.set_ylabel(label if len(label) < 14 else kind)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xticks(positions)
        if kind == "residual":
            ax.set_xticklabels(["hidden size"] * len(widths), fontsize=7)
        else:
            ax.set_xticklabels(
                _short_names([w.name for w in widths]), rotation=90 if len(widths) > 24 else 0, fontsize=7
            )
            ax.set_xlabel("layer (module name, without its common prefix)", fontsize=8)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="upper right", ncols=2, fontsize=8, frameon=False)
    figure.suptitle(
        f"{report.architecture}: {format_count(report.macs_after)} of {format_count(report.macs_before)} MACs kept",
        fontsize=11,
        x=0.02,
        ha="left",
    )
    figure.tight_layout(rect=(0, 0, 1, 0.97))
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=110, format="png")
    return path


def _short_names(names: list[str]) -> list[str]:
    """Drop the dotted prefix and suffix all names share ("vit.encoder.layer.3.mlp" -> "3")."""
    parts = [n.split(".") for n in names]
    if len(parts) < 2:
        return names
    lead = 0
    while all(len(p) > lead + 1 for p in parts) and len({p[lead] for p in parts}) == 1:
        lead += 1
    trail = 0
    while all(len(p) > lead + trail + 1 for p in parts) and len({p[-1 - trail] for p in parts}) == 1:
        trail += 1
    return [".".join(p[lead : len(p) - trail]) for p in parts]
