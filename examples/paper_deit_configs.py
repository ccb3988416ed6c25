#!/usr/bin/env python
"""The paper's DeiT settings (Table 2) on random timm `deit_*_distilled` models at 224 px: ours vs the paper.

The official scripts fix a global channel ratio, a head ratio and a head-dim ratio per model; the same settings
in `IsomorphicPruningConfig` (`pruning_ratio`, `head_pruning_ratio`, `head_dim_pruning_ratio`, `round_to=2`)
should land within about 1% of the paper's MACs and parameters. Weights are random (nothing is downloaded), so
magnitude importance stands in for Taylor: it changes which channels go, not how many.

    python examples/paper_deit_configs.py            # the four shapes at full size (a minute or two on a CPU)
    python examples/paper_deit_configs.py --smoke    # tiny deits, same ratios, seconds
"""

from __future__ import annotations

import argparse
import time

import timm
import torch

from optimum_isoprune import IsomorphicPruner, IsomorphicPruningConfig
from optimum_isoprune.report import format_count

# name, timm model, ratio, head ratio, head-dim ratio, paper MACs, paper params, paper ImageNet top-1
PAPER = [
    ("DeiT-4.2G", "deit_base_distilled_patch16_224", 0.5, 0.5, 0.25, 4.16e9, 20.69e6, 82.41),
    ("DeiT-2.6G", "deit_base_distilled_patch16_224", 0.6, 0.6, 0.3, 2.61e9, 13.07e6, 81.13),
    ("DeiT-1.2G", "deit_small_distilled_patch16_224", 0.5, 0.5, 0.1, 1.21e9, 5.74e6, 77.50),
    ("DeiT-0.6G", "deit_tiny_distilled_patch16_224", 0.25, 0.3, 0.3, 0.62e9, 3.08e6, 72.60),
]
SMOKE_KWARGS = dict(img_size=32, patch_size=8, depth=2, num_classes=10)


def build(timm_name: str, smoke: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    if not smoke:
        return timm.create_model(timm_name, pretrained=False)
    full = timm.create_model(timm_name, pretrained=False, depth=1, num_classes=1)  # only to read its width
    return timm.create_model(
        timm_name,
        pretrained=False,
        embed_dim=full.embed_dim // 4,
        num_heads=full.blocks[0].attn.num_heads,
        **SMOKE_KWARGS,
    )


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny models (no paper numbers to compare)")
    parser.add_argument("--only", action="append", help="run only these shapes, e.g. --only DeiT-1.2G")
    args = parser.parse_args(argv)

    rows = []
    for name, timm_name, ratio, head_ratio, head_dim_ratio, macs, params, top1 in PAPER:
        if args.only and name not in args.only:
            continue
        pruner = IsomorphicPruner(build(timm_name, args.smoke), base_model_name_or_path=f"timm/{timm_name}")
        config = IsomorphicPruningConfig(
            pruning_ratio=ratio,
            head_pruning_ratio=head_ratio,
            head_dim_pruning_ratio=head_dim_ratio,
            round_to=2,
            importance="magnitude",
        )
        started = time.perf_counter()
        pruner.prune(config)
        report = pruner.report
        rows.append(
            {
                "name": name,
                "macs": report.macs_after,
                "params": report.params_after,
                "paper_macs": None if args.smoke else macs,
                "paper_params": None if args.smoke else params,
                "paper_top1": top1,
                "seconds": time.perf_counter() - started,
            }
        )

    print(f"{'shape':10} {'ours MACs':>10} {'paper':>8} {'ours params':>12} {'paper':>8} {'paper top-1':>12}")
    for row in rows:
        paper_macs = f"{row['paper_macs'] / 1e9:.2f}G" if row["paper_macs"] else "—"
        paper_params = f"{row['paper_params'] / 1e6:.2f}M" if row["paper_params"] else "—"
        print(
            f"{row['name']:10} {format_count(row['macs']):>10} {paper_macs:>8} {row['params'] / 1e6:>11.2f}M "
            f"{paper_params:>8} {row['paper_top1']:>12.2f}"
        )
    return rows


if __name__ == "__main__":
    main()
