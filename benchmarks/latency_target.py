"""Part 7 - pruning to a latency target measured on this machine (issue 18).

Shapes: timm ViT-B/16, DeiT-S and ConvNeXt-B (random weights are fine for latency), 224 px, CPU. For each model and
batch size: the base model's latency is measured (median of 9), the latency target is `--fraction` of it, and the
model is pruned with `target_latency` (magnitude importance, round_to 8, budget_policy shared, the latency model
timed on this machine at the same batch size and threads). A MACs-targeted copy is then pruned to the MACs the
latency-targeted model came out with (equal MACs). Base, MACs-targeted and latency-targeted models are then timed
side by side: every round times each once (measure_latency, median of `--repeats` after a warm-up), the reported
latency is the median over rounds, and the spread is the interquartile range over the median across rounds.

The Fashion-MNIST part (`--part fmnist`): each trained teacher (teachers.py) is pruned to 50% of its MACs
(Taylor importance on calibration images, least-squares reconstruction, as recovery.py), its latency measured; then
pruned again with `target_latency` = that latency (the same calibration, importance and reconstruction); both students
get the same short distillation (recovery.py's `distill`), and test top-1 and latency are measured side by side.

    python latency_target.py --part shapes --threads 1
    python latency_target.py --part fmnist --threads 1
    python latency_target.py --plot
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time

import timm
import torch

from _common import RESULTS, footer, machine
from optimum_isoprune import IsomorphicPruner, IsomorphicPruningConfig, count_macs
from optimum_isoprune.latency import measure_latency
from optimum_isoprune.latency_model import relative_spread

logging.getLogger("optimum_isoprune").setLevel(logging.WARNING)
MODELS = {"deit_s": "deit_small_patch16_224", "vit_b16": "vit_base_patch16_224", "convnext_b": "convnext_base"}
OUT = RESULTS / "latency_target.json"


def side_by_side(
    models: dict[str, torch.nn.Module], size: int, channels: int, batch: int, rounds: int, repeats: int
) -> dict[str, dict]:
    """Median latency over rounds (each round times every model once) and the spread across rounds."""
    times: dict[str, list[float]] = {k: [] for k in models}
    for m in models.values():
        measure_latency(m, size, channels, batch_size=batch, repeats=1, warmup=1)
    for _ in range(rounds):
        for k, m in models.items():
            times[k].append(
                measure_latency(m, size, channels, batch_size=batch, repeats=repeats, warmup=1)["median_ms"]
            )
    return {
        k: {"median_ms": statistics.median(v), "spread": relative_spread(v), "rounds_ms": v} for k, v in times.items()
    }


def load_state() -> dict:
    return json.loads(OUT.read_text()) if OUT.exists() else {"rows": [], "fmnist": []}


def save_state(state: dict) -> None:
    state["meta"] = machine()
    OUT.write_text(json.dumps(state, indent=1, default=float) + "\n")


def shapes(args: argparse.Namespace, cache: str) -> None:
    state = load_state()
    for spec in args.runs.split(","):
        key, batch = spec.split("@")
        batch = int(batch)
        torch.manual_seed(0)
        base = timm.create_model(MODELS[key], pretrained=False).eval()
        macs = count_macs(base)
        tick = time.perf_counter()
        base_ms = measure_latency(base, 224, 3, batch_size=batch, repeats=9, warmup=1)["median_ms"]
        target = args.fraction * base_ms
        common = dict(importance="magnitude", round_to=8, seed=0, reconstruction="none")
        pruner = IsomorphicPruner(base)
        by_latency = pruner.prune(
            IsomorphicPruningConfig(
                target_latency=target,
                latency_batch_size=batch,
                latency_threads=args.threads,
                latency_cache_dir=cache,
                **common,
            )
        ).eval()
        report = pruner.report
        by_macs = pruner.prune(IsomorphicPruningConfig(target_macs=report.macs_after, **common)).eval()
        macs_report = pruner.report
        timed = side_by_side(
            {"base": base, "macs": by_macs, "latency": by_latency}, 224, 3, batch, args.rounds, args.repeats
        )
        b, m, lat = (timed[k]["median_ms"] for k in ("base", "macs", "latency"))
        row = dict(
            model=key,
            batch=batch,
            threads=torch.get_num_threads(),
            fraction=args.fraction,
            target_ms=target,
            base_ms_before=base_ms,
            predicted_ms=report.latency["predicted_ms"],
            measured_in_prune_ms=report.latency["measured_ms"],
            latency_model_base_ms=report.latency["base_measured_ms"],
            side_by_side=timed,
            latency_ms=lat,
            error_vs_target=(lat - target) / target,
            relative_latency=lat / b,
            relative_target=args.fraction,
            macs=macs,
            macs_latency=report.macs_after,
            macs_macs=macs_report.macs_after,
            speedup_latency=b / lat,
            speedup_macs=b / m,
            per_macs_latency=(b / lat) / (macs / report.macs_after),
            per_macs_macs=(b / m) / (macs / macs_report.macs_after),
            timed_points=report.latency["timed_points"],
            cached=report.latency["cached"],
            latency_model_s=report.timings.get("latency_model"),
            seconds=time.perf_counter() - tick,
            load_1min=os.getloadavg()[0],
        )
        state["rows"] = [
            r for r in state["rows"] if (r["model"], r["batch"], r["threads"]) != (key, batch, row["threads"])
        ] + [row]
        save_state(state)
        print(
            json.dumps(
                {
                    k: row[k]
                    for k in (
                        "model",
                        "batch",
                        "threads",
                        "target_ms",
                        "predicted_ms",
                        "latency_ms",
                        "error_vs_target",
                        "per_macs_latency",
                        "per_macs_macs",
                        "seconds",
                    )
                }
            ),
            flush=True,
        )


def fmnist(args: argparse.Namespace, cache: str) -> None:
    from recovery import Rows, calibration, distill
    from teachers import accuracy, load_teacher, tensors, train_val

    state = load_state()
    xtr, ytr, _, _ = train_val()
    xt, yt = tensors("test")
    train_set = Rows(xtr, ytr)
    batch = args.fmnist_batch
    for name in args.teachers.split(","):
        teacher, info = load_teacher(name)
        size, channels = xt.shape[-1], xt.shape[1]
        common = dict(importance="taylor", round_to=8, seed=0, num_calibration_batches=8)
        pruner = IsomorphicPruner(teacher)
        by_macs = pruner.prune(
            IsomorphicPruningConfig(target_macs=0.5 * info["macs"], **common),
            calibration_dataset=calibration(xtr, ytr, 0),
        ).eval()
        macs_macs = pruner.report.macs_after
        teacher.eval()
        reference = side_by_side(
            {"teacher": teacher, "macs": by_macs}, size, channels, batch, args.rounds, args.repeats
        )
        target = reference["macs"]["median_ms"]
        by_latency = pruner.prune(
            IsomorphicPruningConfig(
                target_latency=target,
                latency_batch_size=batch,
                latency_threads=args.threads,
                latency_cache_dir=cache,
                **common,
            ),
            calibration_dataset=calibration(xtr, ytr, 0),
        ).eval()
        report = pruner.report
        top1 = {"macs": {0: accuracy(by_macs, xt, yt)}, "latency": {0: accuracy(by_latency, xt, yt)}}
        for k, student in (("macs", by_macs), ("latency", by_latency)):
            student.train()
            top1[k].update(distill(student, teacher, train_set, [args.steps], 0, xt, yt)[0])
            student.eval()
        timed = side_by_side(
            {"teacher": teacher, "macs": by_macs, "latency": by_latency},
            size,
            channels,
            batch,
            args.rounds,
            args.repeats,
        )
        row = dict(
            teacher=name,
            teacher_top1=info["test_top1"],
            batch=batch,
            threads=torch.get_num_threads(),
            target_ms=target,
            predicted_ms=report.latency["predicted_ms"],
            side_by_side=timed,
            macs_teacher=info["macs"],
            macs_macs=macs_macs,
            macs_latency=report.macs_after,
            top1={k: {str(s): v for s, v in d.items()} for k, d in top1.items()},
            steps=args.steps,
            load_1min=os.getloadavg()[0],
        )
        state["fmnist"] = [r for r in state["fmnist"] if r["teacher"] != name] + [row]
        save_state(state)
        print(json.dumps({k: row[k] for k in ("teacher", "target_ms", "predicted_ms", "top1")}), flush=True)
        print({k: v["median_ms"] for k, v in timed.items()}, flush=True)


def plot() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    state = load_state()
    rows = sorted(state["rows"], key=lambda r: (r["threads"], r["batch"], r["model"]))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    labels = [f"{r['model']}\nb{r['batch']} t{r['threads']}" for r in rows]
    xs = range(len(rows))
    ax1.bar(
        [x - 0.2 for x in xs],
        [r["predicted_ms"] / r["latency_model_base_ms"] for r in rows],
        0.4,
        label="predicted / base (latency model)",
    )
    ax1.bar(
        [x + 0.2 for x in xs],
        [r["relative_latency"] for r in rows],
        0.4,
        yerr=[r["side_by_side"]["latency"]["spread"] * r["relative_latency"] for r in rows],
        label="measured / base, side by side (IQR across rounds)",
    )
    ax1.set_xticks(list(xs), labels, fontsize=7)
    ax1.set_ylabel("latency relative to the base model")
    ax1.set_title("share of the base latency: predicted vs measured")
    ax1.legend(fontsize=7)
    ax2.bar([x - 0.2 for x in xs], [r["per_macs_macs"] for r in rows], 0.4, label="MACs-targeted")
    ax2.bar([x + 0.2 for x in xs], [r["per_macs_latency"] for r in rows], 0.4, label="latency-targeted")
    ax2.axhline(1.0, color="0.5", lw=0.8)
    ax2.set_xticks(list(xs), labels, fontsize=7)
    ax2.set_ylabel("speed-up / MACs reduction")
    ax2.set_title("same MACs, two targets")
    ax2.legend(fontsize=7)
    footer(fig, state["meta"], 0)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(RESULTS / "latency_target.png", dpi=130)
    print(f"wrote {RESULTS / 'latency_target.png'}")


def table() -> str:
    """Markdown tables of both parts (also written to results/latency_target.md)."""
    state = load_state()
    lines = [
        "| model | batch | threads | base ms (spread) | target ms | predicted ms | measured ms (spread) | "
        "vs target | predicted / measured share of base | MACs kept | speed-up / MACs reduction: MACs-targeted "
        "| latency-targeted |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(state["rows"], key=lambda r: (r["threads"], r["batch"], r["model"])):
        sb = r["side_by_side"]
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['threads']} | {sb['base']['median_ms']:.1f} ({sb['base']['spread']:.0%}) "
            f"| {r['target_ms']:.1f} | {r['predicted_ms']:.1f} | {r['latency_ms']:.1f} ({sb['latency']['spread']:.0%}) "
            f"| {r['error_vs_target']:+.1%} | {r['predicted_ms'] / r['latency_model_base_ms']:.2f} / "
            f"{r['relative_latency']:.2f} | {r['macs_latency'] / r['macs']:.2f} | {r['per_macs_macs']:.2f} "
            f"| {r['per_macs_latency']:.2f} |"
        )
    if state.get("fmnist"):
        lines += [
            "",
            "| teacher (top-1) | batch | MACs-targeted: MACs kept, ms, top-1 after 0 / N steps | "
            "latency-targeted: MACs kept, ms, top-1 after 0 / N steps | target ms | predicted ms |",
            "|---|---|---|---|---|---|",
        ]
        for r in state["fmnist"]:
            sb, n = r["side_by_side"], str(r["steps"])

            def cell(k: str, macs: int) -> str:
                t = r["top1"][k]
                return (
                    f"{macs / r['macs_teacher']:.2f}, {sb[k]['median_ms']:.2f} ms ({sb[k]['spread']:.0%}), "
                    f"{100 * t['0']:.1f} / {100 * t[n]:.1f}"
                )

            lines.append(
                f"| {r['teacher']} ({100 * r['teacher_top1']:.1f}) | {r['batch']} | {cell('macs', r['macs_macs'])} "
                f"| {cell('latency', r['macs_latency'])} | {r['target_ms']:.2f} | {r['predicted_ms']:.2f} |"
            )
    text = "\n".join(lines) + "\n"
    (RESULTS / "latency_target.md").write_text(text)
    return text


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--part", choices=("shapes", "fmnist"))
    p.add_argument("--runs", default="deit_s@1,vit_b16@1,convnext_b@1,deit_s@32", help="model@batch, comma-separated")
    p.add_argument("--teachers", default="vit,convnext")
    p.add_argument("--fraction", type=float, default=0.5, help="latency target as a share of the base latency")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--fmnist-batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=300, help="distillation steps of each Fashion-MNIST student")
    p.add_argument("--plot", action="store_true", help="draw results/latency_target.png and print the tables")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as cache:  # a fresh latency model per run: its cost is part of the result
        if args.part == "shapes":
            shapes(args, cache)
        elif args.part == "fmnist":
            fmnist(args, cache)
    if args.plot:
        plot()
        print(table())


if __name__ == "__main__":
    main()
