import numpy as np
import pytest
import torch
from transformers import EvalPrediction, ViTConfig, ViTForImageClassification

from optimum_isoprune import metrics
from optimum_isoprune.metrics import compute_metrics, evaluate_model, topk_correct


def _logits_and_labels():
    logits = np.array(
        [
            [9, 8, 7, 6, 5, 4, 3, 2],  # label 0: top-1
            [9, 8, 7, 6, 5, 4, 3, 2],  # label 4: top-5 only
            [9, 8, 7, 6, 5, 4, 3, 2],  # label 7: neither
            [0, 0, 0, 0, 0, 0, 0, 9],  # label 7: top-1
            [0, 0, 0, 0, 0, 0, 0, 9],  # ignored
        ],
        dtype=np.float32,
    )
    return logits, np.array([0, 4, 7, 7, -100])


def test_top1_top5_by_hand():
    logits, labels = _logits_and_labels()
    assert compute_metrics(EvalPrediction(predictions=logits, label_ids=labels)) == {"top1": 0.5, "top5": 0.75}
    # a tuple of outputs (several model outputs): the first one is the logits
    assert compute_metrics(((logits, logits * 0), labels)) == {"top1": 0.5, "top5": 0.75}


def test_no_top5_for_five_classes_or_fewer():
    logits = np.eye(5, dtype=np.float32)
    assert compute_metrics(EvalPrediction(predictions=logits, label_ids=np.array([0, 1, 2, 3, 0]))) == {"top1": 0.8}


def test_evaluate_metric_when_loadable_gives_the_same_number(monkeypatch):
    class FakeAccuracy:
        def compute(self, predictions, references):
            return {"accuracy": float(np.mean(np.asarray(predictions) == np.asarray(references)))}

    logits, labels = _logits_and_labels()
    monkeypatch.setattr(metrics, "_load_accuracy_metric", lambda: FakeAccuracy())
    assert compute_metrics(EvalPrediction(predictions=logits, label_ids=labels))["top1"] == 0.5
    monkeypatch.setattr(metrics, "_load_accuracy_metric", lambda: None)
    assert compute_metrics(EvalPrediction(predictions=logits, label_ids=labels))["top1"] == 0.5


def test_bad_predictions_are_explained():
    with pytest.raises(ValueError, match="shape"):
        compute_metrics(EvalPrediction(predictions=np.zeros(4), label_ids=np.zeros(4, dtype=int)))
    with pytest.raises(ValueError, match="no labelled"):
        compute_metrics(EvalPrediction(predictions=np.zeros((2, 3)), label_ids=np.array([-100, -100])))


def test_topk_matches_torch_topk():
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(200, 10)), rng.integers(0, 10, size=200)
    top5 = torch.from_numpy(logits).topk(5, dim=-1).indices.numpy()
    assert topk_correct(logits, labels, 5) == int((top5 == labels[:, None]).any(-1).sum())


def _dataset(n=20, num_labels=10):
    g = torch.Generator().manual_seed(0)
    return [{"pixel_values": torch.randn(1, 28, 28, generator=g), "labels": int(i % num_labels)} for i in range(n)]


def test_evaluate_model_matches_compute_metrics_for_transformers_and_plain_tensor_models():
    torch.manual_seed(0)
    vit = ViTForImageClassification(
        ViTConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=28,
            patch_size=7,
            num_channels=1,
            num_labels=10,
        )
    )
    data = _dataset()
    with torch.no_grad():
        logits = vit(pixel_values=torch.stack([d["pixel_values"] for d in data])).logits.numpy()
    labels = np.array([d["labels"] for d in data])
    expected = compute_metrics(EvalPrediction(predictions=logits, label_ids=labels))
    vit.train()
    result = evaluate_model(vit, data, batch_size=7, disable_tqdm=True)
    assert vit.training  # mode restored
    assert result == {**expected, "num_examples": 20}

    class TensorModel(torch.nn.Module):  # timm-style: positional input, tensor output
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(pixel_values=x).logits

    assert evaluate_model(TensorModel(vit), data, batch_size=8, disable_tqdm=True) == result
