"""Issue 14's evidence: accuracy of pruned teachers right after pruning and along one distillation run, with and
without reconstruction.

For every teacher of teachers.py (trained to convergence), MACs fraction, seed and reconstruction mode: prune with
Taylor importance on a seed-dependent calibration sample (8 batches of 32 of the 55,000 training images, never the
validation or test images), round_to=8, target_macs = fraction * teacher MACs; measure top-1 on the 10,000 test images
right after pruning; then distil (DistillationTrainer, soft KD alpha 0.5, T 2, batch 64, lr 1e-3 cosine with 10%
warmup, cached teacher logits, on the 55,000 training images) and measure top-1 at the given global steps of that one
run. Rows are appended to the results JSON as they finish; a rerun skips the rows it already holds. Seeds are the outer
loop, so a cut-short run has seed 0 of every configuration. Peak RSS of pruning is sampled by a thread during
`prune` (ru_maxrss, the process's peak so far, is recorded too but includes earlier rows' distillation).

    python recovery.py --reconstruction none,least_squares     # the grid, 48 rows
    python recovery.py --plot                                  # results/recovery.png and results/recovery.md
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback

from _common import CACHE, RESULTS, footer, machine
from optimum_isoprune import IsomorphicPruner, IsomorphicPruningConfig
from optimum_isoprune.distillation import DistillationTrainer, DistillationTrainingArguments
from teachers import accuracy, load_teacher, tensors, train_val

logging.getLogger("optimum_isoprune").setLevel(logging.WARNING)
KEY = ("teacher", "fraction", "seed", "reconstruction", "steps")
CALIB_BATCHES, CALIB_BATCH_SIZE, HELD_OUT_BATCHES = 8, 32, 2


class Rows(torch.utils.data.Dataset):
    """Tensors as DistillationTrainer rows, with the `idx` column its teacher-logit cache is keyed by."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.x[i], "labels": int(self.y[i]), "idx": int(i)}


class EvaluateAt(TrainerCallback):
    """Test top-1 of the student after the given global steps, without touching its RNG or train mode."""

    def __init__(self, model: nn.Module, steps: list[int], x: torch.Tensor, y: torch.Tensor) -> None:
        self.model, self.steps, self.x, self.y = model, set(steps), x, y
        self.top1: dict[int, float] = {}
        self.seconds = 0.0

    def on_step_end(self, args, state, control, **kwargs) -> None:
        if state.global_step in self.steps:
            tick = time.perf_counter()
            with torch.random.fork_rng(devices=[]):
                self.top1[state.global_step] = accuracy(self.model, self.x, self.y)  # eval mode, inference_mode
            self.seconds += time.perf_counter() - tick


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@contextmanager
def peak_rss(every_s: float = 0.005) -> Iterator[dict]:
    """Resident memory before a block and its peak during it (MB), sampled by a thread."""
    out = {"before_mb": _rss_mb(), "peak_mb": _rss_mb()}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(every_s):
            out["peak_mb"] = max(out["peak_mb"], _rss_mb())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join()
        out["peak_mb"] = max(out["peak_mb"], _rss_mb())


def method_config(method: str) -> dict:
    """Config fields of a method "<reconstruction>[:<split>[@<finalists>]]", split one of shared (default), search,
    allocate, global or uniform (the last two are groupings ranked with the shared policy); "search@4" sets
    search_finalists=4."""
    reconstruction, _, split = method.partition(":")
    split, _, finalists = (split or "shared").partition("@")
    if split in ("global", "uniform"):
        return dict(reconstruction=reconstruction, grouping=split)
    extra = dict(search_finalists=int(finalists)) if finalists else {}
    return dict(reconstruction=reconstruction, budget_policy=split, **extra)


def calibration(x: torch.Tensor, y: torch.Tensor, seed: int) -> torch.utils.data.DataLoader:
    """A seed-dependent sample of (CALIB_BATCHES + HELD_OUT_BATCHES) x CALIB_BATCH_SIZE training images: importance
    and reconstruction read the first CALIB_BATCHES, the search policy scores splits on the rest."""
    generator = torch.Generator().manual_seed(1000 + seed)
    idx = torch.randperm(len(y), generator=generator)[: (CALIB_BATCHES + HELD_OUT_BATCHES) * CALIB_BATCH_SIZE]
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[idx], y[idx]), batch_size=CALIB_BATCH_SIZE)


