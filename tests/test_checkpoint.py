"""save_pruned_model / load_pruned_model: timm layout, pruning config and report beside the weights,
identical re-saves, strict loading with clear errors, atomic saves, nothing pickled."""

from __future__ import annotations

import copy
import functools
import json
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForImageClassification, PreTrainedModel

from models import IMAGE_SIZE, MATRIX, build, logits
from optimum_isoprune import IsomorphicPruner, IsomorphicPruningConfig, PruningReport
from optimum_isoprune.checkpoint import load_pruned_model, save_pruned_model
from optimum_isoprune.modeling import PrunedCheckpointError, to_pruned_model

# Every bare timm model of the support matrix (the TimmWrapper rows are transformers checkpoints: test_modeling.py).
TIMM_FAMILIES = sorted(n for n in MATRIX if n.startswith("timm_") and not n.startswith("timm_wrapper"))


def pixels(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


@functools.lru_cache(maxsize=None)
def _pruned_cached(name: str) -> tuple[nn.Module, IsomorphicPruningConfig, PruningReport]:
    config = IsomorphicPruningConfig(pruning_ratio=0.5, importance="magnitude")
    pruner = IsomorphicPruner(build(name))
    return pruner.prune(config), config, pruner.report


def pruned(name: str) -> nn.Module:
    return copy.deepcopy(_pruned_cached(name)[0])


def files_in(directory) -> dict[str, bytes]:
    return {f: open(os.path.join(directory, f), "rb").read() for f in sorted(os.listdir(directory))}


# --- timm -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TIMM_FAMILIES)
def test_timm_save_and_load_are_exact(name, tmp_path):
    model = pruned(name)
    x = pixels()
    expected = logits(model, x)
    save_pruned_model(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architecture"] == model.pretrained_cfg["architecture"]
    assert config["num_classes"] == 10 and config["model_args"]["num_classes"] == 10
    assert "pretrained_cfg" in config and config["pruned_shapes"]
    loaded = load_pruned_model(tmp_path)
    assert type(loaded) is type(model)
    assert not loaded.training
    assert torch.equal(logits(loaded, x), expected)
    assert loaded.pretrained_cfg["architecture"] == config["architecture"]


def test_timm_summary_fields_follow_the_modules(tmp_path):
    model = pruned("timm_deit_distilled")
    save_pruned_model(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["layer_num_heads"] == [block.attn.num_heads for block in model.blocks]
    assert config["layer_intermediate_sizes"] == [block.mlp.fc1.out_features for block in model.blocks]


def test_timm_model_built_with_other_arguments_needs_model_args(tmp_path):
    model = pruned("timm_vit")
    del model._model_args
    vars(model).pop("pruned_manifest", None)
    with pytest.raises(ValueError, match="model_args"):
        save_pruned_model(model, tmp_path / "no_args")
    args = dict(img_size=IMAGE_SIZE, patch_size=8, embed_dim=64, depth=3, num_heads=4, num_classes=10)
    to_pruned_model(model, model_args=args)
    save_pruned_model(model, tmp_path / "with_args")
    assert torch.equal(logits(load_pruned_model(tmp_path / "with_args"), pixels()), logits(model, pixels()))


def test_timm_checkpoint_can_be_pruned_and_saved_again(tmp_path):
    save_pruned_model(pruned("timm_convnext"), tmp_path / "first")
    first = load_pruned_model(tmp_path / "first")
    pruner = IsomorphicPruner(first)
    again = pruner.prune(IsomorphicPruningConfig(pruning_ratio=0.3, importance="magnitude"))
    assert sum(p.numel() for p in again.parameters()) < sum(p.numel() for p in first.parameters())
    save_pruned_model(again, tmp_path / "second")
    assert torch.equal(logits(load_pruned_model(tmp_path / "second"), pixels()), logits(again, pixels()))


# --- config, report, image processor ----------------------------------------------------------


@pytest.mark.parametrize("name", ["vit", "timm_resnet"])
def test_pruning_config_and_report_are_saved_beside_the_weights(name, tmp_path):
    model, config, report = _pruned_cached(name)
    save_pruned_model(copy.deepcopy(model), tmp_path, pruning_config=config, report=report)
    assert IsomorphicPruningConfig.from_pretrained(tmp_path) == config
    assert PruningReport.from_pretrained(tmp_path).params_after == report.params_after


def test_stock_class_model_is_converted_and_image_processor_kept(tmp_path):
    from transformers import ViTImageProcessor

    stock = build("vit")
    processor = ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=[0.1] * 3)
    saved = save_pruned_model(stock, tmp_path, image_processor=processor, base_model_name_or_path="tiny/vit")
    assert type(saved).__name__ == "PrunedViTForImageClassification"
    assert type(stock).__name__ == "ViTForImageClassification"  # the caller's model is untouched
    assert json.loads((tmp_path / "preprocessor_config.json").read_text())["image_mean"] == [0.1] * 3
    assert json.loads((tmp_path / "config.json").read_text())["base_model_name_or_path"] == "tiny/vit"
    assert torch.equal(logits(load_pruned_model(tmp_path), pixels()), logits(stock, pixels()))


def test_stock_transformers_checkpoint_loads_too(tmp_path):
    stock = build("resnet")
    stock.save_pretrained(tmp_path)
    loaded = load_pruned_model(tmp_path)
    assert type(loaded) is type(stock)
    assert torch.equal(logits(loaded, pixels()), logits(stock, pixels()))


# --- timm wrapper -----------------------------------------------------------------------------


def test_timm_wrapper_loads_every_way(tmp_path):
    import numpy as np
    from PIL import Image
    from transformers import pipeline

    model = pruned("timm_wrapper")
    x = pixels()
    expected = logits(model, x)
    save_pruned_model(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "pruned_timm_wrapper" and config["architecture"] == "vit_tiny_patch16_224"
    assert torch.equal(logits(load_pruned_model(tmp_path), x), expected)
    remote = AutoModelForImageClassification.from_pretrained(tmp_path, trust_remote_code=True)
    assert torch.equal(logits(remote, x), expected)
    image = Image.fromarray((np.random.RandomState(0).rand(40, 48, 3) * 255).astype("uint8"))
    assert len(pipeline("image-classification", model=str(tmp_path), trust_remote_code=True)(image)) == 5


# --- determinism ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["convnext", "timm_deit_distilled"])
def test_saving_twice_gives_identical_tensors(name, tmp_path):
    model = pruned(name)
    save_pruned_model(model, tmp_path / "a")
    save_pruned_model(model, tmp_path / "b")
    save_pruned_model(model, tmp_path / "b")  # over an existing checkpoint
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert files_in(tmp_path / "a") == files_in(tmp_path / "b")
    # A loaded checkpoint saved again is the same checkpoint.
    save_pruned_model(load_pruned_model(tmp_path / "a"), tmp_path / "c")
    c = load_file(tmp_path / "c" / "model.safetensors")
    assert all(torch.equal(a[k], c[k]) for k in a)
    assert (
        json.loads((tmp_path / "a" / "config.json").read_text())["pruned_shapes"]
        == json.loads((tmp_path / "c" / "config.json").read_text())["pruned_shapes"]
    )


def test_nothing_is_pickled(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint must never be pickled")

    monkeypatch.setattr(torch, "save", refuse)
    monkeypatch.setattr(pickle, "dump", refuse)
    for name in ("deit_teacher", "timm_vit"):
        save_pruned_model(pruned(name), tmp_path / name)
        assert all(f.endswith((".json", ".safetensors", ".py")) for f in os.listdir(tmp_path / name))
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    for name in ("deit_teacher", "timm_vit"):
        load_pruned_model(tmp_path / name)


# --- loading errors ---------------------------------------------------------------------------


@pytest.fixture(params=["vit", "timm_vit"])
def saved(request, tmp_path):
    save_pruned_model(pruned(request.param), tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_truncated_weights_name_the_file(saved):
    weights = saved / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    with pytest.raises(PrunedCheckpointError, match=r"model\.safetensors.*truncated"):
        load_pruned_model(saved)
    weights.write_bytes(data[:5])
    with pytest.raises(PrunedCheckpointError, match=r"model\.safetensors.*truncated"):
        load_pruned_model(saved)


def test_missing_weights_file_names_the_file(saved):
    os.remove(saved / "model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        load_pruned_model(saved)


def test_missing_config_names_the_file(saved):
    os.remove(saved / "config.json")
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_pruned_model(saved)


def test_config_widths_that_disagree_with_the_weights(saved):
    config_file = saved / "config.json"
    config = json.loads(config_file.read_text())
    module, tensors = next(
        (m, t) for m, t in config["pruned_shapes"].items() if "weight" in t and len(t["weight"]) == 2
    )
    tensors["weight"] = [tensors["weight"][0] + 1, tensors["weight"][1]]
    tensors.pop("bias", None)
    config_file.write_text(json.dumps(config))
    with pytest.raises(
        PrunedCheckpointError, match=rf"model\.safetensors does not match .*config\.json.*{module}\.weight"
    ):
        load_pruned_model(saved)


def test_stock_widths_in_config_are_refused(saved):
    config_file = saved / "config.json"
    config = json.loads(config_file.read_text())
    config["pruned_shapes"] = {}
    config_file.write_text(json.dumps(config))
    with pytest.raises(PrunedCheckpointError, match="differ"):
        load_pruned_model(saved)


def test_missing_and_unexpected_tensors_are_errors_not_random_weights(saved):
    weights = saved / "model.safetensors"
    state = load_file(weights)
    name = sorted(k for k in state if k.endswith("bias"))[0]
    missing = {k: v for k, v in state.items() if k != name}
    save_file(missing, weights, metadata={"format": "pt"})
    with pytest.raises(PrunedCheckpointError, match=rf"missing keys.*{name}"):
        load_pruned_model(saved)
    save_file({**state, "surprise.weight": torch.zeros(3)}, weights, metadata={"format": "pt"})
    with pytest.raises(PrunedCheckpointError, match="unexpected keys.*surprise.weight"):
        load_pruned_model(saved)


def test_errors_also_through_the_auto_class(tmp_path):
    save_pruned_model(pruned("convnext"), tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(PrunedCheckpointError, match=r"model\.safetensors"):
        AutoModelForImageClassification.from_pretrained(tmp_path, trust_remote_code=True)


def test_ignore_mismatched_sizes_is_refused(tmp_path):
    save_pruned_model(pruned("vit"), tmp_path)
    with pytest.raises(ValueError, match="ignore_mismatched_sizes"):
        AutoModelForImageClassification.from_pretrained(tmp_path, trust_remote_code=True, ignore_mismatched_sizes=True)


# --- atomic saves -----------------------------------------------------------------------------


def _leftovers(parent) -> list[str]:
    return [f for f in os.listdir(parent) if ".saving-" in f]


def test_failed_transformers_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    save_pruned_model(pruned("vit"), target)
    before = files_in(target)

    original = PreTrainedModel.save_pretrained

    def half_written(self, directory, *args, **kwargs):
        original(self, directory, *args, **kwargs)
        with open(os.path.join(directory, "model.safetensors"), "wb") as f:
            f.write(b"half")
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", half_written)
    with pytest.raises(KeyboardInterrupt):
        pruned("deit").save_pretrained(target)
    assert files_in(target) == before
    assert _leftovers(tmp_path) == []
    load_pruned_model(target)


def test_failed_timm_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    save_pruned_model(pruned("timm_convnext"), target)
    before = files_in(target)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        save_pruned_model(pruned("timm_resnet"), target)
    assert files_in(target) == before
    assert _leftovers(tmp_path) == []


def test_resave_keeps_other_files_and_drops_stale_shards(tmp_path):
    target = tmp_path / "ckpt"
    save_pruned_model(pruned("resnet"), target)
    (target / "README.md").write_text("my card")
    (target / "model-00001-of-00002.safetensors").write_bytes(b"stale")
    (target / "preprocessor_config.json").write_text(
        (target / "preprocessor_config.json").read_text().replace('"do_resize": true', '"do_resize": false')
    )
    save_pruned_model(pruned("resnet"), target)
    assert (target / "README.md").read_text() == "my card"
    assert not (target / "model-00001-of-00002.safetensors").exists()
    assert '"do_resize": false' in (target / "preprocessor_config.json").read_text()  # the user's processor is kept


def test_saving_onto_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="file"):
        save_pruned_model(pruned("timm_vit"), tmp_path / "file")


# --- fresh process ----------------------------------------------------------------------------


@pytest.mark.slow
def test_fresh_process_loads_timm_checkpoints(tmp_path):
    directories = []
    for name in TIMM_FAMILIES:
        model = pruned(name)
        save_pruned_model(model, tmp_path / name)
        x = pixels()
        save_file({"x": x, "logits": logits(model, x).contiguous()}, tmp_path / f"{name}.io.safetensors")
        directories.append(str(tmp_path / name))
    script = tmp_path / "load.py"
    script.write_text(
        textwrap.dedent(
            """
        import sys, torch
        from safetensors.torch import load_file
        from optimum_isoprune.checkpoint import load_pruned_model
        for directory in sys.argv[1:]:
            io = load_file(directory + ".io.safetensors")
            assert torch.equal(load_pruned_model(directory)(io["x"]), io["logits"]), directory
        print("ok", len(sys.argv) - 1)
        """
        )
    )
    result = subprocess.run(
        [sys.executable, str(script), *directories],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"ok {len(TIMM_FAMILIES)}" in result.stdout
