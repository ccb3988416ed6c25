"""Architecture reach: every timm family added in issue 17, pruned to 50% of its MACs on random weights.

Per family: the budget error, our MAC count against torch.utils.flop_counter (before and after), parameters
before/after, whether save -> load gives bit-identical logits, and the pruning time. Real widths and depths,
small images (64 px) so the whole run stays within a few minutes on a CPU. Reconstruction is off by default here
(`--reconstruction least_squares` turns it on): on efficientnet_b0 its 61 layer refits alone took over 10 minutes
on the shared 2-core machine, and it does not change any of the figures this table checks except the time.

    python benchmarks/architecture_reach.py   # writes benchmarks/results/architecture_reach.json
"""

from __future__ import annotations

import argparse
import tempfile
import time

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from _common import machine, save_json
from optimum_isoprune import IsomorphicPruner, IsomorphicPruningConfig
from optimum_isoprune.checkpoint import load_pruned_model
from optimum_isoprune.counting import count_macs

IMAGE_SIZE = 64
FAMILIES = {  # row -> (timm name, create_model keyword arguments)
    "efficientnet_b0": ("efficientnet_b0", {}),
    "mobilenetv3_large_100": ("mobilenetv3_large_100", {}),
    "regnety_002": ("regnety_002", {}),
    "deit3_small_patch16": ("deit3_small_patch16_224", {"img_size": IMAGE_SIZE}),
}


def flop_counter_macs(model: torch.nn.Module, x: torch.Tensor) -> float:
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False  # every attention matmul visible to the counter
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / 2


def run(name: str, args: dict, batches: int, batch_size: int, reconstruction: str) -> dict:
    torch.manual_seed(0)

    def build() -> torch.nn.Module:
        return timm.create_model(
            name,
            pretrained=False,
            num_classes=1000,
            pretrained_cfg_overlay={"input_size": (3, IMAGE_SIZE, IMAGE_SIZE)},
            **args,
        ).eval()

    model = build()
    pruner = IsomorphicPruner(model)
    data = torch.randn(batches * batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
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
    x = data[:1]
    report = pruner.report
    with tempfile.TemporaryDirectory() as folder:
        pruner.save_pretrained(folder)
        loaded = load_pruned_model(folder)
        with torch.no_grad():
            exact = bool(torch.equal(loaded(data[:4]), pruned.eval()(data[:4])))
    before, after = flop_counter_macs(build(), x), flop_counter_macs(pruned, x)
    return {
        "timm_name": name,
        "model_args": args,
        "image_size": IMAGE_SIZE,
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--reconstruction", default="none", choices=["none", "bias", "least_squares"])
    cli = parser.parse_args()
    meta = machine()
    rows = {}
    for row, (name, args) in FAMILIES.items():
        rows[row] = run(name, args, cli.batches, cli.batch_size, cli.reconstruction)
        r = rows[row]
        print(
            f"{row}: budget error {r['budget_error']:+.4f}, MACs agreement {r['macs_agreement_error']:.2e}, "
            f"params {r['params_before'] / 1e6:.2f}M -> {r['params_after'] / 1e6:.2f}M, "
            f"save/load exact {r['save_load_bit_identical']}, {r['pruning_seconds']:.1f} s",
            flush=True,
        )
    save_json("architecture_reach.json", {"meta": meta, "target_fraction": 0.5, "rows": rows})


if __name__ == "__main__":
    main()
