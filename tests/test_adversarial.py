"""Issue 16, tried as an adversary would: every case must end in a clear error (its type, the cause and the fix named),
or in correct behaviour; never silently wrong results, raw third-party errors, executed checkpoint code or lost data.

Each test is one case (or one parametrized family of cases); `ADVERSARIAL_CASES` in the closing note counts them.
"""

from __future__ import annotations

import builtins
import copy
import functools
import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from models import IMAGE_SIZE, VIT_KWARGS, build, logits
from optimum_isoprune import IsomorphicPruner, IsomorphicPruningConfig
from optimum_isoprune.checkpoint import load_pruned_model, save_pruned_model
from optimum_isoprune.cli import main
from optimum_isoprune.errors import CalibrationDataError, NonFiniteError, UnsupportedModelError
from optimum_isoprune.modeling import PrunedCheckpointError, modeling_pruned

MARKER = "ISOPRUNE_ADVERSARY_RAN"


def pixels(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


@functools.lru_cache(maxsize=None)
def _pruner(name: str) -> IsomorphicPruner:
    pruner = IsomorphicPruner(build(name))
    pruner.prune(IsomorphicPruningConfig(pruning_ratio=0.5, importance="magnitude"))
    return pruner


def pruned(name: str = "vit"):
    return copy.deepcopy(_pruner(name).pruned_model)


def snapshot(folder) -> dict[str, bytes]:
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = open(path, "rb").read()
    return out


def leftovers(parent) -> list[str]:
    return sorted(f for f in os.listdir(parent) if ".saving-" in f)


@pytest.fixture
def no_prompt(monkeypatch):
    """Any interactive prompt (transformers' "run the custom code? [y/N]") fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("prompted the user")

    monkeypatch.setattr(builtins, "input", refuse)


@pytest.fixture
def saved_vit(tmp_path):
    target = tmp_path / "ckpt"
    _pruner("vit").save_pretrained(target)
    return target


def _edit_config(folder, edit) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def _plant_code(folder, marker) -> None:
    """Append code that would leave `marker` behind to every .py file of the checkpoint."""
    for name in os.listdir(folder):
        if name.endswith(".py"):
            with open(folder / name, "a") as f:
                f.write(f"\nopen({str(marker)!r}, 'w').write('ran')\n")


# =================================================================================================== 1. own code


@pytest.mark.parametrize("model_type", ["bert", "pruned_vit", "vit"])
def test_checkpoint_code_never_runs(saved_vit, tmp_path, model_type, no_prompt):
    marker = tmp_path / MARKER
    _plant_code(saved_vit, marker)
    assert any(name.endswith(".py") for name in os.listdir(saved_vit))

    def edit(config):
        config["model_type"] = model_type
        config["auto_map"]["AutoModelForImageClassification"] = "modeling_pruned.PrunedViTForImageClassification"

    _edit_config(saved_vit, edit)
    if model_type == "bert":
        with pytest.raises(PrunedCheckpointError, match=r"model_type 'bert'.*not a pruned checkpoint type.*never run"):
            load_pruned_model(saved_vit)
    elif model_type == "pruned_vit":
        assert type(load_pruned_model(saved_vit)).__module__ == "optimum_isoprune.modeling.modeling_pruned"
    else:  # a stock type keeps the pruned widths in fields its stock class ignores: refused, not mis-built
        with pytest.raises(PrunedCheckpointError):
            load_pruned_model(saved_vit)
    assert not marker.exists()


def test_cli_evaluate_never_runs_checkpoint_code(saved_vit, tmp_path, capsys, no_prompt):
    marker = tmp_path / MARKER
    _plant_code(saved_vit, marker)
    _edit_config(saved_vit, lambda c: c.update(model_type="bert"))
    processor = json.loads((saved_vit / "preprocessor_config.json").read_text())
    processor["auto_map"] = {"AutoImageProcessor": "modeling_pruned.Evil"}
    (saved_vit / "preprocessor_config.json").write_text(json.dumps(processor))
    rc = main(["evaluate", str(saved_vit), "--dataset", "fashion-mnist"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1 and "not a pruned checkpoint type" in err
    from optimum_isoprune.pruner import load_image_processor

    load_image_processor(str(saved_vit))  # None or the stock processor: the folder's code is not imported
    assert not marker.exists()


def test_load_pruned_model_refuses_trust_remote_code(saved_vit):
    with pytest.raises(ValueError, match="never runs code.*drop trust_remote_code"):
        load_pruned_model(saved_vit, trust_remote_code=True)


# ============================================================================================ 2. outside reads


def _shard(saved, shard_name) -> None:
    state = load_file(saved / "model.safetensors")
    index = {"metadata": {}, "weight_map": {name: shard_name for name in state}}
    (saved / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize(
    "shard", ["../outside/model.safetensors", "/tmp/outside/model.safetensors", "sub/x.safetensors", "model.bin"]
)
def test_index_cannot_point_outside_the_folder(saved_vit, tmp_path, shard):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(saved_vit / "model.safetensors", outside / "model.safetensors")
    _shard(saved_vit, shard)
    os.remove(saved_vit / "model.safetensors")
    with pytest.raises(PrunedCheckpointError, match=r"index\.json maps tensors to .*Refusing to read outside"):
        load_pruned_model(saved_vit)


def test_index_without_weight_map_is_named(saved_vit):
    (saved_vit / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(PrunedCheckpointError, match=r"index\.json has no 'weight_map'.*Save the model again"):
        load_pruned_model(saved_vit)


@pytest.mark.parametrize(
    "arg",
    [{"checkpoint_path": "/etc/passwd"}, {"pretrained": True}, {"pretrained_cfg_overlay": {"file": "/tmp/x.pth"}}],
)
def test_timm_config_cannot_load_other_files(tmp_path, arg, monkeypatch):
    save_pruned_model(pruned("timm_vit"), tmp_path)
    _edit_config(tmp_path, lambda c: c["model_args"].update(arg))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    with pytest.raises(
        PrunedCheckpointError, match=rf"model_args sets \['{next(iter(arg))}'\].*own model\.safetensors"
    ):
        load_pruned_model(tmp_path)


def test_timm_architecture_must_be_a_local_timm_model(tmp_path):
    save_pruned_model(pruned("timm_vit"), tmp_path)
    _edit_config(tmp_path, lambda c: c.update(architecture="hf-hub:evil/model"))
    with pytest.raises(PrunedCheckpointError, match="not a model of the installed timm"):
        load_pruned_model(tmp_path)


@pytest.mark.parametrize("kind", ["pruned", "stock"])
def test_pickled_weights_are_never_read(tmp_path, kind, monkeypatch):
    model = pruned("vit") if kind == "pruned" else build("vit")
    if kind == "pruned":
        save_pruned_model(model, tmp_path)
    else:
        model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    os.remove(tmp_path / "model.safetensors")
    torch.save(state, tmp_path / "pytorch_model.bin")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    with pytest.raises(PrunedCheckpointError, match=r"only pickled weights \(pytorch_model\.bin\).*safetensors only"):
        load_pruned_model(tmp_path)


# ================================================================================================= 3. uploads


class _Api:
    def __init__(self, fail: BaseException | None = None):
        self.fail, self.uploaded = fail, None

    def create_repo(self, repo_id, **kwargs):
        if self.fail is not None:
            raise self.fail

    def create_commit(self, repo_id, operations, **kwargs):
        self.uploaded = sorted(op.path_in_repo for op in operations)
        return type("Commit", (), {"commit_url": "https://hub/commit"})()


def test_push_skips_symlinks_and_says_so(saved_vit, tmp_path, caplog):
    from optimum_isoprune.hub import push_to_hub

    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    os.symlink(secret, saved_vit / "hostname")
    os.symlink(tmp_path, saved_vit / "linked_dir")
    api = _Api()
    with caplog.at_level(logging.WARNING, logger="optimum_isoprune.hub"):
        push_to_hub(saved_vit, "me/tiny", api=api)
    assert "hostname" not in api.uploaded and not any(f.startswith("linked_dir") for f in api.uploaded)
    assert "model.safetensors" in api.uploaded
    assert "Not uploading 2 symbolic link(s)" in caplog.text and "hostname" in caplog.text


def test_hub_client_runtime_error_is_a_publish_error(saved_vit):
    from optimum_isoprune.hub import HubPublishError, push_to_hub

    with pytest.raises(HubPublishError, match=r"create the repo.*RuntimeError: boom.*retry") as info:
        push_to_hub(saved_vit, "me/tiny", api=_Api(RuntimeError("boom")))
    assert info.value.step == "create the repo"


@pytest.mark.parametrize("repo_id", [None, "", 42])
def test_push_needs_a_repo_id(saved_vit, repo_id):
    from optimum_isoprune.hub import push_to_hub

    with pytest.raises(ValueError, match="Invalid Hub repo id.*namespace/name"):
        push_to_hub(saved_vit, repo_id, api=_Api())


# =========================================================================================== 4. permissions


def test_save_keeps_the_folder_mode(saved_vit):
    os.chmod(saved_vit, 0o700)
    save_pruned_model(pruned("vit"), saved_vit)
    assert stat.S_IMODE(os.stat(saved_vit).st_mode) == 0o700


def test_new_folder_respects_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        save_pruned_model(pruned("timm_resnet"), tmp_path / "new")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "new").st_mode) == 0o750


# ==================================================================================== 5. kill at every point


KILL_POINTS = ["while writing", "before the swap", "between the renames", "after the swap", "while removing the old"]


def _kill_in_child(point: str, target) -> int:
    """Fork; the child saves a new model over `target` and dies (os._exit) at `point`; returns its exit status."""
    model = pruned("deit")
    pid = os.fork()
    if pid:
        return os.waitpid(pid, 0)[1]
    try:  # the child: no cleanup code may run after the kill
        die = functools.partial(os._exit, 9)
        rename, rmtree = os.rename, shutil.rmtree
        if point == "while writing":
            modeling_pruned.record_checksums = lambda *a: die()
        elif point == "before the swap":
            modeling_pruned._swap_into_place = lambda *a, **k: die()
        elif point == "between the renames":
            modeling_pruned._exchange = lambda a, b: False
            calls = []
            os.rename = lambda a, b: (calls.append(a), die() if len(calls) == 2 else rename(a, b))
        elif point == "after the swap":
            shutil.rmtree = lambda *a, **k: die()
        elif point == "while removing the old":
            modeling_pruned._exchange = lambda a, b: False

            def half(path, *a, **k):
                os.remove(os.path.join(path, "model.safetensors"))
                die()

            shutil.rmtree = half
        save_pruned_model(model, target)
        os._exit(0)
    except BaseException:
        os._exit(1)
    finally:
        os.rename, shutil.rmtree = rename, rmtree


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("point", KILL_POINTS)
def test_a_killed_save_never_loses_the_checkpoint(tmp_path, point):
    target = tmp_path / "ckpt"
    old = pruned("vit")
    save_pruned_model(old, target)
    x = pixels()
    old_logits, new_logits = logits(old, x), logits(pruned("deit"), x)
    status = _kill_in_child(point, target)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 9, status
    loaded = logits(load_pruned_model(target), x)  # recovers a `.previous` when the kill left one
    assert torch.equal(loaded, old_logits) or torch.equal(loaded, new_logits)
    save_pruned_model(pruned("vit"), target)  # the next save cleans what the killed one left
    assert leftovers(tmp_path) == []
    assert torch.equal(logits(load_pruned_model(target), x), old_logits)


# ================================================================================= 6. stale files, card errors


def test_a_save_replaces_package_files_as_a_whole(tmp_path):
    target = tmp_path / "ckpt"
    _pruner("vit").save_pretrained(target)
    (target / "demo_summary.json").write_text("{}")
    (target / "notes.txt").write_text("mine")
    assert (target / "pruning_report.json").exists() and (target / "README.md").exists()
    save_pruned_model(pruned("timm_resnet"), target)  # run B: no report, config or card
    files = sorted(os.listdir(target))  # the image processor is kept on purpose (it may be the user's own)
    assert files == ["config.json", "model.safetensors", "notes.txt", "preprocessor_config.json"], files


def test_a_card_error_leaves_the_old_checkpoint_untouched(saved_vit):
    before = snapshot(saved_vit)
    with pytest.raises(ValueError, match="eval_results needs 'split'"):  # another model, so a swap would show
        _pruner("deit").save_pretrained(saved_vit, eval_results={"dataset": "x", "after": {"top1": 0.5}})
    assert snapshot(saved_vit) == before and leftovers(saved_vit.parent) == []


def test_prune_cli_says_it_replaces_a_checkpoint(saved_vit, tmp_path, caplog):
    folder = tmp_path / "stock"
    build("vit").save_pretrained(folder)
    with caplog.at_level(logging.WARNING):
        assert (
            main(
                [
                    "--quiet",
                    "prune",
                    str(folder),
                    "--prune-ratio",
                    "0.5",
                    "--importance",
                    "magnitude",
                    "--output",
                    str(saved_vit),
                ]
            )
            == 0
        )
    assert "holds a checkpoint; it will be replaced" in caplog.text


@pytest.mark.parametrize("output", ["/proc/isoprune-test/out", "file"])
def test_prune_cli_checks_the_output_before_pruning(tmp_path, capsys, monkeypatch, output):
    folder = tmp_path / "stock"
    build("vit").save_pretrained(folder)
    if output == "file":
        output = str(tmp_path / "file")
        open(output, "w").close()
    monkeypatch.setattr(IsomorphicPruner, "prune", lambda *a, **k: pytest.fail("pruned before checking --output"))
    capsys.readouterr()
    assert main(["prune", str(folder), "--prune-ratio", "0.5", "--output", output]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Cannot save to" in err and ".saving-" not in err


# ================================================================================================ 7-8. distill


@pytest.fixture
def student_dir(tmp_path):
    folder = tmp_path / "student"
    _pruner("vit").save_pretrained(folder)
    return folder


@pytest.mark.parametrize("damage", ["no report", "bad config"])
def test_distill_validates_the_student_before_training(student_dir, tmp_path, capsys, monkeypatch, damage):
    from transformers import Trainer

    if damage == "no report":
        os.remove(student_dir / "pruning_report.json")
    else:
        (student_dir / "pruning_config.json").write_text(json.dumps({"pruning_ratio": 0.5, "prune_heads": "no"}))
    monkeypatch.setattr(Trainer, "train", lambda *a, **k: pytest.fail("trained before validating the inputs"))
    rc = main(
        [
            "distill",
            "--student",
            str(student_dir),
            "--teacher",
            str(student_dir),
            "--dataset",
            "fashion-mnist",
            "--output",
            str(tmp_path / "out"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1
    assert ("pruning_report.json" in err) if damage == "no report" else ("prune_heads must be True or False" in err)


def _tiny_split(*args, **kwargs):
    import numpy as np
    from datasets import ClassLabel, Dataset, Features, Image

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8) for _ in range(8)]
    return Dataset.from_dict(
        {"image": images, "label": [i % 10 for i in range(8)]},
        features=Features({"image": Image(), "label": ClassLabel(num_classes=10)}),
    )


def test_distill_saves_the_weights_before_a_later_failure(student_dir, tmp_path, capsys, monkeypatch):
    import optimum_isoprune.card as card
    import optimum_isoprune.cli as cli

    monkeypatch.setattr(cli, "load_split", _tiny_split)
    monkeypatch.setattr(card, "save_model_card", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("card broke")))
    out = tmp_path / "kd"
    rc = main(
        [
            "distill",
            "--student",
            str(student_dir),
            "--teacher",
            str(student_dir),
            "--dataset",
            "x",
            "--max-steps",
            "1",
            "--batch-size",
            "4",
            "--output",
            str(out),
            "--cpu",
            "--latency-repeats",
            "0",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "card broke" in err and f"distilled weights are saved in {out}" in err
    assert load_pruned_model(out) is not None


@pytest.mark.parametrize("flags", [["--epochs", "-1"], ["--epochs", "0"], ["--max-steps", "0"], ["--max-steps", "-5"]])
def test_distill_refuses_nothing_to_train(student_dir, tmp_path, capsys, flags):
    with pytest.raises(SystemExit) as info:
        main(
            [
                "distill",
                "--student",
                str(student_dir),
                "--teacher",
                str(student_dir),
                "--dataset",
                "fashion-mnist",
                "--output",
                str(tmp_path / "out"),
                *flags,
            ]
        )
    assert info.value.code == 2 and "must be a positive" in capsys.readouterr().err


def test_training_arguments_refuse_nothing_to_train(tmp_path):
    from optimum_isoprune import DistillationTrainingArguments

    with pytest.raises(ValueError, match="trains nothing"):
        DistillationTrainingArguments(output_dir=str(tmp_path), num_train_epochs=-1, report_to="none")


# ================================================================================ 9-10. non-finite numbers


def _prune(calibration, name="vit", **kwargs):
    kwargs.setdefault("pruning_ratio", 0.5)
    return IsomorphicPruner(build(name)).prune(
        calibration_dataset=calibration, num_calibration_batches=2, calibration_batch_size=4, **kwargs
    )


def _loader(x, y):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)


def test_nan_pixel_in_calibration_is_named():
    x = pixels(8)
    x[5, 0, 3, 3] = float("nan")
    with pytest.raises(NonFiniteError, match="pixel_values in calibration batch 1 holds 1 NaN/inf"):
        _prune(x)


def test_all_ignored_labels_are_refused():
    with pytest.raises(CalibrationDataError, match="Every label in calibration batch 0 is -100"):
        _prune(_loader(pixels(8), torch.full((8,), -100)))


@pytest.mark.parametrize(
    "labels, message",
    [
        (torch.full((8,), 15), r"range over 15\.\.15, but the model has 10 classes"),
        (torch.full((8,), -3), "include -3: class indices start at 0"),
    ],
)
def test_out_of_range_calibration_labels_are_named(labels, message):
    with pytest.raises(CalibrationDataError, match=message):
        _prune(_loader(pixels(8), labels))


def test_float_labels_are_not_truncated():
    with pytest.raises(CalibrationDataError, match=r"not whole numbers \(e\.g\. \[1\.7"):
        _prune(_loader(pixels(8), torch.full((8,), 1.7)))


@pytest.mark.parametrize("importance", ["magnitude", "taylor"])
def test_nan_weight_is_named(importance):
    model = build("vit")
    with torch.no_grad():
        model.get_parameter("vit.layers.0.mlp.fc1.weight")[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"parameter\(s\) holding NaN/inf.*layers\.0\.mlp\.fc1\.weight \(1\)"):
        IsomorphicPruner(model).prune(pruning_ratio=0.5, importance=importance, calibration_dataset=pixels(8))


def test_overflowing_inputs_stop_calibration():
    with pytest.raises(NonFiniteError, match="calibration batch 0"):
        _prune(pixels(8) * 1e38)


def test_empty_calibration_tensor_is_named():
    with pytest.raises(CalibrationDataError, match="holds no images"):
        _prune(torch.empty(0, 3, IMAGE_SIZE, IMAGE_SIZE))


class _NaNTeacher(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, pixel_values=None, **kwargs):
        out = self.model(pixel_values=pixel_values)
        out.logits = out.logits * float("nan")
        return out


def _trainer(student, teacher, tmp_path, dataset=None, **kwargs):
    from optimum_isoprune import DistillationTrainer, DistillationTrainingArguments
    from optimum_isoprune.data import prepare_dataset

    kwargs.setdefault("save_strategy", "no")
    args = DistillationTrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        distillation_type="soft",
        max_steps=2,
        per_device_train_batch_size=4,
        report_to="none",
        use_cpu=True,
        **kwargs,
    )
    dataset = prepare_dataset(_tiny_split() if dataset is None else dataset, model=student)
    return DistillationTrainer(model=student, args=args, teacher_model=teacher, train_dataset=dataset)


def test_nan_teacher_stops_distillation_before_the_student_changes(tmp_path):
    student = pruned("vit")
    before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = _trainer(student, _NaNTeacher(build("vit")), tmp_path)
    with pytest.raises(NonFiniteError, match="teacher's logits at training step 0 holds"):
        trainer.train()
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())


def test_nan_weights_are_never_saved(tmp_path):
    model = pruned("vit")
    with torch.no_grad():
        next(model.parameters())[0] = float("inf")
    with pytest.raises(NonFiniteError, match="Refusing to save.*NaN or inf.*Nothing was written"):
        save_pruned_model(model, tmp_path / "nan")
    with pytest.raises(ValueError, match="Refusing to save"):
        model.save_pretrained(tmp_path / "nan")
    assert not (tmp_path / "nan").exists() and leftovers(tmp_path) == []


def test_out_of_range_training_labels_fail_before_training(tmp_path):
    dataset = _tiny_split().cast_column("label", __import__("datasets").Value("int64")).map(lambda e: {"label": 15})
    with pytest.raises(ValueError, match=r"first training example range over 15\.\.15, but the model has 10 classes"):
        _trainer(pruned("vit"), build("vit"), tmp_path, dataset=dataset)


def test_out_of_range_labels_in_a_later_batch_stop_training(tmp_path):
    dataset = _tiny_split().cast_column("label", __import__("datasets").Value("int64"))
    dataset = dataset.map(lambda e, i: {"label": 15 if i == 5 else e["label"]}, with_indices=True)
    trainer = _trainer(pruned("vit"), build("vit"), tmp_path, dataset=dataset)
    with pytest.raises(ValueError, match=r"batch at training step \d range over .*15, but the model has 10 classes"):
        trainer.train()


def test_empty_training_set_is_named(tmp_path):
    with pytest.raises(ValueError, match="training set is empty"):
        _trainer(pruned("vit"), build("vit"), tmp_path, dataset=_tiny_split().select([]))


# ========================================================================================= 11. edited checkpoints


def _first_attention(config):
    return next(name for name, attrs in config["pruned_attributes"].items() if "num_attention_heads" in attrs)


def _double_heads(config):
    attrs = config["pruned_attributes"][_first_attention(config)]
    attrs["num_attention_heads"], attrs["head_dim"] = attrs["num_attention_heads"] * 2, attrs["head_dim"] // 2


EDITS = {
    "heads and head dim swapped consistently": (_double_heads, "edited after saving"),
    "head count only": (
        lambda c: c["pruned_attributes"][_first_attention(c)].update(num_attention_heads=3),
        "num_attention_heads=3",
    ),
    "pruned_attributes deleted": (lambda c: c.pop("pruned_attributes"), r"records sizes .* but its weight has shape"),
    "method injected": (lambda c: c["pruned_attributes"].update({"": {"forward": 1}}), r"overwrite .*\.forward"),
    "attribute of another kind": (
        lambda c: c["pruned_attributes"][_first_attention(c)].update(head_dim=[1, 2]),
        "same kind",
    ),
    "checksum damaged": (lambda c: c.update(pruned_checksums="x"), "damaged 'pruned_checksums'"),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_edited_configs_are_refused(saved_vit, edit):
    change, message = EDITS[edit]
    if edit != "heads and head dim swapped consistently" and edit != "checksum damaged":
        _edit_config(saved_vit, lambda c: c.pop("pruned_checksums"))  # the structural check alone must catch it
    _edit_config(saved_vit, change)
    with pytest.raises(PrunedCheckpointError, match=message):
        load_pruned_model(saved_vit)


@pytest.mark.parametrize("name", ["vit", "timm_vit"])
def test_flipped_bytes_in_the_weights_are_detected(tmp_path, name):
    save_pruned_model(pruned(name), tmp_path)
    weights = tmp_path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x40
    weights.write_bytes(bytes(data))
    with pytest.raises(PrunedCheckpointError, match="tensor data differs from the checksum.*modified or damaged"):
        load_pruned_model(tmp_path)


def test_every_saved_tensor_is_shape_checked(saved_vit):
    """The pre-check sees every tensor under its on-disk name (transformers renames q/k/v on disk)."""
    from optimum_isoprune.modeling.modeling_pruned import _saved_names

    model = load_pruned_model(saved_vit)
    state = model.state_dict()
    known = set(state) | set(_saved_names(model, state))
    on_disk = set(load_file(saved_vit / "model.safetensors"))
    assert on_disk <= known, sorted(on_disk - known)[:5]
    # and a renamed tensor with a wrong shape is caught by it, naming the tensor
    renamed = sorted(on_disk - set(state))
    assert renamed, "expected transformers to rename some tensors on disk"
    weights = load_file(saved_vit / "model.safetensors")
    weights[renamed[0]] = torch.zeros(*[n + 1 for n in weights[renamed[0]].shape])
    save_file(weights, saved_vit / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(PrunedCheckpointError, match=rf"does not match .*{renamed[0]}"):
        load_pruned_model(saved_vit)


# =========================================================================================== 12. config types


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(pruning_ratio=0.5, prune_heads="no"), "prune_heads must be True or False"),
        (dict(pruning_ratio=0.5, prune_head_dims=0), "prune_head_dims must be True or False"),
        (dict(target_macs="1e9"), "target_macs must be a finite number"),
        (dict(target_params=float("nan")), "target_params must be a finite number"),
        (dict(pruning_ratio=0.5, image_size=32.5), "image_size must be an integer"),
        (dict(pruning_ratio=0.5, ignored_modules="classifier"), r"ignored_modules must be a list of module names"),
        (dict(pruning_ratio=0.5, ignored_modules=[3]), r"ignored_modules must be a list"),
        (dict(pruning_ratio=0.5, round_to=True), "round_to must be an integer"),
        (dict(pruning_ratio=0.5, seed="0"), "seed must be an integer"),
    ],
)
def test_config_fields_are_type_checked(kwargs, message):
    with pytest.raises(TypeError, match=message):
        IsomorphicPruningConfig(**kwargs)


def test_prune_with_a_string_is_a_type_error():
    with pytest.raises(TypeError, match=r"takes an IsomorphicPruningConfig.*'x'"):
        IsomorphicPruner(build("vit")).prune("x")


def test_headless_model_is_named():
    """ViTModel, Dinov2Model and CLIPVisionModel are pruned on their features (tests/test_backbones.py); another
    backbone of a supported classifier family is refused, naming its classifier."""
    from transformers import DeiTConfig, DeiTModel

    kwargs = {k: v for k, v in VIT_KWARGS.items() if k != "num_labels"}
    with pytest.raises(
        UnsupportedModelError, match="DeiTModel has no classification head.*Prune the classifier.*DeiTForImage"
    ):
        IsomorphicPruner(DeiTModel(DeiTConfig(**kwargs))).prune(pruning_ratio=0.5, importance="magnitude")


# ================================================================================================ also


def test_prune_does_not_reset_the_global_rng():
    pruner = IsomorphicPruner(build("vit"))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    pruner.prune(pruning_ratio=0.5, calibration_dataset=pixels(8), seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_resuming_from_a_truncated_checkpoint_names_the_file(tmp_path):
    student = pruned("vit")
    trainer = _trainer(student, build("vit"), tmp_path)
    checkpoint = tmp_path / "checkpoint-1"
    student.save_pretrained(checkpoint)
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-50])
    with pytest.raises(PrunedCheckpointError, match=r"checkpoint-1/model\.safetensors is truncated"):
        trainer._load_from_checkpoint(str(checkpoint))


def test_resuming_loads_trainer_state_without_unpickling_code(tmp_path, monkeypatch):
    trainer = _trainer(pruned("vit"), build("vit"), tmp_path, save_strategy="steps", save_steps=1)
    trainer.args.max_steps = 1
    trainer.train()
    checkpoint = tmp_path / "trainer" / "checkpoint-1"
    assert checkpoint.is_dir()
    calls = []
    original = torch.load

    def recording(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording)
    trainer = _trainer(pruned("vit"), build("vit"), tmp_path, save_strategy="no")
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert calls and all(flag is True for flag in calls), calls


def test_ctrl_c_while_starting_is_one_line_and_130(tmp_path):
    """The console script's handler is installed when the package is imported: a SIGINT from then on (while the
    command would still be importing torch) gives one line and 130. The child says when it is ready, so the
    test does not depend on how fast the machine starts Python."""
    script = (
        "import sys; sys.argv = ['optimum-isoprune']; import optimum_isoprune, time; "
        "print('ready', flush=True); time.sleep(60)"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path
    )
    assert process.stdout.readline().strip() == "ready"
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, (process.returncode, err[-2000:])
    assert err.strip() == "optimum-isoprune: interrupted"


def test_ctrl_c_during_a_command_is_one_line_and_130(monkeypatch, capsys):
    import optimum_isoprune.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_evaluate", interrupted)
    parser = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _with_func(parser(), interrupted))
    assert main(["evaluate", "x", "--dataset", "fashion-mnist"]) == 130
    assert capsys.readouterr().err.strip() == "optimum-isoprune: interrupted"


def _with_func(parser, func):
    parser.set_defaults(func=func)
    for action in parser._subparsers._group_actions:
        for sub in action.choices.values():
            sub.set_defaults(func=func)
    return parser
