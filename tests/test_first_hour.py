"""Issue #21, a newcomer's first hour: one test per thing that went wrong (silent wrong results first)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, Features, Image
from PIL import Image as PILImage

from models import TIMM_VIT_KWARGS, build
from optimum_isoprune.cli import main

LABELS = ["bird", "cat", "dog"]


def _images(n: int = 6, size: int = 32, seed: int = 0) -> list[PILImage.Image]:
    rng = np.random.default_rng(seed)
    return [PILImage.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def _rows(names: list[str], per_class: int = 2) -> Dataset:
    images = _images(per_class * len(names))
    labels = [i % len(names) for i in range(len(images))]
    return Dataset.from_dict(
        {"image": images, "label": labels}, features=Features({"image": Image(), "label": ClassLabel(names=names)})
    )


@pytest.fixture(scope="module")
def my_vit(tmp_path_factory):
    """The newcomer's own model: a 3-label ViT whose processor normalises with mean = std = 0.5."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    folder = tmp_path_factory.mktemp("first_hour") / "my-vit"
    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_labels=3,
        id2label=dict(enumerate(LABELS)),
        label2id={n: i for i, n in enumerate(LABELS)},
    )
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(
        folder
    )
    return str(folder)


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    """<root>/<split>/<class>/<n>.png with the model's three classes."""
    root = tmp_path_factory.mktemp("first_hour_images") / "pets"
    for split in ("train", "test"):
        for index, name in enumerate(LABELS):
            os.makedirs(root / split / name)
            for i, image in enumerate(_images(4, seed=10 * index + (split == "test"))):
                image.save(root / split / name / f"{i}.png")
    return str(root)


# ------------------------------------------------------------------------------ 1. normalisation


def test_prepare_dataset_normalises_like_the_models_own_processor(my_vit):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from optimum_isoprune import prepare_dataset

    model = AutoModelForImageClassification.from_pretrained(my_vit)
    processor = AutoImageProcessor.from_pretrained(my_vit)
    rows = _rows(LABELS)
    ours = torch.stack([prepare_dataset(rows, model=model)[i]["pixel_values"] for i in range(len(rows))])
    theirs = processor(images=list(rows["image"]), return_tensors="pt")["pixel_values"]
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_evaluate_calibrate_and_distill_use_the_processor_normalisation(my_vit):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from optimum_isoprune import DistillationTrainer, DistillationTrainingArguments, evaluate_model, prepare_dataset
    from optimum_isoprune.data import dataset_transform, ensure_prepared

    model = AutoModelForImageClassification.from_pretrained(my_vit)
    rows = _rows(LABELS)
    expected = prepare_dataset(
        rows, image_processor=AutoImageProcessor.from_pretrained(my_vit), image_size=32, num_channels=3
    )
    assert evaluate_model(model, rows) == evaluate_model(model, expected)  # raw rows are prepared for the model
    transform = dataset_transform(ensure_prepared(rows, model))
    assert transform.mean.flatten().tolist() == [0.5] * 3 and transform.std.flatten().tolist() == [0.5] * 3
    args = DistillationTrainingArguments(output_dir="unused", distillation_type="none", report_to="none", use_cpu=True)
    trainer = DistillationTrainer(model=model, args=args, train_dataset=rows)
    assert dataset_transform(trainer.train_dataset).mean.flatten().tolist() == [0.5] * 3


def test_timm_models_normalise_with_their_pretrained_config():
    from optimum_isoprune import prepare_dataset
    from optimum_isoprune.data import dataset_transform

    model = build("timm_resnet")
    transform = dataset_transform(prepare_dataset(_rows(LABELS), model=model, image_size=32))
    assert transform.mean.flatten().tolist() == pytest.approx(list(model.pretrained_cfg["mean"]))
    assert transform.std.flatten().tolist() == pytest.approx(list(model.pretrained_cfg["std"]))


def test_unknown_normalisation_is_said(caplog):
    from transformers import ViTConfig, ViTForImageClassification

    from optimum_isoprune import data

    data._warn_once.cache_clear()
    model = ViTForImageClassification(
        ViTConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=32,
            patch_size=8,
            num_labels=3,
        )
    )
    with caplog.at_level(logging.WARNING, logger="optimum_isoprune"):
        data.prepare_dataset(_rows(LABELS), model=model)
    assert "mean/std" in caplog.text and "ImageNet" in caplog.text


