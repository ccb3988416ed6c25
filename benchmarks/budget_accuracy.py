"""Part 1 - budget accuracy: |achieved - target| / target over MACs targets 10%..90% of the original,
five architecture families (transformers + timm), both budget policies.

Achieved MACs are the package's own count (report.macs_after); an independent count with
torch.utils.flop_counter (FlopCounterMode / 2, eager attention) is recorded next to it.
Random weights, magnitude importance (ranking does not change how well a budget is met).
"""

from __future__ import annotations

import os

os.environ.setdefault("TIMM_FUSED_ATTN", "0")  # let FlopCounterMode see timm's attention matmuls

import argparse
import time

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    ConvNextConfig,
    ConvNextForImageClassification,
    MobileNetV2Config,
    MobileNetV2ForImageClassification,
    ResNetConfig,
    ResNetForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

from _common import RESULTS, footer, machine, save_json
from optimum_isoprune import BudgetError, IsomorphicPruner, IsomorphicPruningConfig, count_macs

SIZE = 112
EAGER = dict(attn_implementation="eager")


def models():
    vit = dict(
        hidden_size=192,
        num_hidden_layers=6,
        num_attention_heads=3,
        intermediate_size=768,
        image_size=SIZE,
        patch_size=16,
        num_labels=10,
        **EAGER,
    )
    return {
        "hf_vit (192d, 6L, 3h)": lambda: ViTForImageClassification(ViTConfig(**vit)),
        "hf_convnext (48-384, 2-2-4-2)": lambda: ConvNextForImageClassification(
            ConvNextConfig(hidden_sizes=[48, 96, 192, 384], depths=[2, 2, 4, 2], image_size=SIZE, num_labels=10)
        ),
        "hf_resnet (basic, 1-1-1-1)": lambda: ResNetForImageClassification(
            ResNetConfig(
                embedding_size=32,
                hidden_sizes=[32, 64, 128, 256],
                depths=[1, 1, 1, 1],
                layer_type="basic",
                num_labels=10,
            )
        ),
        "hf_mobilenet_v2 (x0.5)": lambda: MobileNetV2ForImageClassification(
            MobileNetV2Config(image_size=SIZE, depth_multiplier=0.5, num_labels=10)
        ),
        "timm_deit_tiny": lambda: timm.create_model(
            "deit_tiny_patch16_224", pretrained=False, img_size=SIZE, num_classes=10, depth=6
        ),
        "timm_convnext_atto": lambda: timm.create_model("convnext_atto", pretrained=False, num_classes=10),
    }


def flop_counter_macs(model) -> int:
    x = torch.zeros(1, 3, SIZE, SIZE)
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(pixel_values=x) if hasattr(model, "config") and hasattr(model.config, "model_type") else model(x)
    return counter.get_total_flops() // 2


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fractions", default="0.1,0.2,0.3,0.5,0.7,0.9")
    parser.add_argument("--round-to", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    fractions = [float(f) for f in args.fractions.split(",")]
    meta = machine()
    rows = []
    for name, build in models().items():
        torch.manual_seed(args.seed)
        model = build().eval()
        pruner = IsomorphicPruner(model)
        base_flops = flop_counter_macs(model)
        for policy in ("shared", "allocate"):
            for fraction in fractions:
                tick = time.perf_counter()
                row = dict(model=name, policy=policy, fraction=fraction)
                try:
                    base = None
                    cfg = IsomorphicPruningConfig(
                        target_macs=1.0,
                        importance="magnitude",
                        budget_policy=policy,
                        round_to=args.round_to,
                        seed=args.seed,
                        image_size=SIZE,
                    )
                    # the original MACs come from the package's counter (same one that checks the target)
                    base = count_macs(model, image_size=SIZE)
                    cfg.target_macs = fraction * base
                    pruned = pruner.prune(cfg)
                    rep = pruner.report
                    row.update(
                        macs_before=rep.macs_before,
                        target=cfg.target_macs,
                        achieved=rep.macs_after,
                        rel_error=abs(rep.macs_after - cfg.target_macs) / cfg.target_macs,
                        flopcounter_before=base_flops,
                        flopcounter_after=flop_counter_macs(pruned),
                        budget_s=rep.timings["budget"],
                        total_s=rep.timings["total"],
                    )
                except BudgetError as error:
                    row.update(error=str(error).split(";")[0])
                row["wall_s"] = time.perf_counter() - tick
                rows.append(row)
                print(
                    {
                        k: (round(v, 4) if isinstance(v, float) else v)
                        for k, v in row.items()
                        if k not in ("flopcounter_before",)
                    },
                    flush=True,
                )
    save_json(
        "budget_accuracy.json",
        dict(meta=meta, seed=args.seed, image_size=SIZE, round_to=args.round_to, importance="magnitude", rows=rows),
    )
    plot(rows, meta, args.seed)


def plot(rows, meta, seed) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, policy in zip(axes, ("shared", "allocate")):
        for name in dict.fromkeys(r["model"] for r in rows):
            pts = [
                (r["fraction"], 100 * r["rel_error"])
                for r in rows
                if r["model"] == name and r["policy"] == policy and "rel_error" in r
            ]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=name)
        ax.axhline(1.0, color="red", ls="--", lw=1, label="goal: 1%")
        ax.set_title(f"budget_policy={policy}")
        ax.set_xlabel("target MACs / original MACs")
        ax.set_yscale("symlog", linthresh=0.1)
    axes[0].set_ylabel("|achieved - target| / target  (%)")
    axes[1].legend(fontsize=7)
    fig.suptitle("Budget accuracy (random weights, magnitude, round_to=8, 112 px)")
    footer(fig, meta, seed)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(RESULTS / "budget_accuracy.png", dpi=120)


if __name__ == "__main__":
    main()
