"""Pruned transformers checkpoints: exact logits through to_pruned_model, save_pretrained, Auto classes,
pipeline(), load_pruned_model and a fresh process that cannot import optimum_isoprune."""

from __future__ import annotations

import ast
import copy
import functools
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch_pruning as tp
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from transformers import (
    AutoModelForImageClassification,
    ViTConfig,
    ViTForMaskedImageModeling,
    pipeline,
)

import optimum_isoprune.modeling as modeling
from models import IMAGE_SIZE, VIT_KWARGS, build, logits
from optimum_isoprune import IsomorphicPruner, IsomorphicPruningConfig
from optimum_isoprune.checkpoint import load_pruned_model
from optimum_isoprune.modeling import PrunedConfigMixin, PrunedModelMixin, PrunedViTConfig, to_pruned_model

HF_FAMILIES = [
    "vit",
    "deit",
    "deit_teacher",
    "dinov2",
    "dinov2_swiglu",
    "dinov2_registers",
    "beit",
    "beit_shared",
    "data2vec_vision",
    "clip",
    "siglip",
    "siglip_head",
    "convnext",
    "convnextv2",
    "resnet",
    "mobilenet_v2",
    "regnet",
    "regnet_x",
    "efficientnet",
    "timm_wrapper",
    "timm_wrapper_deit3",
    "timm_wrapper_mobilenetv3",
    "hf_swinv2",
    "levit",
    "levit_teacher",
]
EXPECTED_CLASS = {
    "vit": "PrunedViTForImageClassification",
    "deit": "PrunedDeiTForImageClassification",
    "deit_teacher": "PrunedDeiTForImageClassificationWithTeacher",
    "dinov2": "PrunedDinov2ForImageClassification",
    "dinov2_swiglu": "PrunedDinov2ForImageClassification",
    "dinov2_registers": "PrunedDinov2WithRegistersForImageClassification",
    "beit": "PrunedBeitForImageClassification",
    "beit_shared": "PrunedBeitForImageClassification",
    "data2vec_vision": "PrunedData2VecVisionForImageClassification",
    "clip": "PrunedCLIPForImageClassification",
    "siglip": "PrunedSiglipForImageClassification",
    "siglip_head": "PrunedSiglipForImageClassification",
    "convnext": "PrunedConvNextForImageClassification",
    "convnextv2": "PrunedConvNextV2ForImageClassification",
    "resnet": "PrunedResNetForImageClassification",
    "mobilenet_v2": "PrunedMobileNetV2ForImageClassification",
    "regnet": "PrunedRegNetForImageClassification",
    "regnet_x": "PrunedRegNetForImageClassification",
    "efficientnet": "PrunedEfficientNetForImageClassification",
    "timm_wrapper": "PrunedTimmWrapperForImageClassification",
    "timm_wrapper_deit3": "PrunedTimmWrapperForImageClassification",
    "timm_wrapper_mobilenetv3": "PrunedTimmWrapperForImageClassification",
    "hf_swinv2": "PrunedSwinv2ForImageClassification",
    "levit": "PrunedLevitForImageClassification",
    "levit_teacher": "PrunedLevitForImageClassificationWithTeacher",
}
TRAVELLING_FILES = ("configuration_pruned.py", "modeling_pruned.py")


def pixels(seed: int = 0, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


@functools.lru_cache(maxsize=None)
def _pruned_cached(name: str) -> nn.Module:
    return IsomorphicPruner(build(name)).prune(IsomorphicPruningConfig(pruning_ratio=0.5, importance="magnitude"))


def pruned(name: str) -> nn.Module:
    """A physically pruned copy (50%) of the tiny model `name`; a fresh copy every call."""
    return copy.deepcopy(_pruned_cached(name))


def prune_with_torch_pruning(model: nn.Module, ratio: float = 0.3) -> nn.Module:
    """Prune any model (also an already pruned class) with torch-pruning directly, heads included."""
    attentions = [m for m in model.modules() if hasattr(m, "q_proj") and hasattr(m, "num_attention_heads")]
    num_heads = {p: a.num_attention_heads for a in attentions for p in (a.q_proj, a.k_proj, a.v_proj)}
    classifiers = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and "classifier" in n]
    pruner = tp.pruner.MetaPruner(
        model,
        pixels(batch=1),
        forward_fn=lambda m, x: m(pixel_values=x).logits,
        importance=tp.importance.GroupMagnitudeImportance(),
        pruning_ratio=ratio,
        global_pruning=True,
        isomorphic=True,
        num_heads=num_heads,
        prune_num_heads=True,
        ignored_layers=classifiers,
    )
    pruner.step()
    for a in attentions:
        a.num_attention_heads = pruner.num_heads[a.q_proj]
        a.head_dim = a.q_proj.out_features // a.num_attention_heads
    return model


