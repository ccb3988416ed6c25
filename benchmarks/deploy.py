"""Deployment part of BENCHMARKS.md: PyTorch eager vs onnxruntime fp32 / int8 (vs OpenVINO), pruned and not.

Latency (--part latency): timm ViT-B/16 and ConvNeXt-B shapes (random weights, 224 px) at 100%, 50% and 25%
of their MACs (magnitude importance, isomorphic, round_to 8), each exported with `export_onnx` (parity
checked), quantized int8 dynamic and int8 static (calibrated on random images: the weights are random too),
and timed with `benchmark_deployment`: for one model and batch size every runtime runs once per round in a
rotating order, and each gets the median of its rounds. CPU threads: 2 for every runtime.

Accuracy (--part accuracy): a small ViT trained briefly on Fashion-MNIST (a few hundred steps; not the demo's
teacher), pruned to 50% MACs (Taylor, 512 training images) and distilled a few hundred steps; top-1 of the
student on the 10,000 test images in PyTorch, onnxruntime fp32, int8 dynamic and int8 static (calibrated on
the pruning calibration images).
"""

from __future__ import annotations

import argparse
import shutil
import time

import torch

from _common import CACHE, RESULTS, footer, machine, save_json
from optimum_isoprune import (
    IsomorphicPruner,
    IsomorphicPruningConfig,
    benchmark_deployment,
    count_macs,
    export_onnx,
    quantize_onnx,
)

MODELS = {"vit_b16": "vit_base_patch16_224", "convnext_b": "convnext_base"}
WORK = CACHE / "deploy"


