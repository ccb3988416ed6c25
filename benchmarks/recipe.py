"""The DeiT recipe (examples/imagenet_recipe.py) at Fashion-MNIST scale, against plain distillation; 1 vs 2 processes.

    python recipe.py                       # both parts (about 20 minutes on 2 shared cores)
    python recipe.py --part accuracy --steps 300,1000 --seeds 0,1
    python recipe.py --part throughput --throughput-steps 40
    python recipe.py --tables              # the markdown tables of results/recipe.json

Teacher: the cached Fashion-MNIST `vit` (teachers.py `load_teacher`; 1 channel, 28 px). It is pruned once to 50% of
its MACs (Taylor importance, least-squares reconstruction, the package defaults) and the same pruned student is then
distilled by the recipe script in two settings, at the same step budget and optimizer (hard distillation, alpha
0.5, batch 64, AdamW lr 1e-3 cosine with 10% warmup, weight decay 0.05):
  plain  - random horizontal flips only, no mixup / cutmix, no label smoothing;
  recipe - DeiT's RandAugment (rand-m9-mstd0.5-inc1) + padded random crop (DeiT's choice for <= 32 px), random
           erasing 0.25, mixup 0.8 / cutmix 1.0, label smoothing 0.1.
Both keep an EMA of the student (decay 0.998 with warmup, scaled to these short runs; DeiT's 0.99996 suits 300
epochs), so each run reports the last weights and the average. Test top-1 is over the 10,000 test images.

Accuracy runs use one thread (the two cores are shared with other jobs; oversubscribed OpenMP threads were 5-10x
slower in a probe). Throughput: the recipe under torchrun with 1 process (1 and 2 threads) and 2 processes (1 thread
each) on the same two cores, batch 64 per process, dataloader in the main process; images/s is the Trainer's
train_samples_per_second (all processes together), and the teacher's share of the step time is the recipe's own
measurement. A fourth row runs one process with the teacher in bfloat16.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import CACHE, HERE, RESULTS, machine

RECIPE = HERE.parent / "examples" / "imagenet_recipe.py"
COMMON = [
    "--dataset",
    "fashion-mnist",
    "--distillation-type",
    "hard",
    "--alpha",
    "0.5",
    "--batch-size",
    "64",
    "--lr",
    "1e-3",
    "--warmup-ratio",
    "0.1",
    "--weight-decay",
    "0.05",
    "--num-workers",
    "0",
    "--no-eval",
    "--save-steps",
    "100000",
    "--ema-decay",
    "0.998",
    "--ema-warmup",
]
SETTINGS = {
    "plain": ["--augmentation", "flip", "--mixup", "0", "--cutmix", "0", "--smoothing", "0"],
    "recipe": [],  # the recipe's defaults
}


def prepare(workdir: Path, cache_dir: Path) -> tuple[Path, Path]:
    """Save the cached teacher and its 50%-MACs pruned student as checkpoints the recipe script loads."""
    sys.path.insert(0, str(HERE))
    import torch

    from optimum_isoprune import IsomorphicPruner, IsomorphicPruningConfig, count_macs
    from optimum_isoprune.data import load_fashion_mnist, prepare_dataset
    from teachers import load_teacher

    torch.set_num_threads(1)  # the machine is shared: one thread per process runs steadier than two contending
    teacher, _ = load_teacher("vit", cache_dir)
    teacher_dir, student_dir = workdir / "teacher", workdir / "student"
    teacher.save_pretrained(teacher_dir)
    calibration = prepare_dataset(load_fashion_mnist("train", limit=2048), model=teacher)
    pruner = IsomorphicPruner(teacher, base_model_name_or_path=str(teacher_dir))
    pruner.prune(
        IsomorphicPruningConfig(target_macs=0.5 * count_macs(teacher, image_size=28)), calibration_dataset=calibration
    )
    pruner.save_pretrained(student_dir)
    return teacher_dir, student_dir


def run_recipe(extra: list[str], out: Path, nproc: int = 0, threads: int = 1, port: int = 29561) -> dict:
    """One recipe run (under torchrun when nproc > 0); returns its recipe_results.json."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port)]
        if nproc
        else [sys.executable]
    )
    command = [*launcher, str(RECIPE), *extra, "--output-dir", str(out), "--save-total-limit", "1"]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-4000:]}")
    return json.loads((out / "recipe_results.json").read_text())