def image() -> Image.Image:
    return Image.fromarray((np.random.RandomState(0).rand(40, 48, 3) * 255).astype("uint8"))


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", HF_FAMILIES)
def test_to_pruned_model_keeps_logits_and_records_widths(name):
    model = pruned(name)
    x = pixels()
    expected = logits(model, x)
    converted = to_pruned_model(model)
    assert type(converted).__name__ == EXPECTED_CLASS[name]
    assert isinstance(converted.config, PrunedConfigMixin)
    assert converted.config.pruned_shapes, "a 50% pruned model must differ from the stock shapes"
    assert converted.config.model_type.startswith("pruned_")
    assert torch.equal(logits(converted, x), expected)
    json.loads(converted.config.to_json_string())  # the whole config is plain JSON


@pytest.mark.parametrize(
    "name", ["vit", "deit_teacher", "convnextv2", "resnet", "mobilenet_v2", "regnet", "efficientnet"]
)
def test_stock_class_pruned_by_torch_pruning_converts_exactly(name, tmp_path):
    model = prune_with_torch_pruning(build(name), ratio=0.5)
    assert not isinstance(model, PrunedModelMixin)
    x = pixels()
    expected = logits(model, x)
    converted = to_pruned_model(model, base_model_name_or_path="tiny/" + name)
    assert type(converted).__name__ == EXPECTED_CLASS[name]
    assert converted.config.base_model_name_or_path == "tiny/" + name
    assert torch.equal(logits(converted, x), expected)
    converted.save_pretrained(tmp_path)
    assert torch.equal(logits(load_pruned_model(tmp_path), x), expected)


def test_vit_summary_fields_match_the_modules():
    converted = to_pruned_model(pruned("vit"))
    attentions = [m for m in converted.modules() if hasattr(m, "q_proj")]
    assert converted.config.layer_num_heads == [a.num_attention_heads for a in attentions]
    assert converted.config.layer_head_dims == [a.head_dim for a in attentions]
    assert converted.config.layer_intermediate_sizes == [layer.mlp.fc1.out_features for layer in converted.vit.layers]
    assert converted.config.pruned_hidden_size == converted.vit.embeddings.cls_token.shape[-1]
    # The stock fields still describe the architecture before pruning.
    assert converted.config.to_base_config().to_dict()["hidden_size"] == build("vit").config.hidden_size


def test_convnext_and_resnet_summary_fields():
    convnext = to_pruned_model(pruned("convnext"))
    stages = convnext.convnext.encoder.stages
    assert convnext.config.stage_hidden_sizes == [s.layers[-1].pwconv2.out_features for s in stages]
    assert convnext.config.stage_intermediate_sizes == [[b.pwconv1.out_features for b in s.layers] for s in stages]
    resnet = to_pruned_model(pruned("resnet"))
    assert len(resnet.config.stage_block_widths) == len(resnet.config.depths)
    assert resnet.config.pruned_embedding_size == resnet.resnet.embedder.embedder.convolution.out_channels


@pytest.mark.parametrize("name", HF_FAMILIES)
def test_save_and_load_are_exact(name, tmp_path):
    model = to_pruned_model(pruned(name))
    x = pixels()
    expected = logits(model, x)
    model.save_pretrained(tmp_path / "ckpt")
    files = sorted(os.listdir(tmp_path / "ckpt"))
    assert {"config.json", "model.safetensors", *TRAVELLING_FILES} <= set(files)
    assert all(f.endswith((".json", ".safetensors", ".py")) for f in files), files
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageClassification"] == f"modeling_pruned.{EXPECTED_CLASS[name]}"
    assert config["architectures"] == [EXPECTED_CLASS[name]]

    remote = AutoModelForImageClassification.from_pretrained(tmp_path / "ckpt", trust_remote_code=True)
    assert torch.equal(logits(remote, x), expected)
    local = load_pruned_model(tmp_path / "ckpt")
    assert type(local).__name__ == EXPECTED_CLASS[name]
    assert torch.equal(logits(local, x), expected)
    # Registered on import: the Auto class works without trust_remote_code too.
    auto = AutoModelForImageClassification.from_pretrained(tmp_path / "ckpt")
    assert torch.equal(logits(auto, x), expected)


