"""Architecture reach: every family added in issue 17 pruned to 50% of its MACs on random weights, and foundation
backbones pruned at 224 px with their real shapes.

Families (default): real widths and depths, small images (64 px; 56 px for patch-14 models) so the whole run stays
within minutes on a CPU. Per family: the budget error, our MAC count against torch.utils.flop_counter (before and
after), parameters before/after, whether save -> load gives bit-identical outputs, and the pruning time.
Reconstruction is off here (`--reconstruction least_squares` turns it on): on efficientnet_b0 its 61 layer refits
alone took over 10 minutes on the shared 2-core machine, and it changes none of the checked figures but the time.

Real shapes (`--real-shapes`): DINOv2-S/14 and CLIP ViT-B/16 vision towers without a head (pruned on their features,
the default config with least-squares reconstruction), at 224 px: MACs, params, pruning time and peak memory
(the process's peak resident set, and its rise above the resident set once the model is built). Each model runs in
its own process so that one model's peak does not hide another's.

    python benchmarks/architecture_reach.py                      # writes benchmarks/results/architecture_reach.json
    python benchmarks/architecture_reach.py --rows swinv2_tiny  # (re)measures some rows, keeps the others
    python benchmarks/architecture_reach.py --real-shapes        # writes benchmarks/results/real_shapes.json
    python benchmarks/architecture_reach.py --table              # the BENCHMARKS.md tables
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import timm
import torch
import transformers as tf
from torch.utils.flop_counter import FlopCounterMode

from _common import RESULTS, machine, save_json
from optimum_isoprune import IsomorphicPruner, IsomorphicPruningConfig
from optimum_isoprune.adapters import get_adapter
from optimum_isoprune.checkpoint import load_pruned_model
from optimum_isoprune.counting import count_macs, count_params

SMALL, SMALL_14 = 64, 56  # image sizes of the family rows (patch 16 / patch 14)
REAL = 224


def _timm(name: str, size: int = SMALL, **kwargs) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        overlay = {"input_size": (3, size, size)}
        return timm.create_model(name, pretrained=False, num_classes=1000, pretrained_cfg_overlay=overlay, **kwargs)

    return build


def _hf(model_class: type, config: Callable[[], tf.PretrainedConfig]) -> Callable[[], torch.nn.Module]:
    return lambda: model_class(config())


_VIT_B = dict(image_size=SMALL, num_labels=1000)  # transformers' ViT-family configs default to the Base width
FAMILIES: dict[str, Callable[[], torch.nn.Module]] = {
    # timm
    "timm efficientnet_b0": _timm("efficientnet_b0"),
    "timm mobilenetv3_large_100": _timm("mobilenetv3_large_100"),
    "timm regnety_002": _timm("regnety_002"),
    "timm deit3_small_patch16": _timm("deit3_small_patch16_224", img_size=SMALL),
    "timm swinv2_tiny_window8": _timm("swinv2_tiny_window8_256", img_size=SMALL),
    "timm beit_base_patch16": _timm("beit_base_patch16_224", img_size=SMALL),
    "timm eva02_small_patch14": _timm("eva02_small_patch14_224", SMALL_14, img_size=SMALL_14),
    "timm levit_128s": _timm("levit_128s", img_size=SMALL),
    # transformers
    "DINOv2-S/14": _hf(
        tf.Dinov2ForImageClassification,
        lambda: tf.Dinov2Config(hidden_size=384, num_attention_heads=6, image_size=SMALL_14, num_labels=1000),
    ),
    "DINOv2-S/14 with registers": _hf(
        tf.Dinov2WithRegistersForImageClassification,
        lambda: tf.Dinov2WithRegistersConfig(
            hidden_size=384, num_attention_heads=6, image_size=SMALL_14, num_labels=1000
        ),
    ),
    "BEiT-B/16": _hf(tf.BeitForImageClassification, lambda: tf.BeitConfig(use_relative_position_bias=True, **_VIT_B)),
    "Data2VecVision-B/16": _hf(
        tf.Data2VecVisionForImageClassification,
        # eager attention: torch's flop counter sees no FLOPs in CPU SDPA, and this class cannot switch afterwards
        lambda: tf.Data2VecVisionConfig(use_relative_position_bias=True, attn_implementation="eager", **_VIT_B),
    ),
    "CLIP ViT-B/16": _hf(
        tf.CLIPForImageClassification,
        lambda: tf.CLIPConfig(vision_config=dict(image_size=SMALL, patch_size=16), num_labels=1000),
    ),
    "SigLIP-B/16": _hf(
        tf.SiglipForImageClassification,
        lambda: tf.SiglipConfig(vision_config=dict(image_size=SMALL, patch_size=16), num_labels=1000),
    ),
    "EfficientNet-B0": _hf(
        tf.EfficientNetForImageClassification,
        lambda: tf.EfficientNetConfig(
            width_coefficient=1.0, depth_coefficient=1.0, hidden_dim=1280, image_size=SMALL, num_labels=1000
        ),
    ),
    "RegNetY-040": _hf(tf.RegNetForImageClassification, lambda: tf.RegNetConfig(num_labels=1000)),
    "LeViT-128S": _hf(
        tf.LevitForImageClassification,
        lambda: tf.LevitConfig(
            image_size=SMALL,
            hidden_sizes=[128, 256, 384],
            num_attention_heads=[4, 6, 8],
            depths=[2, 3, 4],
            key_dim=[16, 16, 16],
            num_labels=1000,
        ),
    ),
    "Swin V2-T": _hf(
        tf.Swinv2ForImageClassification, lambda: tf.Swinv2Config(image_size=SMALL, window_size=8, num_labels=1000)
    ),
}

REAL_SHAPES: dict[str, Callable[[], torch.nn.Module]] = {
    "DINOv2-S/14 backbone": _hf(
        tf.Dinov2Model, lambda: tf.Dinov2Config(hidden_size=384, num_attention_heads=6, image_size=REAL)
    ),
    "CLIP ViT-B/16 vision tower": _hf(tf.CLIPVisionModel, lambda: tf.CLIPVisionConfig(image_size=REAL, patch_size=16)),
}


def _image_size(model: torch.nn.Module) -> int:
    return get_adapter(model).image_size()


def _outputs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits, or a backbone's last hidden state."""
    out = model(pixel_values=x) if hasattr(model, "config") and hasattr(model.config, "model_type") else model(x)
    for name in ("logits", "last_hidden_state"):
        if hasattr(out, name):
            return getattr(out, name)
    return out