def accuracy(args: argparse.Namespace, teacher: Path, student: Path, workdir: Path) -> list[dict]:
    rows = []
    for steps in args.steps:
        for seed in args.seeds:
            for name, flags in SETTINGS.items():
                extra = [
                    *COMMON,
                    *flags,
                    "--pruned",
                    str(student),
                    "--teacher",
                    str(teacher),
                    "--max-steps",
                    str(steps),
                    "--seed",
                    str(seed),
                ]
                found = run_recipe(extra, workdir / f"{name}-{steps}-{seed}")
                row = {
                    "setting": name,
                    "steps": steps,
                    "seed": seed,
                    "student_top1": found["student"]["top1"],
                    "ema_top1": found["ema"]["top1"],
                    "train_seconds": found["train_seconds"],
                    "teacher_share": found["teacher_share"],
                }
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def throughput(args: argparse.Namespace, teacher: Path, student: Path, workdir: Path) -> list[dict]:
    rows = []
    for nproc, threads, teacher_dtype in ((1, 1, "float32"), (1, 1, "bfloat16"), (1, 2, "float32"), (2, 1, "float32")):
        extra = [
            *COMMON,
            "--pruned",
            str(student),
            "--teacher",
            str(teacher),
            "--max-steps",
            str(args.throughput_steps),
            "--train-limit",
            "12800",
            "--eval-limit",
            "64",
            "--teacher-dtype",
            teacher_dtype,
        ]
        load = os.getloadavg()[0]
        found = run_recipe(
            extra, workdir / f"throughput-{nproc}-{threads}-{teacher_dtype}", nproc=nproc, threads=threads
        )
        row = {
            "processes": nproc,
            "threads_per_process": threads,
            "teacher_dtype": teacher_dtype,
            "images_per_second": found["images_per_second"],
            "steps": found["steps"],
            "teacher_share": found["teacher_share"],
            "load_average_1min_before": load,
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def _mean_sd(values: list[float]) -> str:
    mean = statistics.mean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:.2f} ± {100 * sd:.2f}"


def tables(state: dict) -> str:
    """Markdown tables of the accuracy and throughput parts."""
    lines = [
        "| setting | steps | seeds | test top-1, last weights | test top-1, EMA | train s / run | teacher share |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    accuracy_rows = state.get("accuracy", [])
    for steps in sorted({r["steps"] for r in accuracy_rows}):
        for name in SETTINGS:
            rows = [r for r in accuracy_rows if r["steps"] == steps and r["setting"] == name]
            if rows:
                lines.append(
                    f"| {name} | {steps} | {len(rows)} | {_mean_sd([r['student_top1'] for r in rows])} | "
                    f"{_mean_sd([r['ema_top1'] for r in rows])} | "
                    f"{statistics.mean(r['train_seconds'] for r in rows):.0f} | "
                    f"{statistics.mean(r['teacher_share'] for r in rows):.2f} |"
                )
    lines += [
        "",
        "| processes x threads | teacher dtype | images/s (all processes) | vs 1 x 1 | teacher share | load before |",
        "|---|---|---:|---:|---:|---:|",
    ]
    through = state.get("throughput", [])
    base = next(
        (r["images_per_second"] for r in through if r["processes"] == 1 and r["threads_per_process"] == 1), None
    )
    for r in through:
        ratio = f"{r['images_per_second'] / base:.2f}x" if base else "-"
        lines.append(
            f"| {r['processes']} x {r['threads_per_process']} | {r.get('teacher_dtype', 'float32')} | "
            f"{r['images_per_second']:.1f} | {ratio} | {r['teacher_share']:.2f} | "
            f"{r.get('load_average_1min_before', float('nan')):.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["all", "accuracy", "throughput"], default="all")
    p.add_argument("--steps", type=lambda s: [int(x) for x in s.split(",")], default=[300, 1000])
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1])
    p.add_argument("--throughput-steps", type=int, default=40)
    p.add_argument("--cache-dir", type=Path, default=CACHE)
    p.add_argument("--out", type=Path, default=RESULTS / "recipe.json")
    p.add_argument("--tables", action="store_true", help="only write the tables of --out (recipe.md beside it)")
    args = p.parse_args()
    if args.tables:
        text = tables(json.loads(args.out.read_text()))
        args.out.with_suffix(".md").write_text(text)
        print(text)
        return
    state = json.loads(args.out.read_text()) if args.out.exists() else {}
    state["machine"] = machine()
    state["settings"] = {"common": COMMON, **SETTINGS}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        teacher, student = prepare(workdir, args.cache_dir)
        if args.part in ("all", "accuracy"):
            state["accuracy"] = accuracy(args, teacher, student, workdir)
        if args.part in ("all", "throughput"):
            state["throughput"] = throughput(args, teacher, student, workdir)
    args.out.write_text(json.dumps(state, indent=2))
    args.out.with_suffix(".md").write_text(tables(state))
    print(tables(state))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