def latency(args) -> None:
    import timm

    meta = machine()
    results = []
    previous = RESULTS / "deploy_latency.json"
    if args.append and previous.exists():  # keep the other models' rows of an earlier run
        import json

        results = [r for r in json.loads(previous.read_text())["results"] if r["model"] not in args.models.split(",")]
    for key in args.models.split(","):
        torch.manual_seed(0)
        base = timm.create_model(MODELS[key], pretrained=False).eval()
        base_macs = count_macs(base)
        pruner = IsomorphicPruner(base)
        for fraction in [float(f) for f in args.fractions.split(",")]:
            if fraction < 1:
                cfg = IsomorphicPruningConfig(
                    target_macs=fraction * base_macs, importance="magnitude", round_to=8, seed=0
                )
                model = pruner.prune(cfg).eval()
            else:
                model = base
            macs = count_macs(model)
            out = WORK / f"{key}_{int(fraction * 100)}"
            shutil.rmtree(out, ignore_errors=True)
            start = time.perf_counter()
            export = export_onnx(model, out)
            export_s = time.perf_counter() - start
            calibration = torch.randn(args.calibration_images, 3, 224, 224, generator=torch.Generator().manual_seed(0))
            start = time.perf_counter()
            quantize_onnx(export.path, "int8-dynamic")
            dynamic_s = time.perf_counter() - start
            start = time.perf_counter()
            quantize_onnx(
                export.path,
                "int8-static",
                calibration_dataset=calibration,
                calibration_batch_size=8,
                num_calibration_batches=max(1, args.calibration_images // 8),
            )
            static_s = time.perf_counter() - start
            print(
                key,
                fraction,
                f"MACs {macs / 1e9:.2f} G, parity {export.max_abs_diff:.2e}, export {export_s:.0f} s, "
                f"int8 dynamic {dynamic_s:.0f} s, static {static_s:.0f} s",
                flush=True,
            )
            deployment = benchmark_deployment(
                model,
                out,
                batch_sizes=[int(b) for b in args.batch_sizes.split(",")],
                threads=args.threads,
                rounds={1: args.rounds1, 32: args.rounds32},
                warmup=1,
                openvino=not args.no_openvino,
                save=True,
            )
            results.append(
                dict(
                    model=key,
                    fraction=fraction,
                    macs=macs,
                    params=sum(p.numel() for p in model.parameters()),
                    max_abs_diff=export.max_abs_diff,
                    export_s=export_s,
                    quantize_dynamic_s=dynamic_s,
                    quantize_static_s=static_s,
                    deployment=deployment,
                )
            )
            for row in deployment["rows"]:
                print("  ", row["runtime"], row["precision"], row["latency_ms"], flush=True)
            save_json("deploy_latency.json", dict(meta=meta, threads=args.threads, results=results))
            if model is not base:
                del model
        del pruner, base
    plot(results, meta)


def plot(results, meta) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    models = sorted({r["model"] for r in results})
    batch_sizes = results[0]["deployment"]["batch_sizes"]
    fig = Figure(figsize=(5.5 * len(batch_sizes), 3.6 * len(models)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(models), len(batch_sizes), squeeze=False)
    for i, model in enumerate(models):
        rows = [r for r in results if r["model"] == model]
        base = next(r for r in rows if r["fraction"] == 1.0)["deployment"]["rows"][0]["latency_ms"]
        for j, batch in enumerate(batch_sizes):
            ax = axes[i][j]
            keys = [row["key"] for row in rows[0]["deployment"]["rows"]]
            width = 0.8 / len(keys)
            for k, key in enumerate(keys):
                xs, ys = [], []
                for n, r in enumerate(rows):
                    row = next((x for x in r["deployment"]["rows"] if x["key"] == key), None)
                    if row:
                        xs.append(n + k * width)
                        ys.append(base[str(batch)] / row["latency_ms"][str(batch)])
                ax.bar(xs, ys, width=width, label=key)
            ax.set_xticks([n + 0.4 - width / 2 for n in range(len(rows))])
            ax.set_xticklabels([f"{int(r['fraction'] * 100)}% MACs" for r in rows])
            ax.set_ylabel("speed-up vs unpruned PyTorch")
            ax.set_title(f"{model}, batch {batch}", fontsize=10)
            ax.axhline(1, color="0.5", lw=0.5)
    axes[0][0].legend(fontsize=7)
    footer(fig, meta, 0)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(RESULTS / "deploy_latency.png", dpi=110)
    print(f"wrote {RESULTS / 'deploy_latency.png'}")


def accuracy(args) -> None:
    from transformers import Trainer, TrainingArguments, ViTConfig, ViTForImageClassification

    from optimum_isoprune import DistillationTrainer, DistillationTrainingArguments, evaluate_model, evaluate_onnx

    meta = machine()
    torch.manual_seed(0)
    teacher = ViTForImageClassification(
        ViTConfig(
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=256,
            image_size=28,
            patch_size=7,
            num_channels=1,
            num_labels=10,
        )
    )
    # Tensors prepared once (the same normalisation as prepare_dataset): PIL transforms per step would dominate.
    train, test = _tensor_split("train"), _tensor_split("test")
    common = dict(
        per_device_train_batch_size=128,
        learning_rate=2e-3,
        weight_decay=0.05,
        lr_scheduler_type="cosine",
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        seed=0,
        remove_unused_columns=False,
        label_names=["labels"],
        disable_tqdm=True,
        logging_steps=100,
    )
    start = time.perf_counter()
    Trainer(
        model=teacher,
        args=TrainingArguments(output_dir=str(WORK / "teacher"), max_steps=args.teacher_steps, **common),
        train_dataset=train,
    ).train()
    teacher_s = time.perf_counter() - start
    teacher.eval()
    pruner = IsomorphicPruner(teacher)
    calibration = train.pixels[:512]
    student = pruner.prune(
        IsomorphicPruningConfig(
            target_macs=0.5 * count_macs(teacher), num_calibration_batches=8, calibration_batch_size=64
        ),
        calibration_dataset=calibration,
    )
    start = time.perf_counter()
    DistillationTrainer(
        model=student,
        teacher_model=teacher,
        train_dataset=train,
        args=DistillationTrainingArguments(
            output_dir=str(WORK / "student"),
            max_steps=args.student_steps,
            distillation_type="soft",
            alpha=0.7,
            temperature=2.0,
            **common,
        ),
    ).train()
    student_s = time.perf_counter() - start
    student.eval()
    out = WORK / "fashion_student"
    shutil.rmtree(out, ignore_errors=True)
    export = export_onnx(student, out)
    paths = {
        "fp32": export.path,
        "int8-dynamic": quantize_onnx(export.path, "int8-dynamic"),
        "int8-static": quantize_onnx(
            export.path,
            "int8-static",
            calibration_dataset=calibration,
            num_calibration_batches=8,
            calibration_batch_size=64,
        ),
    }
    rows = [
        dict(runtime="PyTorch", precision="fp32", **evaluate_model(student, test, disable_tqdm=True)),
        dict(runtime="PyTorch (teacher)", precision="fp32", **evaluate_model(teacher, test, disable_tqdm=True)),
    ]
    for mode, path in paths.items():
        rows.append(
            dict(
                runtime="onnxruntime",
                precision=mode,
                file_bytes=__import__("os").path.getsize(path),
                **evaluate_onnx(path, test),
            )
        )
    try:
        import openvino  # noqa: F401

        for mode in ("fp32", "int8-static"):
            rows.append(
                dict(runtime="OpenVINO", precision=mode, **evaluate_onnx(paths[mode], test, runtime="openvino"))
            )
    except ImportError:
        pass
    for row in rows:
        print(row, flush=True)
    save_json(
        "deploy_accuracy.json",
        dict(
            meta=meta,
            teacher_steps=args.teacher_steps,
            student_steps=args.student_steps,
            teacher_train_s=teacher_s,
            student_train_s=student_s,
            teacher_macs=count_macs(teacher),
            student_macs=count_macs(student),
            max_abs_diff=export.max_abs_diff,
            rows=rows,
        ),
    )


class _Split(torch.utils.data.Dataset):
    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor) -> None:
        self.pixels, self.labels = pixels, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.pixels[i], "labels": int(self.labels[i])}


