"""The console script: units, help, each subcommand on tiny local models, one-line errors and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from models import VIT_KWARGS
from optimum_isoprune import cli
from optimum_isoprune.cli import main, parse_amount, parse_target

# ------------------------------------------------------------------------------------------- units


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1.2G", 1.2e9),
        ("500M", 5e8),
        ("5M", 5e6),
        ("300k", 3e5),
        ("300K", 3e5),
        ("1.2e9", 1.2e9),
        ("42", 42.0),
        ("0.6g", 6e8),
        ("1.2GMACs", 1.2e9),
        ("5.74M params", 5.74e6),
        (" 2T ", 2e12),
        (".5G", 5e8),
    ],
)
def test_parse_amount(text, expected):
    assert parse_amount(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["", "abc", "1.2X", "G", "-1G", "0", "0M", "1,2G", "1.2 G G"])
def test_parse_amount_rejects_with_the_value_named(text):
    with pytest.raises(ValueError) as info:
        parse_amount(text)
    assert repr(text) in str(info.value)


def test_parse_target_share_and_amount():
    assert parse_target("50%") == (0.5, True)
    assert parse_target("1.2G") == (1.2e9, False)
    for bad in ("0%", "100%", "x%", "150%"):
        with pytest.raises(ValueError):
            parse_target(bad)


def test_format_amount():
    assert cli.format_amount(1.2e9) == "1.2G"
    assert cli.format_amount(5.74e6) == "5.74M"
    assert cli.format_amount(300) == "300"


# -------------------------------------------------------------------------------------- help, usage


def test_help_shows_examples(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "--target-macs 1.2G" in out
    for command in ("prune", "distill", "evaluate", "push", "demo"):
        assert command in out


@pytest.mark.parametrize("command", ["prune", "distill", "evaluate", "push", "demo"])
def test_subcommand_help_has_an_example(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert "optimum-isoprune " + command in capsys.readouterr().out


def test_no_command_is_a_usage_error(capsys):
    assert main([]) == 2
    assert "usage:" in capsys.readouterr().err


def test_bad_unit_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["prune", str(tmp_path), "--target-macs", "1.2X", "--output", str(tmp_path / "o")])
    assert info.value.code == 2
    assert "'1.2X'" in capsys.readouterr().err


def test_targets_are_exclusive(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["prune", str(tmp_path), "--ratio", "0.5", "--target-macs", "1G", "--output", str(tmp_path / "o")])
    assert info.value.code == 2


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    """A tiny random ViT saved as a local transformers folder (with an image processor)."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    folder = tmp_path_factory.mktemp("vit")
    torch.manual_seed(0)
    ViTForImageClassification(ViTConfig(**VIT_KWARGS)).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """An imagefolder dataset: train/ and test/ with two classes of random 32 px RGB images."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for label in ("cat", "dog"):
            os.makedirs(root / split / label)
            for i in range(8):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
                    root / split / label / f"{i}.png"
                )
    return str(root)


@pytest.fixture(scope="module")
def pruned_dir(vit_dir, image_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("pruned") / "half")
    rc = main(
        [
            "--quiet",
            "prune",
            vit_dir,
            "--target-macs",
            "50%",
            "--calibration-dataset",
            image_dir,
            "--num-calibration-batches",
            "2",
            "--calibration-batch-size",
            "4",
            "--round-to",
            "4",
            "--output",
            out,
        ]
    )
    assert rc == 0
    return out


# ------------------------------------------------------------------------------------------ commands


def test_prune_local_folder_with_calibration(pruned_dir, vit_dir, capsys):
    from optimum_isoprune import IsomorphicPruningConfig, PruningReport
    from optimum_isoprune.checkpoint import load_pruned_model
    from optimum_isoprune.counting import count_macs

    for name in (
        "config.json",
        "model.safetensors",
        "pruning_config.json",
        "pruning_report.json",
        "README.md",
        "layer_widths.png",
        "preprocessor_config.json",
    ):
        assert os.path.isfile(os.path.join(pruned_dir, name)), name
    report = PruningReport.from_pretrained(pruned_dir)
    config = IsomorphicPruningConfig.from_pretrained(pruned_dir)
    assert config.importance == "taylor" and config.round_to == 4
    assert config.target_macs == pytest.approx(0.5 * report.macs_before)
    assert report.target_error <= 0.02
    model = load_pruned_model(pruned_dir)
    assert count_macs(model) == report.macs_after
    assert report.base_model == vit_dir


def test_prune_ratio_magnitude_prints_summary(vit_dir, tmp_path, capsys):
    out = tmp_path / "r"
    assert (
        main(["--quiet", "prune", vit_dir, "--ratio", "0.25", "--importance", "magnitude", "--output", str(out)]) == 0
    )
    printed = capsys.readouterr().out
    assert "MACs" in printed and f"Saved the pruned model to {out}" in printed
    config = json.loads((out / "pruning_config.json").read_text())
    assert config["pruning_ratio"] == 0.25 and config["importance"] == "magnitude"


def test_prune_target_params_absolute(vit_dir, tmp_path):
    from optimum_isoprune import PruningReport

    out = tmp_path / "p"
    assert (
        main(
            [
                "--quiet",
                "prune",
                vit_dir,
                "--target-params",
                "60K",
                "--importance",
                "magnitude",
                "--round-to",
                "2",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    report = PruningReport.from_pretrained(out)
    assert abs(report.params_after - 60e3) / 60e3 <= 0.02


def test_prune_timm_name_with_random_weights(tmp_path):
    from optimum_isoprune import PruningReport

    out = tmp_path / "t"
    rc = main(
        [
            "--quiet",
            "prune",
            "timm/resnet18",
            "--random-weights",
            "--image-size",
            "64",
            "--ratio",
            "0.5",
            "--importance",
            "magnitude",
            "--output",
            str(out),
        ]
    )
    assert rc == 0
    report = PruningReport.from_pretrained(out)
    assert report.macs_after < report.macs_before
    assert json.loads((out / "config.json").read_text())["architecture"] == "resnet18"


def test_evaluate_prints_json(pruned_dir, image_dir, capsys):
    assert main(["--quiet", "evaluate", pruned_dir, "--dataset", image_dir, "--split", "test"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["num_examples"] == 16 and 0.0 <= result["top1"] <= 1.0 and "top5" in result


def test_distill_saves_student_and_card(pruned_dir, vit_dir, image_dir, tmp_path, capsys):
    from optimum_isoprune.checkpoint import load_pruned_model

    out = tmp_path / "kd"
    rc = main(
        [
            "--quiet",
            "distill",
            "--student",
            pruned_dir,
            "--teacher",
            vit_dir,
            "--dataset",
            image_dir,
            "--max-steps",
            "2",
            "--batch-size",
            "4",
            "--output",
            str(out),
            "--cpu",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    for name in ("config.json", "model.safetensors", "pruning_config.json", "pruning_report.json", "README.md"):
        assert (out / name).is_file(), name
    card = (out / "README.md").read_text()
    assert "soft knowledge distillation" in card and "| steps | 2 |" in card
    assert load_pruned_model(out) is not None


def test_distill_needs_a_pruned_student(vit_dir, image_dir, tmp_path, capsys):
    rc = main(
        ["distill", "--student", vit_dir, "--teacher", vit_dir, "--dataset", image_dir, "--output", str(tmp_path)]
    )
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a pruned checkpoint" in err


class _FakeCommit:
    commit_url = "https://huggingface.co/me/tiny/commit/abc"


class _FakeApi:
    calls: list = []

    def __init__(self, token=None):
        pass

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id))

    def create_commit(self, repo_id, operations, **kwargs):
        self.calls.append(("create_commit", repo_id, sorted(op.path_in_repo for op in operations)))
        return _FakeCommit()


def test_push_uploads_the_folder(pruned_dir, monkeypatch, capsys):
    import optimum_isoprune.hub as hub

    monkeypatch.setattr(hub, "HfApi", _FakeApi)
    _FakeApi.calls = []
    assert main(["push", pruned_dir, "me/tiny"]) == 0
    assert "commit/abc" in capsys.readouterr().out
    (_, repo), (_, _, files) = _FakeApi.calls
    assert repo == "me/tiny" and "model.safetensors" in files and "README.md" in files


def test_push_offline_fails_in_one_line(pruned_dir, monkeypatch, capsys):
    import optimum_isoprune.hub as hub

    class _Offline(_FakeApi):
        def create_repo(self, repo_id, **kwargs):
            raise OSError("offline mode is enabled")

    monkeypatch.setattr(hub, "HfApi", _Offline)
    assert main(["push", pruned_dir, "me/tiny"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "retry" in err and "Traceback" not in err
    assert os.path.isfile(os.path.join(pruned_dir, "model.safetensors"))


@pytest.mark.parametrize(
    "argv, code, words",
    [
        (["prune", "/no/such/model", "--ratio", "0.5", "--output", "x"], 1, "no model folder"),
        (
            [
                "prune",
                "timm/resnet18",
                "--ratio",
                "0.5",
                "--output",
                "x",
                "--random-weights",
                "--calibration-dataset",
                "/no/such/data",
            ],
            1,
            "/no/such/data",
        ),
        (["evaluate", "/no/such/model", "--dataset", "fashion-mnist"], 1, "no model folder"),
        (["push", "/no/such/folder", "me/x"], 1, "/no/such/folder"),
        (["push", ".", "not a repo id"], 1, "Invalid Hub repo id"),
        (["demo", "--target-macs-ratio", "1.5"], 1, "target_macs_ratio"),
    ],
)
def test_errors_are_one_line_without_traceback(argv, code, words, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == code
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("optimum-isoprune")]
    assert len(err) == 1 and words in err[0], err
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "option, words",
    [
        (["--prune-ratio", "0.5", "--seed", str(2**70)], "invalid option value: seed"),  # crashed in torch before
        (["--prune-ratio", "0.5", "--seed", "-5"], "invalid option value: seed"),  # crashed in datasets' shuffle
        (["--prune-ratio", "0.5", "--reconstruction-damping", "nan"], "invalid option value: reconstruction_damping"),
        (["--prune-ratio", "0.5", "--ignore", "no_such_layer"], "'no_such_layer' matches no module"),
        (["--prune-ratio", "0.5", "--image-size", "64"], "does not run on 64 px images"),
        (
            ["--target-macs", "50%", "--image-size", "64"],
            "does not run on 64 px images",
        ),  # the model's own error before
    ],
)
def test_a_bad_config_option_is_a_one_line_usage_error(option, words, vit_dir, tmp_path, capsys):
    assert main(["prune", vit_dir, "--output", str(tmp_path / "o"), "--importance", "magnitude", *option]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("optimum-isoprune")]
    assert len(err) == 1 and words in err[0], err


def test_debug_shows_the_traceback(capsys):
    assert main(["--debug", "push", "/no/such/folder", "me/x"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_python_dash_m_runs_the_cli():
    result = subprocess.run(
        [sys.executable, "-m", "optimum_isoprune", "prune", "--help"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and "--target-macs" in result.stdout


def test_prune_has_an_option_for_every_config_field():
    """Options are generated from IsomorphicPruningConfig: a new field is a new option, with the config's choices."""
    from dataclasses import fields

    from optimum_isoprune import IsomorphicPruningConfig

    args = cli.build_parser().parse_args(
        [
            "prune",
            "m",
            "--output",
            "o",
            "--target-macs",
            "1G",
            "--budget-policy",
            "search",
            "--min-heads",
            "2",
            "--no-prune-heads",
            "--no-prune-head-dims",
            "--search-candidates",
            "5",
            "--search-batches",
            "3",
            "--reconstruction",
            "bias",
            "--reconstruction-damping",
            "0.5",
            "--head-ratio",
            "0.25",
            "--ignore",
            "head",
            "--ignore",
            "fc",
            "--seed",
            "7",
        ]
    )
    config = cli.config_from_args(args, target_macs=1e9)
    assert (config.budget_policy, config.min_heads, config.prune_heads, config.prune_head_dims) == (
        "search",
        2,
        False,
        False,
    )
    assert (config.search_candidates, config.search_batches, config.reconstruction) == (5, 3, "bias")
    assert (config.reconstruction_damping, config.head_pruning_ratio, config.seed) == (0.5, 0.25, 7)
    assert config.ignored_modules == ["head", "fc"]
    untouched = cli.config_from_args(
        cli.build_parser().parse_args(["prune", "m", "--output", "o", "--prune-ratio", "0.5"]), pruning_ratio=0.5
    )
    assert untouched == IsomorphicPruningConfig(pruning_ratio=0.5)
    dests = {a.dest for a in cli.build_parser()._subparsers._group_actions[0].choices["prune"]._actions}
    assert {f.name for f in fields(IsomorphicPruningConfig)} - {
        "target_macs",
        "target_params",
        "pruning_ratio",
    } <= dests
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["prune", "m", "--output", "o", "--prune-ratio", "0.5", "--grouping", "nope"])