# ---------------------------------------------------------------------------------- 2. labels


@pytest.mark.parametrize(
    "names, words",
    [
        (
            ["T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot"],
            "10 classes",
        ),  # fashion-mnist on a 3-class model
        (LABELS + ["eel"], "4 classes"),  # a fourth class folder
        (["test", "train"], "no class subfolders"),  # images directly under the split folders
        (["cat", "bird", "dog"], "another order"),  # the model's names, another order
    ],
)
def test_labels_that_cannot_be_the_models_fail_before_any_work(my_vit, names, words):
    from transformers import AutoModelForImageClassification

    from optimum_isoprune import DistillationTrainer, DistillationTrainingArguments, evaluate_model, prepare_dataset
    from optimum_isoprune.pruner import IsomorphicPruner

    model = AutoModelForImageClassification.from_pretrained(my_vit)
    rows = _rows(names)
    with pytest.raises(ValueError, match=words):
        prepare_dataset(rows, model=model)
    with pytest.raises(ValueError, match=words):
        evaluate_model(model, rows)
    with pytest.raises(ValueError, match=words):
        IsomorphicPruner(model).prune(pruning_ratio=0.2, calibration_dataset=rows)
    args = DistillationTrainingArguments(output_dir="unused", distillation_type="none", report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match=words):
        DistillationTrainer(model=model, args=args, train_dataset=rows)


def test_a_naming_only_difference_is_a_warning(my_vit, caplog):
    from transformers import AutoModelForImageClassification

    from optimum_isoprune import prepare_dataset

    model = AutoModelForImageClassification.from_pretrained(my_vit)
    with caplog.at_level(logging.WARNING, logger="optimum_isoprune"):
        prepare_dataset(_rows(["blue", "green", "red"]), model=model)
    assert "[blue, green, red] differ from the model's [bird, cat, dog]" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="optimum_isoprune"):
        prepare_dataset(_rows(["Bird", "cat", "dog"]), model=model)  # the same names
    assert "differ" not in caplog.text


def test_cli_evaluate_names_the_label_mismatch(my_vit, image_root, tmp_path, capsys):
    extra = tmp_path / "four"
    shutil.copytree(Path(image_root) / "test", extra / "test")
    os.makedirs(extra / "test" / "eel")
    _images(1)[0].save(extra / "test" / "eel" / "0.png")
    assert main(["--quiet", "evaluate", my_vit, "--dataset", str(extra)]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("optimum-isoprune")]
    assert len(err) == 1 and "4 classes" in err[0] and "predicts 3" in err[0]


# ------------------------------------------------------------------------- 2. clear CLI errors


