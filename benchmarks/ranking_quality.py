"""Part 4 (and 5) - ranking quality at matched MACs on Fashion-MNIST.

Teachers (trained here, cached under benchmarks/.cache as safetensors): a small transformers ViT and a small
transformers ConvNeXt, both 1 channel, 28 px. Each is pruned to a fraction of its MACs by
  iso-shared   grouping=isomorphic, budget_policy=shared   (the paper)
  iso-allocate grouping=isomorphic, budget_policy=allocate
  global       grouping=global     (all classes ranked together)
  uniform      grouping=uniform    (same ratio in every layer)
  random       importance=random, grouping=isomorphic, shared
then evaluated (top-1 on the first 2000 test images) right after pruning and after an identical short
distillation (DistillationTrainer, soft KD from the teacher, cached teacher logits).

Part 5 (--part5): the ViT teacher pruned to the MACs of a narrower ViT and distilled, vs that narrower ViT
trained from scratch with the same distillation budget.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
import time

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import ConvNextConfig, ConvNextForImageClassification, ViTConfig, ViTForImageClassification

from _common import CACHE, RESULTS, machine, save_json
from optimum_isoprune import IsomorphicPruner, IsomorphicPruningConfig, count_macs
from optimum_isoprune.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_fashion_mnist
from optimum_isoprune.distillation import DistillationTrainer, DistillationTrainingArguments

logging.getLogger("optimum_isoprune").setLevel(logging.WARNING)
torch.set_num_threads(2)

TEACHERS = {
    "vit": lambda: ViTForImageClassification(
        ViTConfig(
            hidden_size=96,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=384,
            image_size=28,
            patch_size=7,
            num_channels=1,
            num_labels=10,
            attn_implementation="eager",
        )
    ),
    "convnext": lambda: ConvNextForImageClassification(
        ConvNextConfig(
            num_channels=1,
            patch_size=4,
            hidden_sizes=[48, 96],
            depths=[2, 2],
            num_stages=2,
            image_size=28,
            num_labels=10,
        )
    ),
}


def SMALL_VIT() -> ViTForImageClassification:  # part 5's "train small" model
    return ViTForImageClassification(
        ViTConfig(
            hidden_size=48,
            num_hidden_layers=4,
            num_attention_heads=2,
            intermediate_size=192,
            image_size=28,
            patch_size=7,
            num_channels=1,
            num_labels=10,
            attn_implementation="eager",
        )
    )


METHODS = {
    "iso-shared": dict(grouping="isomorphic", budget_policy="shared"),
    "iso-allocate": dict(grouping="isomorphic", budget_policy="allocate"),
    "global": dict(grouping="global", budget_policy="shared"),
    "uniform": dict(grouping="uniform", budget_policy="shared"),
    "random": dict(grouping="isomorphic", budget_policy="shared", importance="random"),
}


def tensors(split: str, limit: int):
    ds = load_fashion_mnist(split, limit=limit)
    images = np.stack([np.asarray(im, dtype=np.float32) for im in ds["image"]]) / 255.0
    x = (torch.from_numpy(images)[:, None] - FASHION_MNIST_MEAN[0]) / FASHION_MNIST_STD[0]
    return x.contiguous(), torch.tensor(ds["label"], dtype=torch.long)


class Rows(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": int(self.y[i]), "idx": int(i)}


def logits(model, x):
    return model(pixel_values=x).logits


@torch.inference_mode()
def accuracy(model, x, y) -> float:
    model.eval()
    correct = sum(int((logits(model, xb).argmax(-1) == yb).sum()) for xb, yb in zip(x.split(500), y.split(500)))
    return correct / len(y)


def train_teacher(name: str, x, y, xt, yt, seconds: float, seed: int = 0):
    path = CACHE / f"teacher_{name}.safetensors"
    torch.manual_seed(seed)
    model = TEACHERS[name]()
    if path.exists():
        model.load_state_dict(load_file(str(path)))
        info = json.loads((CACHE / f"teacher_{name}.json").read_text())
        print(f"teacher {name}: cached, top-1 {info['top1']:.4f}", flush=True)
        return model.eval(), info
    steps_max, bs = 4000, 128
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    g = torch.Generator().manual_seed(seed)
    start, step = time.perf_counter(), 0
    model.train()
    while time.perf_counter() - start < seconds and step < steps_max:
        idx = torch.randint(0, len(y), (bs,), generator=g)
        xb = x[idx]
        flip = torch.rand(bs, generator=g) < 0.5
        xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
        frac = (time.perf_counter() - start) / seconds
        for group in opt.param_groups:
            group["lr"] = 2e-3 * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
        loss = torch.nn.functional.cross_entropy(logits(model, xb), y[idx], label_smoothing=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
    info = dict(
        steps=step,
        batch_size=bs,
        seconds=time.perf_counter() - start,
        top1=accuracy(model, xt, yt),
        macs=count_macs(model),
        params=sum(p.numel() for p in model.parameters()),
    )
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    (CACHE / f"teacher_{name}.json").write_text(json.dumps(info))
    print(f"teacher {name}: trained {info}", flush=True)
    return model.eval(), info


def distill(student, teacher, train_set, steps: int, seed: int, lr: float = 1e-3) -> float:
    tick = time.perf_counter()
    # DistillationTrainer freezes the teacher in place, and a model pruned from a frozen teacher may inherit
    # requires_grad=False (seen with transformers ConvNeXt): the whole student trains.
    student.requires_grad_(True)
    with tempfile.TemporaryDirectory() as out:
        args = DistillationTrainingArguments(
            output_dir=out,
            max_steps=steps,
            per_device_train_batch_size=64,
            learning_rate=lr,
            weight_decay=0.05,
            warmup_steps=max(1, steps // 10),
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
        DistillationTrainer(model=student, args=args, teacher_model=teacher, train_dataset=train_set).train()
    return time.perf_counter() - tick


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--teachers", default="vit,convnext")
    p.add_argument("--fractions", default="0.5,0.25")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--importances", default="taylor")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--train-limit", type=int, default=10000)
    p.add_argument("--teacher-seconds", type=float, default=150)
    p.add_argument("--calib-batches", type=int, default=8)
    p.add_argument("--part5", action="store_true")
    p.add_argument("--fresh", action="store_true", help="ignore results/ranking_quality.json (default: resume it)")
    p.add_argument("--part5-steps", type=int, default=600)
    args = p.parse_args()

    out_path = RESULTS / "ranking_quality.json"
    state = json.loads(out_path.read_text()) if out_path.exists() and not args.fresh else {}
    rows = state.get("rows", [])
    done = {(r["teacher"], r["fraction"], r["method"], r["importance"], r["seed"], r["steps"]) for r in rows}
    meta = machine()
    x, y = tensors("train", None)
    xt, yt = tensors("test", 2000)
    xs, ys = x[: args.train_limit], y[: args.train_limit]
    train_set = Rows(xs, ys)
    teachers = {}
    for name in args.teachers.split(","):
        teachers[name] = train_teacher(name, x, y, xt, yt, args.teacher_seconds)

    def save():
        save_json(
            "ranking_quality.json",
            dict(
                meta=meta,
                setup=dict(
                    train_subset=args.train_limit,
                    test_subset=2000,
                    distill_steps=args.steps,
                    batch_size=64,
                    distillation="soft, alpha 0.5, T 2, cached teacher logits",
                    calibration=f"{args.calib_batches} batches of 32 train images (Taylor)",
                    round_to=8,
                    teacher_seconds=args.teacher_seconds,
                ),
                teachers={k: v[1] for k, v in teachers.items()},
                rows=rows,
                part5=state.get("part5", []),
            ),
        )

    for seed in [int(s) for s in args.seeds.split(",")]:  # seeds outermost: a cut-short run still has seed 0 everywhere
        for name, (teacher, tinfo) in teachers.items():
            for fraction in [float(f) for f in args.fractions.split(",")]:
                for importance in args.importances.split(","):
                    for method in args.methods.split(","):
                        key = (name, fraction, method, importance, seed, args.steps)
                        if key in done or (method == "random" and importance != args.importances.split(",")[0]):
                            continue
                        kw = dict(METHODS[method])
                        kw.setdefault("importance", importance)
                        gen = torch.Generator().manual_seed(1000 + seed)
                        cidx = torch.randperm(len(y), generator=gen)[: 32 * args.calib_batches]
                        loader = torch.utils.data.DataLoader(
                            torch.utils.data.TensorDataset(x[cidx], y[cidx]), batch_size=32
                        )
                        cfg = IsomorphicPruningConfig(
                            target_macs=fraction * tinfo["macs"],
                            round_to=8,
                            seed=seed,
                            num_calibration_batches=args.calib_batches,
                            **kw,
                        )
                        tick = time.perf_counter()
                        pruner = IsomorphicPruner(teacher)
                        try:
                            student = pruner.prune(cfg, calibration_dataset=loader)
                        except Exception as error:  # noqa: BLE001 - record and go on
                            rows.append(
                                dict(
                                    teacher=name,
                                    fraction=fraction,
                                    method=method,
                                    importance=importance,
                                    seed=seed,
                                    steps=args.steps,
                                    error=repr(error)[:300],
                                )
                            )
                            print("ERROR", key, repr(error)[:300], flush=True)
                            continue
                        prune_s = time.perf_counter() - tick
                        rep = pruner.report
                        row = dict(
                            teacher=name,
                            fraction=fraction,
                            method=method,
                            importance=importance,
                            seed=seed,
                            steps=args.steps,
                            macs=rep.macs_after,
                            macs_ratio=rep.macs_after / rep.macs_before,
                            params=rep.params_after,
                            prune_s=prune_s,
                            top1_pruned=accuracy(student, xt, yt),
                            widths={c.name: [c.after, c.before] for c in rep.classes},
                        )
                        torch.manual_seed(seed)
                        row["distill_s"] = distill(student, teacher, train_set, args.steps, seed)
                        row["top1_distilled"] = accuracy(student, xt, yt)
                        rows.append(row)
                        print(
                            json.dumps(
                                {
                                    k: (round(v, 4) if isinstance(v, float) else v)
                                    for k, v in row.items()
                                    if k != "widths"
                                }
                            ),
                            flush=True,
                        )
                        save()
    if args.part5:
        part5 = state.get("part5", [])
        teacher, tinfo = teachers["vit"]
        small_macs = count_macs(SMALL_VIT())
        for seed in [int(s) for s in args.seeds.split(",")]:
            if any(r["seed"] == seed and r["steps"] == args.part5_steps for r in part5):
                continue
            torch.manual_seed(seed)
            small = SMALL_VIT()
            gen = torch.Generator().manual_seed(1000 + seed)
            cidx = torch.randperm(len(y), generator=gen)[: 32 * args.calib_batches]
            loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[cidx], y[cidx]), batch_size=32)
            pruner = IsomorphicPruner(teacher)
            for policy in ("shared", "allocate"):
                pruned = pruner.prune(
                    IsomorphicPruningConfig(target_macs=small_macs, round_to=8, seed=seed, budget_policy=policy),
                    calibration_dataset=loader,
                )
                r = dict(
                    seed=seed,
                    steps=args.part5_steps,
                    model=f"pruned teacher (iso-{policy}, taylor)",
                    macs=pruner.report.macs_after,
                    params=pruner.report.params_after,
                    top1_start=accuracy(pruned, xt, yt),
                )
                torch.manual_seed(seed)
                distill(pruned, teacher, train_set, args.part5_steps, seed)
                r["top1"] = accuracy(pruned, xt, yt)
                part5.append(r)
                print(r, flush=True)
            r = dict(
                seed=seed,
                steps=args.part5_steps,
                model="small ViT from scratch (48d, 4L, 2h)",
                macs=small_macs,
                params=sum(p.numel() for p in small.parameters()),
                top1_start=accuracy(small, xt, yt),
            )
            torch.manual_seed(seed)
            distill(small, teacher, train_set, args.part5_steps, seed, lr=2e-3)
            r["top1"] = accuracy(small, xt, yt)
            part5.append(r)
            print(r, flush=True)
            state["part5"] = part5
            save()
    save()


if __name__ == "__main__":
    main()