def test_loaded_weights_own_aligned_memory(tmp_path):
    # Weights left in the memory-mapped file sit at unaligned offsets, where CPU kernels may round
    # differently (seen on ConvNeXt-B: 4e-7); loading copies them so logits stay bit-identical.
    to_pruned_model(pruned("convnext")).save_pretrained(tmp_path)
    for loaded in (
        load_pruned_model(tmp_path),
        AutoModelForImageClassification.from_pretrained(tmp_path, trust_remote_code=True),
    ):
        assert all(t.data_ptr() % 64 == 0 for t in [*loaded.parameters(), *loaded.buffers()] if t.numel())


@pytest.mark.parametrize("name", HF_FAMILIES)
def test_pipeline_loads_the_saved_directory(name, tmp_path):
    model = to_pruned_model(pruned(name))
    model.save_pretrained(tmp_path)
    classifier = pipeline("image-classification", model=str(tmp_path), trust_remote_code=True)
    assert type(classifier.model).__name__ == EXPECTED_CLASS[name]
    predictions = classifier(image(), top_k=10)
    assert len(predictions) == 10
    assert abs(sum(p["score"] for p in predictions) - 1.0) < 1e-4
    # Same preprocessing, same model: the pipeline's top score is the model's.
    inputs = classifier.image_processor(image(), return_tensors="pt")
    with torch.no_grad():
        probs = logits(model.eval(), inputs["pixel_values"]).softmax(-1)[0]
    assert predictions[0]["score"] == pytest.approx(probs.max().item(), abs=1e-6)


@pytest.mark.parametrize("name", ["vit", "resnet"])
def test_stock_model_passes_through_unchanged(name, tmp_path):
    stock = build(name)
    x = pixels()
    converted = to_pruned_model(stock)
    assert converted.config.pruned_shapes == {} and converted.config.pruned_attributes == {}
    assert torch.equal(logits(converted, x), logits(stock, x))
    converted.save_pretrained(tmp_path)
    assert torch.equal(logits(load_pruned_model(tmp_path), x), logits(stock, x))


def test_pruner_at_ratio_zero_passes_through(tmp_path):
    stock = build("deit_teacher")
    kept = IsomorphicPruner(stock).prune(IsomorphicPruningConfig(pruning_ratio=0.0, importance="magnitude"))
    converted = to_pruned_model(kept)
    assert converted.config.pruned_shapes == {}
    assert torch.equal(logits(converted, pixels()), logits(stock, pixels()))


def test_pruned_model_can_be_pruned_and_saved_again(tmp_path):
    first = to_pruned_model(pruned("vit"))
    first.save_pretrained(tmp_path / "first")
    again = prune_with_torch_pruning(load_pruned_model(tmp_path / "first"), ratio=0.3)
    x = pixels()
    expected = logits(again, x)
    second = to_pruned_model(again)
    assert type(second) is type(first)
    assert sum(p.numel() for p in second.parameters()) < sum(p.numel() for p in first.parameters())
    assert torch.equal(logits(second, x), expected)
    second.save_pretrained(tmp_path / "second")
    assert torch.equal(logits(load_pruned_model(tmp_path / "second"), x), expected)
    remote = AutoModelForImageClassification.from_pretrained(tmp_path / "second", trust_remote_code=True)
    assert torch.equal(logits(remote, x), expected)


def test_pruned_model_keeps_attention_scaling():
    model = pruned("vit")
    original = build("vit").vit.layers[0].attention.scaling
    converted = to_pruned_model(model)
    for layer in converted.vit.layers:
        assert layer.attention.scaling == original
        assert layer.attention.head_dim * layer.attention.num_attention_heads == layer.attention.q_proj.out_features


def test_bfloat16_model_stays_exact():
    model = pruned("convnext").to(torch.bfloat16)
    x = pixels().to(torch.bfloat16)
    converted = to_pruned_model(model)
    assert next(converted.parameters()).dtype == torch.bfloat16
    assert torch.equal(logits(converted, x), logits(model, x))


