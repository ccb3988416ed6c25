"""card.py: model cards built from the measured numbers, and the width picture."""

from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results

from optimum_isoprune.card import (
    BASE_MODEL_RELATION,
    CITATION,
    checkpoint_size,
    create_model_card,
    plot_layer_widths,
    save_model_card,
)
from optimum_isoprune.report import ClassAmount, LayerWidth, PruningReport

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_report(**overrides) -> PruningReport:
    """Round numbers so the expected card text can be written out by hand."""
    values = dict(
        base_model="facebook/deit-small-patch16-224",
        architecture="ViTForImageClassification",
        macs_before=4_000_000_000,
        macs_after=1_000_000_000,
        params_before=20_000_000,
        params_after=5_000_000,
        image_size=224,
        target_macs=1.0e9,
        pruning_ratio=0.5,
        head_pruning_ratio=0.5,
        head_dim_pruning_ratio=0.25,
        classes=[ClassAmount("heads", 12, 72, 36), ClassAmount("mlp", 12, 18432, 9216)],
        layers=[LayerWidth(f"vit.encoder.layer.{i}.attention", "heads", 6, 3) for i in range(12)]
        + [LayerWidth(f"vit.encoder.layer.{i}.mlp.fc1", "mlp", 1536, 768) for i in range(12)],
        timings={"graph": 0.25, "prune": 1.5},
        config={"target_macs": 1.0e9, "importance": "taylor", "round_to": 8},
    )
    values.update(overrides)
    return PruningReport(**values)


EVAL = {
    "dataset": "fashion_mnist",
    "split": "test",
    "num_examples": 10000,
    "before": {"top1": 0.9125, "top5": 0.9981},
    "pruned_no_finetune": {"top1": 0.4012, "top5": 0.8733},
    "after": {"top1": 0.8975, "top5": 0.9969},
}
FINETUNING = {
    "dataset": "fashion_mnist",
    "split": "train",
    "epochs": 3,
    "steps": 1407,
    "distillation": "hard",
    "teacher": "me/teacher-vit",
}
MACHINE = "Test CPU (CPU), 2 cores, 2 torch threads, torch 2.14.1"
LATENCY = {
    "before": {
        "median_ms": 12.5,
        "machine": MACHINE,
        "batch_size": 1,
        "input_shape": [1, 3, 224, 224],
        "repeats": 30,
        "warmup": 5,
    },
    "after": {
        "median_ms": 5.0,
        "machine": MACHINE,
        "batch_size": 1,
        "input_shape": [1, 3, 224, 224],
        "repeats": 30,
        "warmup": 5,
    },
}
BASE_INFO = {
    "license": "apache-2.0",
    "tags": ["vision", "image-classification", "region:us", "license:apache-2.0"],
    "pipeline_tag": "image-classification",
    "checkpoint_bytes": 88_000_000,
}


def full_card(**overrides) -> ModelCard:
    kwargs = dict(
        eval_results=EVAL,
        finetuning=FINETUNING,
        latency=LATENCY,
        base_model_info=BASE_INFO,
        repo_id="me/deit-small-iso-1G",
        checkpoint_bytes=22_000_000,
        widths_image="layer_widths.png",
    )
    kwargs.update(overrides)
    return create_model_card(make_report(), **kwargs)


# ------------------------------------------------------------------------------------------ card


def test_card_parses_and_metadata_is_valid_yaml_with_model_index():
    card = full_card()
    reloaded = ModelCard(str(card))
    data = reloaded.data.to_dict()
    assert data["base_model"] == "facebook/deit-small-patch16-224"
    assert data["base_model_relation"] == BASE_MODEL_RELATION == "finetune"
    assert data["license"] == "apache-2.0"
    assert data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "image-classification"
    assert data["datasets"] == ["fashion_mnist"]
    for tag in ("vision", "image-classification", "pruning", "isomorphic-pruning", "optimum"):
        assert tag in data["tags"]
    assert not [t for t in data["tags"] if ":" in t], "Hub-generated tags must not be copied from the base model"

    # card.validate() needs the Hub; check the YAML and the model-index locally instead.
    header = str(card).split("---")[1]
    metadata = yaml.safe_load(header)
    model_name, results = model_index_to_eval_results(metadata["model-index"])
    assert model_name == "deit-small-iso-1G"
    by_type = {r.metric_type: r for r in results}
    assert by_type["accuracy"].metric_value == EVAL["after"]["top1"]
    assert by_type["top_5_accuracy"].metric_value == EVAL["after"]["top5"]
    assert {(r.dataset_type, r.dataset_split, r.task_type) for r in results} == {
        ("fashion_mnist", "test", "image-classification")
    }