def _tensor_split(split: str) -> _Split:
    from pathlib import Path

    from optimum_isoprune.data import FASHION_MNIST_DIR, FASHION_MNIST_MEAN, FASHION_MNIST_STD, _read_idx

    prefix = {"train": "train", "test": "t10k"}[split]
    images = _read_idx(Path(FASHION_MNIST_DIR) / f"{prefix}-images-idx3-ubyte.gz", 3)
    labels = _read_idx(Path(FASHION_MNIST_DIR) / f"{prefix}-labels-idx1-ubyte.gz", 1)
    pixels = (torch.from_numpy(images.copy()).float().unsqueeze(1) / 255 - FASHION_MNIST_MEAN[0]) / FASHION_MNIST_STD[0]
    return _Split(pixels, torch.from_numpy(labels.astype("int64")))


def tables() -> None:
    """Print the markdown tables of BENCHMARKS.md's deployment part from the saved JSON."""
    import json

    latency_file, accuracy_file = RESULTS / "deploy_latency.json", RESULTS / "deploy_accuracy.json"
    if latency_file.exists():
        data = json.loads(latency_file.read_text())
        results = data["results"]
        plot(results, data["meta"])
        batch_sizes = results[0]["deployment"]["batch_sizes"]
        base = {r["model"]: r["deployment"]["rows"][0]["latency_ms"] for r in results if r["fraction"] == 1.0}
        print(
            "| model | MACs | runtime | precision | file (MB) |"
            + "".join(f" batch {b}: ms (speed-up) |" for b in batch_sizes)
        )
        print("|---|---:|---|---|---:|" + "---:|" * len(batch_sizes))
        for r in results:
            for row in r["deployment"]["rows"]:
                cells = "".join(
                    f" {row['latency_ms'][str(b)]:.1f} ({base[r['model']][str(b)] / row['latency_ms'][str(b)]:.2f}x) |"
                    for b in batch_sizes
                )
                print(
                    f"| {r['model']} | {int(r['fraction'] * 100)}% ({r['macs'] / 1e9:.2f} G) | {row['runtime']} | "
                    f"{row['precision']} | {row['file_bytes'] / 1e6:.1f} |{cells}"
                )
        print()
        print("| model | MACs | parity max abs diff | export (s) | int8 dynamic (s) | int8 static (s) |")
        print("|---|---:|---:|---:|---:|---:|")
        for r in results:
            print(
                f"| {r['model']} | {int(r['fraction'] * 100)}% | {r['max_abs_diff']:.1e} | {r['export_s']:.0f} | "
                f"{r['quantize_dynamic_s']:.0f} | {r['quantize_static_s']:.0f} |"
            )
        print()
    if accuracy_file.exists():
        data = json.loads(accuracy_file.read_text())
        print("| model | runtime | precision | file (KB) | top-1 (%) | top-5 (%) |")
        print("|---|---|---|---:|---:|---:|")
        for row in data["rows"]:
            size = f"{row['file_bytes'] / 1e3:.0f}" if row.get("file_bytes") else ""
            who = "teacher" if "teacher" in row["runtime"] else "student"
            print(
                f"| {who} | {row['runtime'].replace(' (teacher)', '')} | {row['precision']} | {size} | "
                f"{100 * row['top1']:.2f} | {100 * row['top5']:.2f} |"
            )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--part", choices=("latency", "accuracy", "all", "tables"), default="all")
    p.add_argument("--models", default="vit_b16,convnext_b")
    p.add_argument("--fractions", default="1.0,0.5,0.25")
    p.add_argument("--batch-sizes", default="1,32")
    p.add_argument("--rounds1", type=int, default=10, help="rounds at batch 1")
    p.add_argument("--rounds32", type=int, default=3, help="rounds at batch 32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calibration-images", type=int, default=32)
    p.add_argument("--no-openvino", action="store_true")
    p.add_argument("--append", action="store_true", help="keep the saved results of models not measured this time")
    p.add_argument("--teacher-steps", type=int, default=600)
    p.add_argument("--student-steps", type=int, default=300)
    args = p.parse_args()
    if args.part == "tables":
        return tables()
    torch.set_num_threads(args.threads)
    if args.part in ("accuracy", "all"):
        accuracy(args)
    if args.part in ("latency", "all"):
        latency(args)


if __name__ == "__main__":
    main()
