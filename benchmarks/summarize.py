"""Turn benchmarks/results/*.json into the markdown tables of BENCHMARKS.md (printed, and written to
results/tables.md) and the plots of parts 2 and 4 (parts 1 and 3 plot themselves)."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict

import matplotlib

from _common import RESULTS, footer

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

OUT: list[str] = []


def emit(line: str = "") -> None:
    OUT.append(line)


def load(name):
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def part1() -> None:
    d = load("budget_accuracy.json")
    if not d:
        return
    emit(
        "### Part 1: budget accuracy (max |achieved - target| / target over targets "
        + ", ".join(f"{int(100 * f)}%" for f in sorted({r["fraction"] for r in d["rows"]}))
        + ")"
    )
    emit()
    emit(
        "| model | MACs (orig) | shared: max err | allocate: max err | misses > 1% | package count = FlopCounterMode/2 |"
    )
    emit("|---|---|---|---|---|---|")
    by = defaultdict(list)
    for r in d["rows"]:
        by[r["model"]].append(r)
    for model, rows in by.items():

        def mx(policy):
            errs = [r["rel_error"] for r in rows if r["policy"] == policy and "rel_error" in r]
            return f"{100 * max(errs):.3f}%" if errs else "-"

        misses = [f"{r['policy']}@{r['fraction']}" for r in rows if "error" in r or r["rel_error"] > 0.01]
        agree = all(r.get("flopcounter_after") == r.get("achieved") for r in rows if "achieved" in r)
        emit(
            f"| {model} | {rows[0].get('macs_before', 0) / 1e6:.1f} M | {mx('shared')} | {mx('allocate')} | "
            f"{', '.join(misses) or 'none'} | {'yes, all rows' if agree else 'NO'} |"
        )
    emit()


def part2() -> None:
    d = load("prune_cost.json")
    if not d:
        return
    rows = [r for r in d["rows"] if "error" not in r]
    errors = [r for r in d["rows"] if "error" in r]
    emit("### Part 2: cost of pruning (medians over repeats; one subprocess per run)")
    emit()
    emit(
        "| model | run | n | wall s | CPU s | ratio wall (CPU) vs torch-pruning | peak RSS MB | extra MB | budget s (% of ours) |"
    )
    emit("|---|---|---|---|---|---|---|---|---|")
    main = [r for r in rows if r["part"] == "main"]
    groups = defaultdict(list)
    for r in main:
        label = f"{r['tool']} {r['importance']}" + (
            f" target 50% MACs, {r['policy']}" if r.get("target_fraction") else " ratio 0.4"
        )
        groups[(r["key"], label)].append(r)
    med = lambda rs, k: statistics.median(x[k] for x in rs)  # noqa: E731
    for (key, label), rs in groups.items():
        ref = groups.get((key, "tp magnitude ratio 0.4"))
        ratio = (
            f"{med(rs, 'wall_s') / med(ref, 'wall_s'):.2f}x ({med(rs, 'cpu_s') / med(ref, 'cpu_s'):.2f}x)"
            if ref
            else "-"
        )
        budget = "-"
        if rs[0]["tool"] == "ours":
            b = med([dict(v=r["timings"]["budget"]) for r in rs], "v")
            budget = f"{b:.2f} ({100 * b / med(rs, 'wall_s'):.1f}%)"
        emit(
            f"| {key} | {label} | {len(rs)} | {med(rs, 'wall_s'):.1f} | {med(rs, 'cpu_s'):.1f} | {ratio} | "
            f"{med(rs, 'peak_rss_mb'):.0f} | {med(rs, 'extra_mb'):.0f} | {budget} |"
        )
    growth = [r for r in rows if r["part"] == "growth"]
    if growth:
        emit()
        emit(f"Taylor importance, growth with calibration batches (batch 8, {growth[0]['key']}, 1 run each):")
        emit()
        emit(
            "| batches | ours wall s | torch-pruning wall s | ratio wall (CPU) | ours importance s | tp importance s |"
        )
        emit("|---|---|---|---|---|---|")
        for k in sorted({r["batches"] for r in growth}):
            o = [r for r in growth if r["batches"] == k and r["tool"] == "ours"]
            t = [r for r in growth if r["batches"] == k and r["tool"] == "tp"]
            if o and t:
                o, t = o[0], t[0]
                emit(
                    f"| {k} | {o['wall_s']:.1f} | {t['wall_s']:.1f} | {o['wall_s'] / t['wall_s']:.2f}x "
                    f"({o['cpu_s'] / t['cpu_s']:.2f}x) | {o['timings']['importance']:.1f} | "
                    f"{t['timings']['importance']:.1f} |"
                )
    if errors:
        emit()
        emit(
            "Failed runs: "
            + "; ".join(f"{r['key']} {r['tool']} {r['importance']}: {r['error'][-200:]}" for r in errors)
        )
    emit()
    # plot: wall-time breakdown per model
    fig, ax = plt.subplots(figsize=(10, 4.2))
    labels, parts = [], defaultdict(list)
    keys = ["graph", "importance", "budget", "surgery", "step", "other"]
    for (key, label), rs in groups.items():
        short = label.replace(" target 50% MACs, ", "\n50% MACs ").replace(" ratio 0.4", "\nratio 0.4")
        labels.append(f"{key}\n{short}")
        t = {k: statistics.median(r["timings"].get(k, 0.0) for r in rs) for k in keys[:-1]}
        t["other"] = max(0.0, med(rs, "wall_s") - sum(t.values()))
        for k in keys:
            parts[k].append(t[k])
    bottom = [0.0] * len(labels)
    for k in keys:
        ax.bar(range(len(labels)), parts[k], bottom=bottom, label=k)
        bottom = [b + v for b, v in zip(bottom, parts[k])]
    ax.set_xticks(range(len(labels)), labels, fontsize=6)
    ax.set_ylabel("wall time (s), median")
    ax.legend(fontsize=7)
    ax.set_title("Cost of pruning: optimum-isoprune (ours) vs torch-pruning MetaPruner (tp), timm models, 224 px")
    footer(fig, d["meta"], d["seed"])
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(RESULTS / "prune_cost.png", dpi=120)


def part3() -> None:
    d = load("latency.json")
    if not d:
        return
    emit("### Part 3: CPU latency of pruned models (median of side-by-side rounds)")
    emit()
    emit(
        "| model | MACs target | round_to | batch | MACs reduction | median ms | speed-up | speed-up / MACs reduction |"
    )
    emit("|---|---|---|---|---|---|---|---|")
    for r in d["rows"]:
        tgt = "base" if r["kind"] == "base" else f"{int(100 * r['fraction'])}%"
        emit(
            f"| {r['model']} | {tgt} | {r['round_to'] or '-'} | {r['batch']} | {r['macs_reduction']:.2f}x | "
            f"{r['median_ms']:.0f} | {r['speedup']:.2f}x | {r['speedup_over_macs_reduction']:.2f} |"
        )
    emit()


def part4() -> None:
    d = load("ranking_quality.json")
    if not d:
        return
    rows = [r for r in d["rows"] if "error" not in r]
    emit("### Part 4: top-1 (%) at matched MACs, Fashion-MNIST (2000 test images)")
    emit()
    emit(
        "Teachers: "
        + "; ".join(
            f"{k}: {v['top1'] * 100:.1f}% top-1, {v['macs'] / 1e6:.2f} M MACs, "
            f"{v['params'] / 1e3:.0f} k params, {v['steps']} steps"
            for k, v in d["teachers"].items()
        )
    )
    emit()
    methods = ["iso-shared", "iso-allocate", "global", "uniform", "random"]
    emit("| teacher | MACs | importance | seeds | " + " | ".join(methods) + " |")
    emit("|---|---|---|---|" + "---|" * len(methods))
    cells = defaultdict(list)
    for r in rows:
        cells[(r["teacher"], r["fraction"], r["method"], r["importance"])].append(r)
        if r["method"] == "random":  # random importance ignores the criterion: one column for every table
            cells[(r["teacher"], r["fraction"], r["method"], "magnitude")].append(r)
    for teacher in dict.fromkeys(r["teacher"] for r in rows):
        for fraction in sorted({r["fraction"] for r in rows if r["teacher"] == teacher}, reverse=True):
            for imp in ("taylor", "magnitude"):
                if not any(k[0] == teacher and k[1] == fraction and k[3] == imp and k[2] != "random" for k in cells):
                    continue
                for stage, key in (
                    ("after pruning", "top1_pruned"),
                    (f"after {d['setup']['distill_steps']} distill steps", "top1_distilled"),
                ):
                    vals = []
                    seeds = set()
                    for m in methods:
                        rs = cells.get((teacher, fraction, m, imp), [])
                        seeds |= {r["seed"] for r in rs}
                        if rs:
                            xs = [100 * r[key] for r in rs]
                            vals.append(
                                f"{statistics.mean(xs):.1f}" + (f" ±{statistics.pstdev(xs):.1f}" if len(xs) > 1 else "")
                            )
                        else:
                            vals.append("-")
                    emit(
                        f"| {teacher} | {int(100 * fraction)}% | {imp}, {stage} | {len(seeds)} | "
                        + " | ".join(vals)
                        + " |"
                    )
    emit()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3), sharey=False)
    for ax, key, title in (
        (axes[0], "top1_pruned", "right after pruning"),
        (axes[1], "top1_distilled", f"after {d['setup']['distill_steps']} distillation steps"),
    ):
        xs_labels = []
        for teacher in dict.fromkeys(r["teacher"] for r in rows):
            for fraction in sorted({r["fraction"] for r in rows if r["teacher"] == teacher}, reverse=True):
                xs_labels.append((teacher, fraction))
        for i, m in enumerate(methods):
            ys, errs = [], []
            for teacher, fraction in xs_labels:
                rs = cells.get((teacher, fraction, m, "taylor"), [])
                vals = [100 * r[key] for r in rs]
                ys.append(statistics.mean(vals) if vals else float("nan"))
                errs.append(statistics.pstdev(vals) if len(vals) > 1 else 0)
            ax.bar([j + (i - 2) * 0.16 for j in range(len(xs_labels))], ys, 0.16, yerr=errs, label=m)
        ax.set_xticks(range(len(xs_labels)), [f"{t}\n{int(100 * f)}% MACs" for t, f in xs_labels], fontsize=7)
        ax.set_title(title)
        ax.set_ylabel("top-1 (%)")
    axes[1].legend(fontsize=7)
    seeds = sorted({r["seed"] for r in rows})
    fig.suptitle("Ranking quality at matched MACs (Fashion-MNIST, Taylor importance)")
    footer(fig, d["meta"], seeds)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(RESULTS / "ranking_quality.png", dpi=120)
    if d.get("part5"):
        emit("### Part 5: prune big vs train small")
        emit()
        emit("| model | seed | steps | MACs | params | top-1 start | top-1 after distillation |")
        emit("|---|---|---|---|---|---|---|")
        for r in d["part5"]:
            emit(
                f"| {r['model']} | {r['seed']} | {r['steps']} | {r['macs'] / 1e6:.2f} M | {r['params'] / 1e3:.0f} k | "
                f"{100 * r['top1_start']:.1f} | {100 * r['top1']:.1f} |"
            )
        emit()


if __name__ == "__main__":
    for part in (part1, part2, part3, part4):
        part()
    text = "\n".join(OUT) + "\n"
    (RESULTS / "tables.md").write_text(text)
    print(text)