def test_unsupported_models_are_rejected():
    with pytest.raises(TypeError, match="Sequential"):
        to_pruned_model(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(TypeError, match="ViTForMaskedImageModeling"):
        to_pruned_model(ViTForMaskedImageModeling(ViTConfig(**VIT_KWARGS)))


def test_removed_blocks_without_config_update_are_rejected():
    model = pruned("vit")
    model.vit.layers = model.vit.layers[:1]
    with pytest.raises(ValueError, match="depth"):
        to_pruned_model(model)


def test_config_fields_are_validated():
    with pytest.raises(TypeError, match="pruned_shapes"):
        PrunedViTConfig(pruned_shapes={"vit.layernorm": {"weight": "wide"}})
    with pytest.raises(TypeError, match="layer_num_heads"):
        PrunedViTConfig(layer_num_heads=[1.5])
    config = PrunedViTConfig(hidden_size=32, num_attention_heads=2, pruned_shapes={"classifier": {"weight": [2, 8]}})
    assert PrunedViTConfig.from_dict(config.to_dict()).pruned_shapes == {"classifier": {"weight": [2, 8]}}
    assert config.base_model_type == "vit"


def test_manifest_naming_a_missing_module_is_a_clear_error():
    config = PrunedViTConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        pruned_shapes={"vit.nowhere": {"weight": [1]}},
    )
    with pytest.raises(modeling.PrunedCheckpointError, match="vit.nowhere"):
        modeling.PrunedViTForImageClassification(config)


def test_model_built_from_config_alone_has_the_pruned_shapes():
    converted = to_pruned_model(pruned("convnextv2"))
    rebuilt = type(converted)(converted.config)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in converted.state_dict().items()
    }


def test_travelling_files_import_only_torch_and_transformers():
    directory = os.path.dirname(modeling.__file__)
    allowed = {"torch", "transformers", "__future__"} | set(sys.stdlib_module_names)
    for filename in TRAVELLING_FILES:
        tree = ast.parse(open(os.path.join(directory, filename), encoding="utf-8").read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = {node.module.split(".")[0]}
            else:
                continue
            assert roots <= allowed, f"{filename} imports {roots - allowed}"


FRESH_PROCESS = textwrap.dedent(
    """
    import importlib.abc, sys

    class Forbid(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("optimum_isoprune", "torch_pruning"):
                raise ImportError(f"{name} must not be needed to load a pruned checkpoint")

    sys.meta_path.insert(0, Forbid())
    import json, torch
    import numpy as np
    from PIL import Image
    from safetensors.torch import load_file
    from transformers import AutoModelForImageClassification, pipeline

    image = Image.fromarray((np.random.RandomState(0).rand(40, 48, 3) * 255).astype("uint8"))
    for directory in sys.argv[1:]:
        io = load_file(directory + ".io.safetensors")
        model = AutoModelForImageClassification.from_pretrained(directory, trust_remote_code=True)
        assert torch.equal(model(pixel_values=io["x"]).logits, io["logits"]), directory
        assert type(model).__name__ == json.load(open(directory + "/config.json"))["architectures"][0]
        pipeline("image-classification", model=directory, trust_remote_code=True)(image)
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("optimum_isoprune", "torch_pruning"))
    assert not loaded, loaded
    print("fresh process ok:", len(sys.argv) - 1)
    """
)


@pytest.mark.slow
def test_fresh_process_without_optimum_isoprune_loads_every_family(tmp_path):
    directories = []
    for name in HF_FAMILIES:
        model = to_pruned_model(pruned(name))
        directory = str(tmp_path / name)
        model.save_pretrained(directory)
        x = pixels()
        save_file({"x": x, "logits": logits(model, x).contiguous()}, directory + ".io.safetensors")
        directories.append(directory)
    script = tmp_path / "load.py"
    script.write_text(FRESH_PROCESS)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-I", str(script), *directories],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"fresh process ok: {len(HF_FAMILIES)}" in result.stdout


def test_every_model_type_the_adapters_accept_has_a_pruned_family():
    """A model type an adapter prunes but no family saves would fail only at the end of prune(); here it fails first."""
    from optimum_isoprune.adapters import ADAPTERS

    accepted = {t for adapter in ADAPTERS for t in getattr(adapter, "model_types", {})}
    assert {"vit", "swin", "timm_wrapper"} <= accepted
    assert accepted == {family.base_model_type for family in modeling.FAMILIES}
