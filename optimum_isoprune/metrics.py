"""Top-1 / top-5 accuracy for `Trainer` (`compute_metrics`) and for a plain evaluation loop (`evaluate_model`)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .adapters import adapter_for

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


@functools.lru_cache(maxsize=1)
def _load_accuracy_metric() -> Any | None:
    """`evaluate`'s "accuracy" metric, or None when it cannot be loaded (offline: it lives on the Hub)."""
    try:
        import evaluate

        return evaluate.load("accuracy")
    except Exception as error:  # any failure means "use numpy", which gives the same number
        logger.debug("evaluate.load('accuracy') failed (%s); computing accuracy with numpy.", error)
        return None


def topk_correct(logits: np.ndarray, labels: np.ndarray, k: int) -> int:
    """Number of rows whose label is among the k largest logits (labels equal to -100 are skipped)."""
    logits = np.asarray(logits)
    labels = np.asarray(labels).reshape(-1)
    keep = labels != IGNORE_INDEX
    logits, labels = logits[keep], labels[keep]
    if k == 1:
        return int((logits.argmax(-1) == labels).sum())
    top = np.argpartition(-logits, kth=k - 1, axis=-1)[:, :k]
    return int((top == labels[:, None]).any(-1).sum())


def _as_logits(predictions: Any) -> np.ndarray:
    """Trainer passes a tuple when the model returns several tensors; the first one holds the logits."""
    while isinstance(predictions, (tuple, list)):
        predictions = predictions[0]
    return np.asarray(predictions)


def compute_metrics(eval_pred: Any) -> dict[str, float]:
    """`Trainer` metric: `top1` accuracy, and `top5` when there are more than 5 classes."""
    if isinstance(eval_pred, (tuple, list)):
        predictions, label_ids = eval_pred[0], eval_pred[1]
    else:
        predictions, label_ids = eval_pred.predictions, eval_pred.label_ids
    logits = _as_logits(predictions)
    labels = np.asarray(_as_logits(label_ids)).reshape(-1)
    if logits.ndim != 2 or len(logits) != len(labels):
        raise ValueError(f"Expected (N, num_labels) logits for N={len(labels)} labels, got shape {logits.shape}.")
    keep = labels != IGNORE_INDEX
    count = int(keep.sum())
    if count == 0:
        raise ValueError("compute_metrics got no labelled examples (all labels are -100 or the eval set is empty).")
    metric = _load_accuracy_metric()
    if metric is not None:
        top1 = float(metric.compute(predictions=logits[keep].argmax(-1), references=labels[keep])["accuracy"])
    else:
        top1 = topk_correct(logits, labels, 1) / count
    results = {"top1": top1}
    if logits.shape[-1] > 5:
        results["top5"] = topk_correct(logits, labels, 5) / count
    return results


def evaluate_model(
    model: torch.nn.Module,
    dataset: Any,
    batch_size: int = 128,
    device: str | torch.device | None = None,
    collate_fn: Callable | None = None,
    num_workers: int = 0,
    disable_tqdm: bool = False,
) -> dict[str, float]:
    """Top-1 (and top-5 for more than 5 classes) accuracy of a classifier over a dataset of `pixel_values` / `labels`.

    A `datasets.Dataset` of raw `image` / `label` rows is prepared for the model first (`data.prepare_dataset`).
    """
    from .data import collate_fn as default_collate
    from .data import ensure_prepared

    dataset = ensure_prepared(dataset, model)
    if len(dataset) == 0:
        raise ValueError("evaluate_model got an empty dataset.")
    if device is None:
        device = next(model.parameters()).device
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn or default_collate, num_workers=num_workers
    )
    adapter = adapter_for(model)
    was_training = model.training
    model.eval()
    correct1 = correct5 = count = 0
    num_classes = None
    try:
        with torch.inference_mode():
            for batch in tqdm(loader, desc="Evaluating", disable=disable_tqdm, leave=False):
                if "labels" not in batch:
                    raise ValueError(f"evaluate_model needs `labels` in each batch; got keys {sorted(batch)}.")
                logits = adapter.predict(batch["pixel_values"].to(device)).float().cpu().numpy()
                labels = batch["labels"].numpy()
                num_classes = logits.shape[-1]
                correct1 += topk_correct(logits, labels, 1)
                if num_classes > 5:
                    correct5 += topk_correct(logits, labels, 5)
                count += int((labels != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("evaluate_model found no labelled examples (all labels are -100).")
    results = {"top1": correct1 / count}
    if num_classes is not None and num_classes > 5:
        results["top5"] = correct5 / count
    results["num_examples"] = count
    return results
