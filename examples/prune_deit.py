#!/usr/bin/env python
"""Prune DeiT to the paper's four shapes (Isomorphic Pruning, Table 2) by MACs target alone.

DeiT-4.2G and DeiT-2.6G come from DeiT-Base (distilled), DeiT-1.2G from DeiT-Small, DeiT-0.6G from DeiT-Tiny.
Here the pruner solves one shared ratio per isomorphic class that hits each MACs target; the paper's recipe then
distills every pruned model for 300 epochs (see examples/distill.py and `optimum-isoprune distill`).

    # Hub weights, Taylor importance from ImageNet images (needs the Hub):
    python examples/prune_deit.py --calibration-dataset imagenet-1k --output-dir out/deit
    # offline: the same architectures with random weights (shapes, MACs and params are what matter here):
    python examples/prune_deit.py --random-weights
    # tiny DeiTs with the same MACs fractions, seconds:
    python examples/prune_deit.py --smoke
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

from optimum_isoprune import IsomorphicPruner, IsomorphicPruningConfig, count_macs
from optimum_isoprune.checkpoint import save_pruned_model
from optimum_isoprune.data import load_image_dataset, prepare_dataset
from optimum_isoprune.report import format_count

# name, Hub id of the base model, its (hidden size, heads), MACs of the base and of the pruned model in the paper
PAPER = [
    ("DeiT-4.2G", "facebook/deit-base-distilled-patch16-224", (768, 12), 17.6e9, 4.16e9),
    ("DeiT-2.6G", "facebook/deit-base-distilled-patch16-224", (768, 12), 17.6e9, 2.61e9),
    ("DeiT-1.2G", "facebook/deit-small-distilled-patch16-224", (384, 6), 4.6e9, 1.21e9),
    ("DeiT-0.6G", "facebook/deit-tiny-distilled-patch16-224", (192, 3), 1.3e9, 0.62e9),
]


def build_deit(hidden: int, heads: int, smoke: bool) -> DeiTForImageClassificationWithTeacher:
    """A random DeiT with a distillation token: the real shape, or a tiny one (1/8 width, 2 layers, 32 px)."""
    if smoke:
        config = DeiTConfig(
            hidden_size=hidden // 8,
            num_attention_heads=heads,
            intermediate_size=hidden // 2,
            num_hidden_layers=2,
            image_size=32,
            patch_size=8,
            num_labels=10,
        )
    else:
        config = DeiTConfig(
            hidden_size=hidden,
            num_attention_heads=heads,
            intermediate_size=4 * hidden,
            num_hidden_layers=12,
            image_size=224,
            patch_size=16,
            num_labels=1000,
        )
    return DeiTForImageClassificationWithTeacher(config).eval()


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--random-weights", action="store_true", help="build the DeiTs from configs (offline)")
    parser.add_argument("--smoke", action="store_true", help="tiny DeiTs, same MACs fractions as the paper")
    parser.add_argument("--calibration-dataset", help="Hub dataset id or imagefolder dir for Taylor importance")
    parser.add_argument("--only", action="append", help="run only these shapes, e.g. --only DeiT-1.2G")
    parser.add_argument("--output-dir", help="save every pruned model under this folder")
    args = parser.parse_args(argv)

    rows = []
    for name, hub_id, (hidden, heads), paper_base, paper_target in PAPER:
        if args.only and name not in args.only:
            continue
        torch.manual_seed(0)
        if args.smoke or args.random_weights:
            pruner = IsomorphicPruner(build_deit(hidden, heads, args.smoke), base_model_name_or_path=hub_id)
        else:
            pruner = IsomorphicPruner.from_pretrained(hub_id)
        # A tiny model gets the paper's fraction of its own MACs; a real one the paper's absolute target.
        target = paper_target / paper_base * count_macs(pruner.model) if args.smoke else paper_target
        calibration = None
        if args.calibration_dataset:
            data = load_image_dataset(args.calibration_dataset, split="train").select(range(512))
            calibration = prepare_dataset(data, model=pruner.model)
        config = IsomorphicPruningConfig(
            target_macs=target, importance="taylor" if calibration else "magnitude", round_to=2
        )
        started = time.perf_counter()
        pruned = pruner.prune(config, calibration_dataset=calibration)
        report = pruner.report
        rows.append(
            {
                "name": name,
                "macs": report.macs_after,
                "params": report.params_after,
                "target": target,
                "paper_macs": paper_target,
                "seconds": time.perf_counter() - started,
            }
        )
        if args.output_dir:
            save_pruned_model(pruned, os.path.join(args.output_dir, name), pruning_config=config, report=report)

    print(f"{'shape':10} {'target MACs':>12} {'ours MACs':>12} {'ours params':>12} {'time':>7}")
    for row in rows:
        print(
            f"{row['name']:10} {format_count(row['target']):>12} {format_count(row['macs']):>12} "
            f"{row['params'] / 1e6:>11.3f}M {row['seconds']:>6.1f}s"
        )
    return rows


if __name__ == "__main__":
    main()
