"""Part 3 - CPU latency of pruned models vs MACs reduction.

timm ViT-B/16 and ConvNeXt-B shapes (random weights, 224 px) pruned to 50% and 25% of their MACs
(magnitude importance, isomorphic, budget_policy=shared) with round_to 1, 8 and 32. Latency under
torch.inference_mode via optimum_isoprune.latency.measure_latency, measured side by side: each round
runs every model once (round-robin), the reported value is the median over rounds, so a load spike
from other users of the machine hits all models of a round alike. Speed-up = base median / pruned median.
"""

from __future__ import annotations

import argparse
import statistics

import timm
import torch

from _common import RESULTS, footer, machine, save_json
from optimum_isoprune import IsomorphicPruner, IsomorphicPruningConfig
from optimum_isoprune.latency import measure_latency

MODELS = {"vit_b16": "vit_base_patch16_224", "convnext_b": "convnext_base"}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="vit_b16,convnext_b")
    p.add_argument("--fractions", default="0.5,0.25")
    p.add_argument("--round-to", default="1,8,32")
    p.add_argument("--rounds1", type=int, default=9, help="rounds at batch 1")
    p.add_argument("--rounds32", type=int, default=3, help="rounds at batch 32")
    p.add_argument("--batch32-round-to", default="8", help="round_to values also timed at batch 32")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    meta = machine()
    rows = []
    for key in args.models.split(","):
        torch.manual_seed(0)
        base = timm.create_model(MODELS[key], pretrained=False).eval()
        pruner = IsomorphicPruner(base)
        variants = {("base", 1.0, 0): (base, pruner.adapter and None)}
        macs = {}
        from optimum_isoprune import count_macs

        macs[("base", 1.0, 0)] = count_macs(base)
        for fraction in [float(f) for f in args.fractions.split(",")]:
            for r in [int(v) for v in args.round_to.split(",")]:
                cfg = IsomorphicPruningConfig(
                    target_macs=fraction * macs[("base", 1.0, 0)], importance="magnitude", round_to=r, seed=0
                )
                variants[("pruned", fraction, r)] = (pruner.prune(cfg).eval(), None)
                macs[("pruned", fraction, r)] = pruner.report.macs_after
                print(key, fraction, r, pruner.report.macs_after / macs[("base", 1.0, 0)], flush=True)
        for batch, rounds in ((1, args.rounds1), (32, args.rounds32)):
            chosen = [
                v for v in variants if batch == 1 or v[0] == "base" or str(v[2]) in args.batch32_round_to.split(",")
            ]
            times = {v: [] for v in chosen}
            for v in chosen:  # warm-up
                measure_latency(variants[v][0], 224, 3, batch_size=batch, repeats=1, warmup=1)
            for _ in range(rounds):
                for v in chosen:
                    times[v].append(
                        measure_latency(variants[v][0], 224, 3, batch_size=batch, repeats=1, warmup=0)["median_ms"]
                    )
            base_ms = statistics.median(times[("base", 1.0, 0)])
            for v in chosen:
                med = statistics.median(times[v])
                row = dict(
                    model=key,
                    kind=v[0],
                    fraction=v[1],
                    round_to=v[2],
                    batch=batch,
                    rounds=rounds,
                    macs=macs[v],
                    macs_reduction=macs[("base", 1.0, 0)] / macs[v],
                    median_ms=med,
                    times_ms=times[v],
                    speedup=base_ms / med,
                    params=sum(p.numel() for p in variants[v][0].parameters()),
                )
                row["speedup_over_macs_reduction"] = row["speedup"] / row["macs_reduction"]
                rows.append(row)
                print(
                    {k: (round(x, 3) if isinstance(x, float) else x) for k, x in row.items() if k != "times_ms"},
                    flush=True,
                )
            save_json("latency.json", dict(meta=meta, seed=0, rows=rows, threads=args.threads))
        del variants, pruner, base
    save_json("latency.json", dict(meta=meta, seed=0, rows=rows, threads=args.threads))
    plot(rows, meta)


def plot(rows, meta) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3))
    for ax, batch in zip(axes, (1, 32)):
        pts = [r for r in rows if r["batch"] == batch and r["kind"] == "pruned"]
        for key, marker in (("vit_b16", "o"), ("convnext_b", "s")):
            for rt, color in ((1, "tab:blue"), (8, "tab:green"), (32, "tab:orange")):
                sel = [r for r in pts if r["model"] == key and r["round_to"] == rt]
                if sel:
                    ax.scatter(
                        [r["macs_reduction"] for r in sel],
                        [r["speedup"] for r in sel],
                        marker=marker,
                        color=color,
                        label=f"{key} round_to={rt}",
                    )
        lim = max([r["macs_reduction"] for r in pts] + [1]) * 1.1
        ax.plot([1, lim], [1, lim], "k--", lw=1, label="speed-up = MACs reduction")
        ax.plot([1, lim], [0.8, 0.8 * lim], "r:", lw=1, label="goal: 0.8 x MACs reduction")
        ax.set_xlabel("MACs reduction (x)")
        ax.set_ylabel("latency speed-up (x)")
        ax.set_title(f"CPU latency, batch {batch}")
    axes[0].legend(fontsize=6)
    fig.suptitle("Pruned timm ViT-B/16 and ConvNeXt-B (random weights, 224 px), torch.inference_mode")
    footer(fig, meta, 0)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(RESULTS / "latency.png", dpi=120)


if __name__ == "__main__":
    main()
