"""`optimum-isoprune demo --smoke` end to end in a temporary folder: files, card and self-consistent numbers."""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pytest

from optimum_isoprune.cli import main
from optimum_isoprune.data import FASHION_MNIST_DIR
from optimum_isoprune.demo import SUMMARY_NAME, DemoConfig, DemoResult, default_cache_dir, run_demo


def _write_idx(path, array: np.ndarray) -> None:
    magic = 2051 if array.ndim == 3 else 2049
    header = magic.to_bytes(4, "big") + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Debian's Fashion-MNIST when installed, else a small synthetic set in the same IDX format."""
    if os.path.isfile(os.path.join(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")):
        return FASHION_MNIST_DIR
    folder = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 600), ("t10k", 300)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 60, (n, 28, 28)) + (labels * 20)[:, None, None]  # learnable: brightness = class
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return str(folder)


@pytest.fixture(scope="module")
def smoke_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    rc = main(["--quiet", "demo", "--smoke", "--output-dir", str(out), "--data-dir", data_dir])
    assert rc == 0
    return out


def test_demo_smoke_writes_everything(smoke_run):
    for name in (
        "config.json",
        "model.safetensors",
        "README.md",
        "layer_widths.png",
        "pruning_config.json",
        "pruning_report.json",
        "preprocessor_config.json",
        SUMMARY_NAME,
    ):
        assert (smoke_run / name).is_file(), name
    assert (smoke_run / "layer_widths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_summary_is_consistent(smoke_run):
    from optimum_isoprune import PruningReport
    from optimum_isoprune.checkpoint import load_pruned_model
    from optimum_isoprune.counting import count_macs, count_params

    result = DemoResult.from_dict(json.loads((smoke_run / SUMMARY_NAME).read_text()))
    report = PruningReport.from_pretrained(smoke_run)
    student = load_pruned_model(smoke_run)
    assert result.macs["teacher"] == report.macs_before
    assert result.macs["pruned"] == result.macs["student"] == report.macs_after == count_macs(student)
    assert result.params["student"] == report.params_after == count_params(student)
    assert abs(result.macs["student"] / result.macs["teacher"] - 0.5) <= 0.03
    for stage in ("teacher", "pruned", "student"):
        assert 0.0 <= result.accuracy[stage]["top1"] <= result.accuracy[stage]["top5"] <= 1.0
    assert set(result.latency) == {"1", "32"}
    assert result.timings["total"] >= sum(v for k, v in result.timings.items() if k in ("teacher", "prune", "distill"))
    assert not result.teacher_cached and result.teacher_dir is None  # smoke runs never touch the cache

    card = (smoke_run / "README.md").read_text()
    assert f"{100 * result.accuracy['student']['top1']:.2f}" in card
    assert f"{100 * result.accuracy['teacher']['top1']:.2f}" in card
    assert "layer_widths.png" in card and "base_model_relation" not in card  # the teacher is not a Hub model
    table = result.summary_table()
    assert f"{100 * result.accuracy['student']['top1']:.2f}" in table and "Latency, batch 1" in table


def test_teacher_cache_key_depends_on_the_teacher_only():
    base = DemoConfig()
    assert base.teacher_key() == DemoConfig(distill_epochs=7, target_macs_ratio=0.3).teacher_key()
    assert base.teacher_key() != DemoConfig(teacher_epochs=5).teacher_key()
    assert base.teacher_key() != DemoConfig(hidden_size=64, intermediate_size=256).teacher_key()


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("OPTIMUM_ISOPRUNE_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("OPTIMUM_ISOPRUNE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x" / "optimum-isoprune"


@pytest.mark.slow
def test_teacher_is_cached_and_reused(data_dir, tmp_path):
    config = DemoConfig.smoke(
        use_cache=True, train_limit=128, test_limit=64, distill_max_steps=1, latency_batch_sizes=(1,)
    )
    first = run_demo(tmp_path / "a", config=config, data_dir=data_dir, cache_dir=tmp_path / "cache")
    second = run_demo(tmp_path / "b", config=config, data_dir=data_dir, cache_dir=tmp_path / "cache")
    assert not first.teacher_cached and second.teacher_cached
    assert first.teacher_dir == second.teacher_dir and os.path.isdir(first.teacher_dir)
    assert first.accuracy["teacher"] == second.accuracy["teacher"]


def test_bad_settings_fail_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="target_macs_ratio"):
        DemoConfig(target_macs_ratio=1.0)
    with pytest.raises(ValueError, match="patch_size"):
        DemoConfig(patch_size=5)
    with pytest.raises(ValueError, match="Invalid Hub repo id"):
        run_demo(tmp_path, config=DemoConfig.smoke(), push_to_hub="not a repo")


def test_push_failure_keeps_the_output(data_dir, tmp_path, monkeypatch, capsys):
    import optimum_isoprune.hub as hub

    class Offline:
        def __init__(self, token=None):
            pass

        def create_repo(self, *args, **kwargs):
            raise OSError("offline")

    monkeypatch.setattr(hub, "HfApi", Offline)
    out = tmp_path / "out"
    rc = main(
        [
            "--quiet",
            "demo",
            "--smoke",
            "--distill-steps",
            "1",
            "--output-dir",
            str(out),
            "--data-dir",
            data_dir,
            "--push-to-hub",
            "me/demo",
        ]
    )
    assert rc == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("optimum-isoprune")]
    assert len(err) == 1 and "local output" in err[0]
    summary = json.loads((out / SUMMARY_NAME).read_text())
    assert summary["push_error"] and (out / "model.safetensors").is_file()