def flop_counter_macs(model: torch.nn.Module, x: torch.Tensor) -> float:
    if hasattr(model, "set_attn_implementation") and get_adapter(model).attentions(model):
        model.set_attn_implementation("eager")
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False  # every attention matmul visible to the counter
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        _outputs(model, x)
    return counter.get_total_flops() / 2


def _seeded(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    torch.manual_seed(0)
    return build().eval()


def run(row: str, batches: int, batch_size: int, reconstruction: str) -> dict:
    build = FAMILIES[row]
    model = _seeded(build)
    pruner = IsomorphicPruner(model)
    size = _image_size(model)
    data = torch.randn(batches * batch_size, 3, size, size, generator=torch.Generator().manual_seed(0))
    target = count_macs(model) * 0.5
    config = IsomorphicPruningConfig(
        target_macs=target,
        num_calibration_batches=batches,
        calibration_batch_size=batch_size,
        reconstruction=reconstruction,
    )
    started = time.perf_counter()
    pruned = pruner.prune(config, calibration_dataset=data)
    seconds = time.perf_counter() - started
    report = pruner.report
    with tempfile.TemporaryDirectory() as folder:
        pruner.save_pretrained(folder)
        # the attention implementation is a runtime choice transformers does not save: load with the same one
        implementation = getattr(getattr(pruned, "config", None), "_attn_implementation", None)
        loaded = load_pruned_model(folder, **({"attn_implementation": implementation} if implementation else {})).eval()
        with torch.no_grad():
            exact = bool(torch.equal(_outputs(loaded, data[:4]), _outputs(pruned.eval(), data[:4])))
    before, after = flop_counter_macs(_seeded(build), data[:1]), flop_counter_macs(pruned, data[:1])
    return {
        "architecture": type(model).__name__,
        "image_size": size,
        "macs_before": report.macs_before,
        "macs_after": report.macs_after,
        "target_macs": target,
        "budget_error": (report.macs_after - target) / target,
        "flop_counter_macs_before": before,
        "flop_counter_macs_after": after,
        "macs_agreement_error": max(abs(report.macs_before - before) / before, abs(report.macs_after - after) / after),
        "params_before": report.params_before,
        "params_after": report.params_after,
        "save_load_bit_identical": exact,
        "pruning_seconds": seconds,
        "calibration_images": batches * batch_size,
        "reconstruction": reconstruction,
    }


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_real_shape(row: str, batches: int, batch_size: int) -> dict:
    """One backbone at 224 px with the default config (reconstruction on); meant to run in a fresh process."""
    model = _seeded(REAL_SHAPES[row])
    built_rss = _peak_rss_bytes()
    data = torch.randn(batches * batch_size, 3, REAL, REAL, generator=torch.Generator().manual_seed(0))
    pruner = IsomorphicPruner(model)
    target = count_macs(model) * 0.5
    config = IsomorphicPruningConfig(
        target_macs=target, num_calibration_batches=batches, calibration_batch_size=batch_size
    )
    started = time.perf_counter()
    pruned = pruner.prune(config, calibration_dataset=data)
    seconds = time.perf_counter() - started
    report = pruner.report
    return {
        "architecture": type(model).__name__,
        "image_size": REAL,
        "objective": pruner.adapter.objective,
        "macs_before": report.macs_before,
        "macs_after": report.macs_after,
        "budget_error": (report.macs_after - target) / target,
        "params_before": report.params_before,
        "params_after": count_params(pruned),
        "pruning_seconds": seconds,
        "stage_seconds": dict(getattr(report, "timings", {}) or {}),
        "peak_rss_bytes": _peak_rss_bytes(),
        "rss_after_build_bytes": built_rss,
        "calibration_images": batches * batch_size,
        "reconstruction": config.reconstruction,
        "threads": torch.get_num_threads(),
    }


def _merge(name: str, rows: dict, table: dict) -> dict:
    """The rows of `table` already measured in `name`, updated with `rows` (so single rows can be re-measured)."""
    path = RESULTS / name
    old = json.loads(path.read_text())["rows"] if path.exists() else {}
    return {row: {**old, **rows}[row] for row in table if row in {**old, **rows}}


def markdown() -> str:
    """The BENCHMARKS.md tables from the last runs' JSON."""
    lines = [
        "| family | class | px | budget error | MACs agreement | params before → after | save → load bit-identical "
        "| pruning time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row, r in json.loads((RESULTS / "architecture_reach.json").read_text())["rows"].items():
        lines.append(
            f"| {row} | `{r['architecture']}` | {r['image_size']} | {r['budget_error']:+.2%} | "
            f"{r['macs_agreement_error']:.1e} | {r['params_before'] / 1e6:.2f}M → {r['params_after'] / 1e6:.2f}M | "
            f"{'yes' if r['save_load_bit_identical'] else 'no'} | {r['pruning_seconds']:.1f} s |"
        )
    lines += [
        "",
        "| backbone (224 px) | GMACs before → after | params before → after | pruning time (importance / "
        "reconstruction) | peak RSS (rise after building the model) |",
        "|---|---|---|---|---|",
    ]
    for row, r in json.loads((RESULTS / "real_shapes.json").read_text())["rows"].items():
        stages = r["stage_seconds"]
        lines.append(
            f"| {row} | {r['macs_before'] / 1e9:.2f} → {r['macs_after'] / 1e9:.2f} | "
            f"{r['params_before'] / 1e6:.2f}M → {r['params_after'] / 1e6:.2f}M | {r['pruning_seconds']:.0f} s "
            f"({stages['importance']:.0f} s / {stages['reconstruction']:.0f} s) | "
            f"{r['peak_rss_bytes'] / 2**30:.2f} GiB (+{(r['peak_rss_bytes'] - r['rss_after_build_bytes']) / 2**30:.2f}) |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--reconstruction", default="none", choices=["none", "bias", "least_squares"])
    parser.add_argument("--rows", help="comma-separated rows to (re)measure; the others are kept from the last run")
    parser.add_argument("--real-shapes", action="store_true", help="the 224 px backbones instead of the family rows")
    parser.add_argument("--table", action="store_true", help="print the BENCHMARKS.md tables from the last runs")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one real-shape row, printed as JSON
    cli = parser.parse_args()
    if cli.table:
        print(markdown())
        return
    if cli.one:
        print(json.dumps(run_real_shape(cli.one, batches=2, batch_size=16)))
        return
    table = REAL_SHAPES if cli.real_shapes else FAMILIES
    selected = cli.rows.split(",") if cli.rows else list(table)
    unknown = sorted(set(selected) - set(table))
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {sorted(table)}")
    meta, rows = machine(), {}
    for row in selected:
        if cli.real_shapes:
            out = subprocess.run([sys.executable, __file__, "--one", row], check=True, capture_output=True, text=True)
            rows[row] = r = json.loads(out.stdout.strip().splitlines()[-1])
            print(
                f"{row}: {r['macs_before'] / 1e9:.2f} -> {r['macs_after'] / 1e9:.2f} GMACs, params "
                f"{r['params_before'] / 1e6:.2f}M -> {r['params_after'] / 1e6:.2f}M, {r['pruning_seconds']:.1f} s, "
                f"peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB (+{(r['peak_rss_bytes'] - r['rss_after_build_bytes']) / 2**30:.2f})",
                flush=True,
            )
            continue
        rows[row] = r = run(row, cli.batches, cli.batch_size, cli.reconstruction)
        print(
            f"{row}: budget error {r['budget_error']:+.4f}, MACs agreement {r['macs_agreement_error']:.2e}, "
            f"params {r['params_before'] / 1e6:.2f}M -> {r['params_after'] / 1e6:.2f}M, "
            f"save/load exact {r['save_load_bit_identical']}, {r['pruning_seconds']:.1f} s",
            flush=True,
        )
    name = "real_shapes.json" if cli.real_shapes else "architecture_reach.json"
    save_json(name, {"meta": meta, "target_fraction": 0.5, "rows": _merge(name, rows, table)})


if __name__ == "__main__":
    main()