def distill(
    student: nn.Module,
    teacher: nn.Module,
    train_set: Rows,
    steps: list[int],
    seed: int,
    xt: torch.Tensor,
    yt: torch.Tensor,
) -> tuple[dict[int, float], float]:
    """One distillation run of max(steps) steps: test top-1 after each of `steps`, and its seconds (evaluation not
    included)."""
    tick = time.perf_counter()
    callback = EvaluateAt(student, steps, xt, yt)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as out:
        args = DistillationTrainingArguments(
            output_dir=out,
            max_steps=max(steps),
            per_device_train_batch_size=64,
            learning_rate=1e-3,
            weight_decay=0.05,
            warmup_steps=max(1, max(steps) // 10),
            lr_scheduler_type="cosine",
            use_cpu=True,
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            seed=seed,
            data_seed=seed,
            distillation_type="soft",
            alpha=0.5,
            temperature=2.0,
            cache_teacher_logits=True,
            teacher_cache_column="idx",
            dataloader_num_workers=0,
        )
        DistillationTrainer(
            model=student, args=args, teacher_model=teacher, train_dataset=train_set, callbacks=[callback]
        ).train()
    return callback.top1, time.perf_counter() - tick - callback.seconds


def run(args: argparse.Namespace) -> None:
    state = json.loads(args.out.read_text()) if args.out.exists() else {}
    rows: list[dict] = state.get("rows", [])
    steps = sorted(int(s) for s in args.steps.split(","))
    done = {(r["teacher"], r["fraction"], r["seed"], r["reconstruction"], tuple(r["steps"])) for r in rows}
    xtr, ytr, _, _ = train_val()
    xt, yt = tensors("test")
    train_set = Rows(xtr, ytr)
    teachers = {name: load_teacher(name, args.cache_dir) for name in args.teachers.split(",")}
    payload = dict(
        meta=machine(),
        teachers={**state.get("teachers", {}), **{k: v[1] for k, v in teachers.items()}},
        rows=rows,
        setup=dict(
            calibration=f"{CALIB_BATCHES} batches of {CALIB_BATCH_SIZE} of the 55,000 training images, seed-dependent",
            importance="taylor",
            round_to=8,
            test_images=len(yt),
            distillation="soft KD alpha 0.5 T 2, batch 64, lr 1e-3 cosine, 10% warmup, cached teacher logits, "
            "55,000 training images",
            torch_threads=torch.get_num_threads(),
        ),
    )

    for seed in [int(s) for s in args.seeds.split(",")]:  # seeds outermost: a cut-short run has seed 0 everywhere
        for name, (teacher, info) in teachers.items():
            for fraction in [float(f) for f in args.fractions.split(",")]:
                for mode in args.reconstruction.split(","):
                    key = (name, fraction, seed, mode, tuple(steps))
                    if key in done:
                        continue
                    config = IsomorphicPruningConfig(
                        target_macs=fraction * info["macs"],
                        importance="taylor",
                        round_to=8,
                        seed=seed,
                        num_calibration_batches=CALIB_BATCHES,
                        **method_config(mode),
                    )
                    pruner = IsomorphicPruner(teacher)
                    load = os.getloadavg()[0]
                    tick = time.perf_counter()
                    with peak_rss() as memory:
                        student = pruner.prune(config, calibration_dataset=calibration(xtr, ytr, seed))
                    prune_s = time.perf_counter() - tick
                    report = pruner.report
                    top1 = {0: accuracy(student, xt, yt)}
                    distilled, distill_s = distill(student, teacher, train_set, steps, seed, xt, yt)
                    top1.update(distilled)
                    row = dict(
                        zip(KEY, (name, fraction, seed, mode, steps)),
                        teacher_top1=info["test_top1"],
                        macs=report.macs_after,
                        macs_ratio=report.macs_after / report.macs_before,
                        params=report.params_after,
                        params_before=report.params_before,
                        prune_s=prune_s,
                        timings=report.timings,
                        reconstruction_report=report.reconstruction,
                        prune_rss_before_mb=memory["before_mb"],
                        prune_rss_peak_mb=memory["peak_mb"],
                        ru_maxrss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                        distill_s=distill_s,
                        load_1min=load,
                        top1={str(k): v for k, v in top1.items()},
                    )
                    rows.append(row)
                    args.out.write_text(json.dumps(payload, indent=1, default=float) + "\n")
                    print(
                        json.dumps({k: row[k] for k in (*KEY, "macs_ratio", "prune_s", "distill_s", "top1")}),
                        flush=True,
                    )


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _cell(values: list[float], digits: int = 2) -> str:
    mean, std = _mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def plot(path: Path) -> None:
    """Figure (per teacher: top-1 vs distillation steps, both modes and fractions) and markdown table of `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    state = json.loads(path.read_text())
    rows, teachers = state["rows"], state["teachers"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["teacher"], r["fraction"], r["reconstruction"], tuple(r["steps"])), []).append(r)
    names = [t for t in ("vit", "deit", "convnext", "resnet") if any(k[0] == t for k in groups)]
    methods = sorted({k[2] for k in groups}, key=lambda m: (m != "none", m))
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        for (teacher, fraction, mode, steps), rs in sorted(groups.items()):
            if teacher != name:
                continue
            xs = [0, *steps]
            stats = [_mean_std([100 * r["top1"][str(s)] for r in rs]) for s in xs]
            ax.errorbar(
                range(len(xs)),
                [m for m, _ in stats],
                yerr=[s for _, s in stats],
                capsize=3,
                color=f"C{methods.index(mode)}",
                linestyle="-" if fraction == 0.5 else ":",
                marker="o" if fraction == 0.5 else "s",
                label=f"{mode}, {fraction:.0%} MACs (n={len(rs)})",
            )
            ax.set_xticks(range(len(xs)), [str(s) for s in xs])
        ax.axhline(100 * teachers[name]["test_top1"], color="k", linestyle="--", label="teacher")
        ax.set_title(f"{name} ({teachers[name]['macs'] / 1e6:.1f} M MACs)")
        ax.set_xlabel("distillation steps")
        ax.set_ylabel("test top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    footer(fig, state["meta"], "0, 1, 2" if len({r["seed"] for r in rows}) > 1 else rows[0]["seed"])
    fig.savefig(path.with_suffix(".png"), dpi=130)

    lines = [
        "| teacher | MACs (M) | params (K) | epochs | max epochs hit | train s | test top-1 |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {n} | {t['macs'] / 1e6:.2f} | {t['params'] / 1e3:.0f} | {t['epochs']} | {t['max_epochs_hit']} | "
        f"{t['seconds']:.0f} | {100 * t['test_top1']:.2f} |"
        for n, t in teachers.items()
    ]
    cols = [0, *sorted({s for k in groups for s in k[3]})]
    header = [
        "teacher",
        "target MACs",
        "MACs kept %",
        "reconstruction",
        "seeds",
        "prune s",
        "of which reconstruction s",
        "peak RSS MB (prune)",
        "distillation s (steps)",
        *(f"top-1 @ {s}" for s in cols),
    ]
    lines += ["", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    order = lambda kv: (names.index(kv[0][0]), -kv[0][1], kv[0][2])  # noqa: E731
    for (teacher, fraction, mode, steps), rs in sorted(groups.items(), key=order):
        tops = [_cell([100 * r["top1"][str(s)] for r in rs]) if str(s) in rs[0]["top1"] else "-" for s in cols]
        lines.append(
            f"| {teacher} | {fraction:.0%} | {_cell([100 * r['macs_ratio'] for r in rs], 1)} | {mode} | "
            f"{len(rs)} | {_cell([r['prune_s'] for r in rs])} | "
            f"{_cell([r['timings'].get('reconstruction', 0.0) for r in rs])} | "
            f"{_cell([r['prune_rss_peak_mb'] for r in rs], 0)} | {_cell([r['distill_s'] for r in rs], 0)} "
            f"({max(steps)}) | " + " | ".join(tops) + " |"
        )
    lines += _versus_best_other(groups, names, cols)
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {path.with_suffix('.png')} and {path.with_suffix('.md')}")


def _versus_best_other(
    groups: dict[tuple, list[dict]], names: list[str], cols: list[int], reference: str = "least_squares:search"
) -> list[str]:
    """Per teacher, MACs fraction and step: the reference method's mean top-1 minus the best other method's (seeds
    that both have), when the file holds the reference and at least one other method at the same steps."""
    lines = [
        "",
        f"{reference} minus the best other method (mean top-1 over common seeds, points; best other named):",
        "",
        "| teacher | target MACs | " + " | ".join(f"@ {s}" for s in cols) + " |",
        "|---" * (2 + len(cols)) + "|",
    ]
    found = False
    for name in names:
        for fraction in sorted({k[1] for k in groups if k[0] == name}, reverse=True):
            runs = {k[2]: rs for k, rs in groups.items() if k[:2] == (name, fraction)}
            if reference not in runs or len(runs) < 2:
                continue
            found, cells = True, []
            seeds = {r["seed"] for r in runs[reference]}
            for step in cols:

                def mean(method: str) -> float | None:
                    values = [100 * r["top1"][str(step)] for r in runs[method] if r["seed"] in seeds]
                    return statistics.mean(values) if len(values) == len(seeds) else None

                others = {m: mean(m) for m in runs if m != reference and mean(m) is not None}
                if not others or mean(reference) is None:
                    cells.append("-")
                    continue
                best = max(others, key=others.get)
                cells.append(f"{mean(reference) - others[best]:+.2f} ({best.partition(':')[2] or 'shared'})")
            lines.append(f"| {name} | {fraction:.0%} | " + " | ".join(cells) + " |")
    return lines if found else []


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teachers", default="vit,convnext,resnet,deit")
    p.add_argument("--fractions", default="0.5,0.25")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", default="100,300,1000", help="distillation steps to evaluate at (the run lasts the max)")
    p.add_argument("--reconstruction", default="none,least_squares")
    p.add_argument("--cache-dir", type=Path, default=CACHE, help="where teachers.py keeps (or trains) the teachers")
    p.add_argument("--out", type=Path, default=RESULTS / "recovery.json")
    p.add_argument("--plot", action="store_true", help="only draw the figure and table of --out")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not args.plot:
        run(args)
    plot(args.out)


if __name__ == "__main__":
    main()
