"""The DeiT recipe's pieces (mixup-aware loss, EMA, seeded augmentation, teacher runner) and its example script."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import ViTConfig, ViTForImageClassification

from optimum_isoprune.augmentation import AugmentationEpochCallback, DeiTTrainTransform, deit_mixup
from optimum_isoprune.data import add_index_column, load_fashion_mnist
from optimum_isoprune.distillation import DistillationTrainer, DistillationTrainingArguments
from optimum_isoprune.ema import EMA_WEIGHTS_NAME, EMACallback
from optimum_isoprune.losses import label_loss
from optimum_isoprune.teacher import TeacherRunner

RECIPE = Path(__file__).resolve().parents[1] / "examples" / "imagenet_recipe.py"


def _recipe():
    spec = importlib.util.spec_from_file_location("imagenet_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _vit(seed: int, hidden: int = 32) -> torch.nn.Module:
    torch.manual_seed(seed)
    return ViTForImageClassification(
        ViTConfig(
            hidden_size=hidden,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=2 * hidden,
            image_size=28,
            patch_size=7,
            num_channels=1,
            num_labels=10,
        )
    )


def _rows(n: int = 16) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"pixel_values": torch.randn(1, 28, 28, generator=g), "labels": i % 10} for i in range(n)]


# ---- losses ---------------------------------------------------------------------------------------------------------


def test_soft_targets_of_one_class_equal_cross_entropy_and_smoothing_matches_torch():
    logits = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 3, 9, 1, 1, 5])
    one_hot = F.one_hot(labels, 10).float()
    torch.testing.assert_close(label_loss(logits, one_hot), F.cross_entropy(logits, labels, reduction="none"))
    smoothed = one_hot * 0.9 + 0.1 / 10
    torch.testing.assert_close(label_loss(logits, smoothed), label_loss(logits, labels, 0.1))
    with pytest.raises(ValueError, match="Soft targets have shape"):
        label_loss(logits, one_hot[:, :5])


# ---- DistillationTrainer with mixup ----------------------------------------------------------------------------------


def test_mixup_mixes_the_pixels_the_student_and_the_teacher_see(tmp_path):
    calls = []
    mixup = deit_mixup(10)

    def recording(pixels, labels):
        original = pixels.clone()  # timm's Mixup mixes in place
        mixed, targets = mixup(pixels, labels)
        calls.append((original, mixed.clone(), targets.clone()))
        return mixed, targets

    args = DistillationTrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to=[],
        max_steps=2,
        per_device_train_batch_size=4,
        dataloader_drop_last=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    teacher = _vit(1)
    seen = []
    teacher.register_forward_pre_hook(
        lambda module, a, kw: seen.append(kw.get("pixel_values", a[0] if a else None)), with_kwargs=True
    )
    trainer = DistillationTrainer(
        model=_vit(0), args=args, teacher_model=teacher, mixup_fn=recording, train_dataset=_rows()
    )
    trainer.train()
    assert len(calls) == 2
    for (pixels, mixed, targets), teacher_pixels in zip(calls, seen):
        assert targets.shape == (4, 10) and torch.allclose(targets.sum(-1), torch.ones(4))
        assert not torch.equal(pixels, mixed)
        assert torch.equal(teacher_pixels, mixed)  # DeiT: the teacher sees the mixed batch
    assert trainer.step_timer.teacher_share() is not None and 0 < trainer.step_timer.teacher_share() < 1


def test_mixup_needs_even_full_batches_and_no_teacher_cache(tmp_path):
    base = dict(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=1, save_strategy="no")
    with pytest.raises(ValueError, match="even per_device_train_batch_size"):
        DistillationTrainer(
            model=_vit(0),
            args=DistillationTrainingArguments(**base, per_device_train_batch_size=4),
            teacher_model=_vit(1),
            mixup_fn=deit_mixup(10),
            train_dataset=_rows(),
        )
    args = DistillationTrainingArguments(
        **base, per_device_train_batch_size=4, dataloader_drop_last=True, cache_teacher_logits=True
    )
    with pytest.raises(ValueError, match="cache_teacher_logits=False"):
        DistillationTrainer(
            model=_vit(0), args=args, teacher_model=_vit(1), mixup_fn=deit_mixup(10), train_dataset=_rows()
        )


# ---- teacher runner -------------------------------------------------------------------------------------------------


def test_teacher_runner_in_bf16_gives_float32_logits_close_to_float32():
    teacher, x = _vit(1), torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    reference = teacher(pixel_values=x).logits
    runner = TeacherRunner(_vit(1), dtype="bfloat16", channels_last=True)
    logits = runner(x)
    assert logits.dtype == torch.float32 and runner.calls == 1 and runner.seconds > 0
    torch.testing.assert_close(logits, reference, atol=0.1, rtol=0.05)
    with pytest.raises(ValueError, match="teacher_dtype"):
        DistillationTrainingArguments(output_dir="x", use_cpu=True, teacher_dtype="int8")


def test_teacher_compile_failure_falls_back_to_eager(monkeypatch, caplog):
    class Broken(torch.nn.Module):
        def forward(self, pixel_values):
            raise RuntimeError("no compiler")

    monkeypatch.setattr(torch, "compile", lambda module: Broken())
    teacher, x = _vit(1), torch.randn(2, 1, 28, 28)
    runner = TeacherRunner(teacher, compile=True)
    with caplog.at_level("WARNING"):
        logits = runner(x)
    assert "running it eagerly" in caplog.text
    torch.testing.assert_close(logits, teacher(pixel_values=x).logits)


# ---- EMA ------------------------------------------------------------------------------------------------------------


def test_ema_update_is_the_moving_average_and_round_trips(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = EMACallback(decay=0.9)
    ema._track(model)
    before = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model[1].num_batches_tracked += 5
    ema.update(step=1)
    torch.testing.assert_close(ema.ema_model[0].weight, 0.9 * before + 0.1 * model[0].weight.detach())
    assert int(ema.ema_model[1].num_batches_tracked) == 5  # integer buffers are copied
    ema.save(tmp_path)
    other = EMACallback(decay=0.9)
    other._track(model)
    other.load(tmp_path)
    assert all(
        torch.equal(a, b) for a, b in zip(ema.ema_model.state_dict().values(), other.ema_model.state_dict().values())
    )
    with pytest.raises(FileNotFoundError, match="weight average cannot continue"):
        other.load(tmp_path / "missing")
    with pytest.raises(ValueError, match="decay"):
        EMACallback(decay=1.0)


# ---- augmentation ---------------------------------------------------------------------------------------------------


def test_augmentation_depends_on_example_and_epoch_only():
    rows = add_index_column(load_fashion_mnist("train", limit=8))
    transform = DeiTTrainTransform(28, 1, (0.286,), (0.353,))
    dataset = rows.with_transform(transform)
    torch.manual_seed(0)
    first = dataset[0:4]["pixel_values"]
    torch.manual_seed(123)  # another global random state: the same pixels
    assert all(torch.equal(a, b) for a, b in zip(first, dataset[0:4]["pixel_values"]))
    state = torch.get_rng_state()
    dataset[0:4]
    assert torch.equal(state, torch.get_rng_state())  # the caller's random state is left alone
    loader = type("Loader", (), {"dataset": dataset})()
    AugmentationEpochCallback().on_epoch_begin(None, type("S", (), {"epoch": 1.0})(), None, train_dataloader=loader)
    assert transform.epoch == 1
    assert not all(torch.equal(a, b) for a, b in zip(first, dataset[0:4]["pixel_values"]))


# ---- the example script ---------------------------------------------------------------------------------------------


def _same_weights(a: Path, b: Path) -> None:
    left, right = load_file(a), load_file(b)
    assert left.keys() == right.keys()
    for key in left:
        assert torch.equal(left[key], right[key]), key


@pytest.mark.slow
def test_recipe_resume_equals_uninterrupted_with_ema(tmp_path):
    recipe = _recipe()
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    recipe.main(["--smoke", "--output-dir", str(straight)])
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-3", resumed / "checkpoint-3")
    results = recipe.main(["--smoke", "--output-dir", str(resumed), "--resume", str(resumed / "checkpoint-3")])
    assert results["steps"] == 6
    _same_weights(straight / "model.safetensors", resumed / "model.safetensors")
    _same_weights(straight / "checkpoint-6" / EMA_WEIGHTS_NAME, resumed / "checkpoint-6" / EMA_WEIGHTS_NAME)
    _same_weights(straight / "ema" / "model.safetensors", resumed / "ema" / "model.safetensors")
    student, ema = load_file(straight / "model.safetensors"), load_file(straight / "ema" / "model.safetensors")
    assert any(not torch.equal(student[k], ema[k]) for k in student)  # the average is not the last weights


@pytest.mark.slow
def test_recipe_smoke_on_two_processes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29543",
            str(RECIPE),
            "--smoke",
            "--output-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "recipe_results.json").read_text())
    assert results["world_size"] == 2 and results["steps"] == 6
    assert 0 < results["teacher_share"] < 1
    assert 0 <= results["student"]["top1"] <= 1 and 0 <= results["ema"]["top1"] <= 1
    assert (tmp_path / "checkpoint-6" / EMA_WEIGHTS_NAME).is_file()
    assert (tmp_path / "pruned" / "model.safetensors").is_file() and (tmp_path / "ema" / "model.safetensors").is_file()
    assert "matches every process" in result.stderr  # the pruned models were compared across ranks


def test_recipe_arguments_are_checked():
    recipe = _recipe()
    with pytest.raises(SystemExit):
        recipe.parse_args(["--model", "some/model"])  # no target
    with pytest.raises(SystemExit):
        recipe.parse_args(["--model", "m", "--target-macs", "1e9", "--pruning-ratio", "0.5"])
    with pytest.raises(SystemExit):
        recipe.parse_args(["--smoke", "--bf16", "--fp16"])
    args = recipe.parse_args(["--model", "m", "--target-macs", "4.2e9"])
    assert (args.epochs, args.batch_size, args.lr, args.weight_decay, args.smoothing) == (300, 256, 5e-4, 0.05, 0.1)
    assert (args.mixup, args.cutmix, args.reprob, args.aa) == (0.8, 1.0, 0.25, "rand-m9-mstd0.5-inc1")


def test_accelerate_config_example_loads():
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(RECIPE.parent / "accelerate_config.yaml"))
    assert config.distributed_type == "MULTI_GPU" and config.num_processes == 8 and config.mixed_precision == "bf16"