def test_card_numbers_equal_the_report():
    text = str(full_card())
    # MACs / params / checkpoint size before and after, with ratios
    assert "| MACs (G) | 4.000 | 1.000 | 0.250× (-75.0%) |" in text
    assert "| Parameters (M) | 20.000 | 5.000 | 0.250× (-75.0%) |" in text
    assert "| Checkpoint size (MB) | 88.00 | 22.00 | 0.250× (-75.0%) |" in text
    # accuracy: base, pruned without fine-tuning, fine-tuned, change in points
    assert "| Top-1 accuracy | 91.25 | 40.12 | 89.75 | -1.50 |" in text
    assert "| Top-5 accuracy | 99.81 | 87.33 | 99.69 | -0.12 |" in text
    assert "split `test`" in text and "fashion_mnist" in text and "10000 images" in text
    # fine-tuning description
    assert "3 epochs / 1407 steps" in text and "hard knowledge distillation from teacher `me/teacher-vit`" in text
    # latency with machine
    assert "| 12.50 | 5.00 | 0.400× (-60.0%) |" in text and "Speed-up: 2.50×" in text
    assert MACHINE in text
    # per-class amounts and pruning settings
    assert "| heads | 12 | 72 | 36 | 50.0% |" in text
    assert "| mlp | 12 | 18432 | 9216 | 50.0% |" in text
    assert "| Head-dim pruning ratio | 0.25 |" in text
    assert '"round_to": 8' in text
    assert "| `vit.encoder.layer.11.mlp.fc1` | mlp | 1536 | 768 | 50% |" in text


def test_card_links_base_model_loading_snippets_and_citation():
    text = str(full_card())
    assert "[facebook/deit-small-patch16-224](https://huggingface.co/facebook/deit-small-patch16-224)" in text
    assert 'AutoModelForImageClassification.from_pretrained("me/deit-small-iso-1G", trust_remote_code=True)' in text
    assert 'load_pruned_model(snapshot_download("me/deit-small-iso-1G"))' in text
    assert 'pipeline("image-classification", model="me/deit-small-iso-1G", trust_remote_code=True)' in text
    assert CITATION in text
    assert "Fang, Gongfan and Ma, Xinyin and Mi, Michael Bi and Wang, Xinchao" in text
    assert "2407.04616" in text and "ECCV" in text
    assert "](layer_widths.png)" in text


def test_card_without_measurements_says_so_and_has_no_model_index():
    card = create_model_card(make_report(base_model="/some/local/dir", target_macs=None, layers=[], classes=[]))
    text = str(card)
    data = ModelCard(text).data.to_dict()
    assert "Accuracy was not measured" in text
    assert "model-index" not in data and "base_model" not in data and "base_model_relation" not in data
    assert "## Latency" not in text and "## Fine-tuning" not in text and "Checkpoint size" not in text
    assert "| MACs (G) | 4.000 | 1.000 |" in text
    assert "pruning" in data["tags"]


def test_model_index_uses_pruned_numbers_when_not_finetuned():
    eval_results = {k: v for k, v in EVAL.items() if k != "after"}
    card = create_model_card(make_report(), eval_results=eval_results, model_name="x")
    results = card.data.eval_results
    assert {r.metric_type: r.metric_value for r in results} == {"accuracy": 0.4012, "top_5_accuracy": 0.8733}
    assert "| Top-1 accuracy | 91.25 | 40.12 | -51.13 |" in str(card)


@pytest.mark.parametrize(
    "eval_results, message",
    [
        ({"dataset": "d", "split": "test", "after": {"top1": 89.7}}, "fraction"),
        ({"dataset": "d", "split": "test", "after": {"top3": 0.5}}, "top3"),
        ({"dataset": "d", "after": {"top1": 0.5}}, "split"),
        ({"dataset": "d", "split": "test"}, "no metrics"),
    ],
)
def test_bad_eval_results_are_rejected(eval_results, message):
    with pytest.raises(ValueError, match=message):
        create_model_card(make_report(), eval_results=eval_results)


def test_latency_on_different_machines_gives_no_speedup():
    latency = {
        "before": dict(LATENCY["before"], machine="machine A"),
        "after": dict(LATENCY["after"], machine="machine B"),
    }
    text = str(create_model_card(make_report(), latency=latency))
    assert "Speed-up" not in text and "machine A" in text and "machine B" in text


# ---------------------------------------------------------------------------- folder + picture


def test_save_model_card_writes_card_and_picture_next_to_it(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 12_345)
    make_report().save_pretrained(tmp_path)
    card = save_model_card(tmp_path, eval_results=EVAL, base_model_info=BASE_INFO, repo_id="me/x")
    image = tmp_path / "layer_widths.png"
    assert image.read_bytes().startswith(PNG_MAGIC)
    text = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert text == str(card) + "\n" or text == str(card)
    assert "](layer_widths.png)" in text
    assert checkpoint_size(tmp_path) == 12_345
    assert "| Checkpoint size (MB) | 88.00000 | 0.01235 |" in text


def test_checkpoint_size_sums_shards(tmp_path):
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 100)
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"\0" * 50)
    (tmp_path / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors", '
        '"c": "model-00002-of-00002.safetensors"}}'
    )
    assert checkpoint_size(tmp_path) == 150
    assert checkpoint_size(tmp_path / "missing") is None


def test_plot_layer_widths(tmp_path):
    path = plot_layer_widths(make_report(), tmp_path / "sub" / "w.png")
    assert Path(path).read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(ValueError, match="no per-layer widths"):
        plot_layer_widths(make_report(layers=[]), tmp_path / "empty.png")


def test_latency_of_the_pruned_model_alone():
    text = str(create_model_card(make_report(), latency=LATENCY["after"]))
    assert "| Median latency (ms / batch) | — | 5.00 | — |" in text
    assert "Speed-up" not in text and MACHINE in text
