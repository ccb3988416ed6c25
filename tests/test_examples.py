"""Every example runs offline on random weights with --smoke (the full-size paper shapes are slow)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prune_deit_smoke_hits_the_paper_fractions(capsys):
    rows = load_example("prune_deit").main(["--smoke"])
    assert [r["name"] for r in rows] == ["DeiT-4.2G", "DeiT-2.6G", "DeiT-1.2G", "DeiT-0.6G"]
    for row in rows:
        assert abs(row["macs"] - row["target"]) / row["target"] <= 0.05, row
    assert "DeiT-0.6G" in capsys.readouterr().out


def test_prune_deit_saves(tmp_path):
    load_example("prune_deit").main(["--smoke", "--only", "DeiT-1.2G", "--output-dir", str(tmp_path)])
    assert (tmp_path / "DeiT-1.2G" / "model.safetensors").is_file()
    assert (tmp_path / "DeiT-1.2G" / "pruning_report.json").is_file()


def test_paper_deit_configs_smoke(capsys):
    rows = load_example("paper_deit_configs").main(["--smoke"])
    assert len(rows) == 4
    assert rows[0]["macs"] > rows[1]["macs"]  # 2.6G prunes DeiT-Base harder than 4.2G
    assert "paper top-1" in capsys.readouterr().out


@pytest.mark.slow
def test_paper_deit_configs_match_the_paper():
    rows = load_example("paper_deit_configs").main(["--only", "DeiT-1.2G", "--only", "DeiT-0.6G"])
    for row in rows:
        assert abs(row["macs"] - row["paper_macs"]) / row["paper_macs"] <= 0.015, row
        assert abs(row["params"] - row["paper_params"]) / row["paper_params"] <= 0.015, row


@pytest.mark.parametrize("argv", [["--smoke"], ["--smoke", "--v2"]])
def test_convnext_smoke_reloads_the_same_model(argv):
    result = load_example("convnext").main(argv)
    assert result["same_logits"] and result["model"].startswith("PrunedConvNext")
    assert abs(result["report"].macs_ratio - 0.5) <= 0.02


def test_timm_model_smoke():
    results = load_example("timm_model").main(["--smoke"])
    assert len(results) == 4
    for result in results:
        assert result["same_logits"], result["name"]
        assert result["report"].macs_after < result["report"].macs_before