def test_missing_local_dataset_folder_is_no_such_folder(my_vit, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", my_vit, "--dataset", "./nonexistent"]) == 1
    assert "no such folder: './nonexistent'" in capsys.readouterr().err


@pytest.mark.parametrize("amount, suggestion", [("50", "50%"), ("0.5", "50%")])
def test_bare_small_target_suggests_a_share(my_vit, amount, suggestion, capsys):
    with pytest.raises(SystemExit) as info:
        main(["prune", my_vit, "--target-macs", amount, "--output", "x"])
    assert info.value.code == 2
    assert f"did you mean {suggestion}" in capsys.readouterr().err


def test_unknown_option_is_named_first(my_vit, capsys):
    with pytest.raises(SystemExit):
        main(["prune", my_vit, "--taget-macs", "50%"])
    err = capsys.readouterr().err
    assert "unrecognized option --taget-macs; did you mean --target-macs?" in err
    assert "required" not in err


def test_prune_ratio_and_the_deprecated_ratio_alias(my_vit, tmp_path, capsys):
    out = tmp_path / "r"
    assert (
        main(["--quiet", "prune", my_vit, "--prune-ratio", "0.25", "--importance", "magnitude", "--output", str(out)])
        == 0
    )
    printed = capsys.readouterr().out
    assert "removing 25% of every isomorphic class" in printed  # said before pruning
    assert json.loads((out / "pruning_config.json").read_text())["pruning_ratio"] == 0.25
    assert main(["--quiet", "prune", my_vit, "--ratio", "0.25", "--importance", "magnitude", "--output", str(out)]) == 0
    assert "--ratio is deprecated, use --prune-ratio" in capsys.readouterr().err


def test_prune_says_what_is_kept_and_prints_the_summary_once(my_vit, image_root, tmp_path, capsys, caplog):
    out = tmp_path / "half"
    with caplog.at_level(logging.INFO, logger="optimum_isoprune"):
        assert main(["prune", my_vit, "--target-macs", "50%", "--output", str(out)]) == 0
    printed = capsys.readouterr()
    first = printed.out.splitlines()[0]
    assert first.startswith("Pruning ") and "keeping" in first and "(50%)" in first
    everything = printed.out + printed.err + caplog.text
    assert everything.count("target error") == 1
    assert caplog.text.count("calibration") + caplog.text.count("Calibration") == 1  # one warning, not two


def test_distill_without_the_eval_split_fails_before_training(tmp_path, my_vit, image_root, capsys):
    student = tmp_path / "student"
    assert (
        main(
            ["--quiet", "prune", my_vit, "--prune-ratio", "0.25", "--importance", "magnitude", "--output", str(student)]
        )
        == 0
    )
    only_train = tmp_path / "only_train"
    shutil.copytree(Path(image_root) / "train", only_train / "train")
    out = tmp_path / "kd"
    assert (
        main(
            [
                "distill",
                "--student",
                str(student),
                "--teacher",
                my_vit,
                "--dataset",
                str(only_train),
                "--max-steps",
                "1",
                "--batch-size",
                "4",
                "--output",
                str(out),
                "--cpu",
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "'test'" in err and "--eval-split" in err and "nothing was trained yet" in err
    assert not out.exists()


# ---------------------------------------------------------------------- distill: card, folders


@pytest.fixture(scope="module")
def distilled(my_vit, image_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("kd_flow")
    student = root / "my-vit-half"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OPTIMUM_ISOPRUNE_CACHE", str(root / "cache"))
        assert (
            main(
                [
                    "--quiet",
                    "prune",
                    my_vit,
                    "--target-macs",
                    "50%",
                    "--calibration-dataset",
                    image_root,
                    "--num-calibration-batches",
                    "1",
                    "--calibration-batch-size",
                    "4",
                    "--round-to",
                    "2",
                    "--output",
                    str(student),
                ]
            )
            == 0
        )
        out = root / "my-vit-half-kd"
        assert (
            main(
                [
                    "--quiet",
                    "distill",
                    "--student",
                    str(student),
                    "--teacher",
                    my_vit,
                    "--dataset",
                    image_root,
                    "--max-steps",
                    "2",
                    "--batch-size",
                    "4",
                    "--latency-repeats",
                    "10",
                    "--output",
                    str(out),
                    "--cpu",
                ]
            )
            == 0
        )
    assert (root / "cache" / "evaluations.json").is_file()  # the teacher's accuracy, for the next distill
    return out


def test_teacher_accuracy_is_cached_until_its_files_change(tmp_path, monkeypatch):
    from optimum_isoprune.cli import cached_evaluation

    monkeypatch.setenv("OPTIMUM_ISOPRUNE_CACHE", str(tmp_path / "cache"))
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "model.safetensors").write_bytes(b"1")
    calls = []

    def evaluate():
        calls.append(1)
        return {"top1": 0.5, "num_examples": 4}

    for _ in range(2):
        assert cached_evaluation(str(teacher), "pets", "test", None, evaluate) == {"top1": 0.5, "num_examples": 4}
    assert len(calls) == 1
    (teacher / "model.safetensors").write_bytes(b"22")
    cached_evaluation(str(teacher), "pets", "test", None, evaluate)
    cached_evaluation(str(teacher), "pets", "test", 10, evaluate)
    assert len(calls) == 3


def test_distill_leaves_no_trainer_folder_and_fills_the_card(distilled, image_root, my_vit):
    assert not (distilled / "trainer").exists()
    card = (distilled / "README.md").read_text()
    row = next(line for line in card.splitlines() if line.startswith("| Top-1 accuracy"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == 5 and "—" not in cells  # base, pruned, distilled and the change vs base
    assert "## Latency" in card and "Median of 10 forward passes" in card
    assert "Fine-tuned for 2 steps" in card


def test_cards_hold_no_local_paths(distilled, image_root, my_vit):
    card = (distilled / "README.md").read_text()
    header = card.split("---")[1]
    for path in (image_root, my_vit, str(distilled), str(Path(image_root).parent)):
        assert path not in card
    assert "datasets:" not in header  # a local folder is not a Hub dataset
    assert "`pets`" in card and "`my-vit`" in card
    assert 'load_pruned_model("my-vit-half-kd")' in card


def test_cards_list_flops_beside_macs(distilled):
    from huggingface_hub import ModelCard

    from optimum_isoprune import PruningReport

    report = PruningReport.from_pretrained(distilled)
    card = ModelCard.load(distilled / "README.md")
    stats = card.data.to_dict()["model_stats"]
    assert stats["macs"] == report.macs_after and stats["flops"] == 2 * report.macs_after
    assert "| FLOPs (K) = 2 × MACs |" in card.text or "| FLOPs (M) = 2 × MACs |" in card.text


def test_push_names_the_repo_in_the_uploaded_card(distilled):
    from optimum_isoprune.hub import push_to_hub

    class Api:
        def create_repo(self, repo_id, **kwargs):
            pass

        def create_commit(self, repo_id, operations, **kwargs):
            self.operations = operations
            return None

    api = Api()
    before = (distilled / "README.md").read_text()
    push_to_hub(distilled, "me/vit-half", api=api)
    readme = next(op for op in api.operations if op.path_in_repo == "README.md")
    text = (
        readme.path_or_fileobj.decode()
        if isinstance(readme.path_or_fileobj, bytes)
        else Path(readme.path_or_fileobj).read_text()
    )
    assert 'from_pretrained("me/vit-half", trust_remote_code=True)' in text
    assert 'load_pruned_model(snapshot_download("me/vit-half"))' in text
    assert 'my-vit-half-kd"' not in text
    assert (distilled / "README.md").read_text() == before  # the local folder is unchanged


# ------------------------------------------------------------------------------ 1. timm, cards


def test_unit_follows_the_magnitude_in_cards_and_names():
    from optimum_isoprune import PruningReport, create_model_card

    report = PruningReport(
        base_model="me/small",
        architecture="ViTForImageClassification",
        macs_before=32_200_000,
        macs_after=16_100_000,
        params_before=455_000,
        params_after=229_000,
        image_size=28,
    )
    card = create_model_card(report)
    assert card.data.model_name == "small-isopruned-16.1M"
    assert "| MACs (M) | 32.20 | 16.10 |" in card.text and "| Parameters (K) | 455.00 | 229.00 |" in card.text


def test_random_weights_card_says_so_and_links_no_base(tmp_path):
    out = tmp_path / "t"
    assert (
        main(
            [
                "--quiet",
                "prune",
                "timm/resnet18",
                "--random-weights",
                "--image-size",
                "32",
                "--prune-ratio",
                "0.5",
                "--importance",
                "magnitude",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    text = (out / "README.md").read_text()
    assert "**random weights**" in text and "huggingface.co/timm/resnet18" not in text
    assert "base_model:" not in text.split("---")[1]


def test_timm_card_shows_what_loads_and_it_loads(tmp_path):
    from optimum_isoprune import IsomorphicPruner, load_pruned_model

    model = build("timm_vit")
    pruner = IsomorphicPruner(model)
    pruner.prune(pruning_ratio=0.25, importance="magnitude")
    pruner.save_pretrained(tmp_path / "timm-half")
    card = (tmp_path / "timm-half" / "README.md").read_text()
    assert "trust_remote_code" not in card and "AutoModelForImageClassification.from_pretrained" not in card
    assert 'load_pruned_model("timm-half")' in card
    reloaded = load_pruned_model(tmp_path / "timm-half")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(reloaded(x), pruner.pruned_model(x), atol=1e-5)


def test_timm_layers_are_listed_in_model_order():
    from optimum_isoprune import IsomorphicPruner

    pruner = IsomorphicPruner(build("timm_vit"))
    pruner.prune(pruning_ratio=0.25, importance="magnitude")
    blocks = [int(w.name.split(".")[1]) for w in pruner.report.layers if w.name.startswith("blocks.")]
    assert blocks == sorted(blocks) and blocks[0] == 0 and blocks[-1] == TIMM_VIT_KWARGS["depth"] - 1


def test_plot_panel_order_is_stable_and_labelled(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from optimum_isoprune import LayerWidth, PruningReport, plot_layer_widths

    layers = [
        LayerWidth("blocks.0.mlp.fc1", "channels", 64, 32),
        LayerWidth("blocks.0.attn", "heads", 4, 2),
        LayerWidth("blocks.1.mlp.fc2", "residual", 32, 24),
        LayerWidth("blocks.0.attn", "head_dim", 8, 6),
    ]
    report = PruningReport(
        base_model=None,
        architecture="VisionTransformer",
        macs_before=10,
        macs_after=5,
        params_before=10,
        params_after=5,
        image_size=32,
        layers=layers,
    )
    seen = []
    original = Figure.savefig

    def record(self, *args, **kwargs):
        seen.append(
            [(ax.get_title(), ax.get_xlabel(), [t.get_text() for t in ax.get_xticklabels()]) for ax in self.axes]
        )
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    plot_layer_widths(report, tmp_path / "a.png")
    report.layers = list(reversed(layers))
    plot_layer_widths(report, tmp_path / "b.png")
    assert seen[0] == seen[1]
    titles = [title for title, _, _ in seen[0]]
    assert titles[:3] == ["attention heads per layer", "head dim per layer", "channels per layer"]
    assert titles[3].startswith("hidden size") and seen[0][3][2] == ["hidden size"]
    assert all(xlabel for _, xlabel, _ in seen[0][:3])


def test_plural_wording():
    from optimum_isoprune import ClassAmount, PruningReport
    from optimum_isoprune.card import _finetuning_context

    report = PruningReport(
        base_model=None,
        architecture="X",
        macs_before=10,
        macs_after=5,
        params_before=10,
        params_after=5,
        image_size=32,
        classes=[ClassAmount("residual", 1, 64, 48)],
    )
    assert "1 group)" in report.summary()
    assert _finetuning_context({"epochs": 1, "steps": 469})["sentence"].startswith("Fine-tuned for 1 epoch / 469 steps")


# ------------------------------------------------------------------------------------- 4. noise


def test_no_pin_memory_on_cpu_and_metrics_logged_as_numbers():
    from optimum_isoprune import DistillationTrainer, DistillationTrainingArguments
    from optimum_isoprune.distillation import _NumericProgressCallback

    args = DistillationTrainingArguments(output_dir="unused", distillation_type="none", report_to="none", use_cpu=True)
    assert args.dataloader_pin_memory is False
    trainer = DistillationTrainer(model=build("vit"), args=args)
    assert any(isinstance(cb, _NumericProgressCallback) for cb in trainer.callback_handler.callbacks)


def test_local_image_folders_show_no_download_bars(image_root, capfd):
    from optimum_isoprune import load_image_dataset

    load_image_dataset(image_root, split="test", download_mode="force_redownload")
    err = capfd.readouterr().err
    assert "Downloading" not in err and "Generating" not in err


def test_help_shows_defaults_and_matches_the_readme(capsys):
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    assert "(default: taylor)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["push", "--help"])
    assert "a folder written by prune or distill" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "(about 8 minutes on 2 cores" in " ".join(capsys.readouterr().out.split())
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert "7.8 min" in readme


# ---------------------------------------------------------------------------------- 3. startup


def test_help_and_import_do_not_load_torch():
    code = (
        "import sys, contextlib, io\n"
        "import optimum_isoprune\n"
        "from optimum_isoprune.cli import main\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "    main(['prune', '--help'])\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'timm', 'datasets') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
