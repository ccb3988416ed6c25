"""Fashion-MNIST teachers (1 channel, 28 px, 10 labels) trained to convergence, cached under benchmarks/.cache.

    python teachers.py --names resnet,convnext,deit,vit      # train what is missing, print the table

Convergence criterion (also written to each teacher's JSON): the last 5,000 training images are held out as
validation, the first 55,000 are trained on with AdamW (lr 2e-3, linear warmup over the first epoch, weight decay
0.05, batch 128, random horizontal flips, label smoothing 0.1). Validation top-1 is measured after every epoch; when
it has not improved by at least 0.1 points for 2 epochs, the learning rate is divided by 5; training stops at the
next such plateau after the second reduction, or after 30 epochs (recorded as `max_epochs_hit`). The best-validation
weights are kept, and their top-1 on the full 10,000 test images is reported.

`deit` is trained the DeiT way: its class head on the labels, its distillation head by hard distillation from the
converged `resnet` teacher's top class on the same (flipped or not) image; the loss is the mean of the two CEs.
`resnet` keeps transformers' stem (7x7 stride-2 conv + max-pool, the 4x reduction of ImageNet ResNets): its stages
run at 7, 4 and 2 px; without the max-pool (14, 7, 4 px) a step cost 2x more. `convnext` has one block per stage
(depths 2-2-2 cost 0.5 s per step on one thread); its stages run at 14, 7 and 3 px.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    ConvNextConfig,
    ConvNextForImageClassification,
    DeiTConfig,
    DeiTForImageClassificationWithTeacher,
    ResNetConfig,
    ResNetForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

from _common import CACHE
from optimum_isoprune import count_macs
from optimum_isoprune.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_fashion_mnist

VAL_SIZE = 5000
TRANSFORMER = dict(
    hidden_size=64,
    num_hidden_layers=6,
    num_attention_heads=4,
    intermediate_size=256,
    image_size=28,
    patch_size=7,
    num_channels=1,
    num_labels=10,
    attn_implementation="eager",
)
CRITERION = dict(
    validation="last 5,000 training images (trained on the first 55,000)",
    optimizer="AdamW",
    lr=2e-3,
    warmup="linear over the first epoch",
    weight_decay=0.05,
    batch_size=128,
    augmentation="random horizontal flip",
    label_smoothing=0.1,
    plateau="validation top-1 not improved by >= 0.1 points for 2 epochs",
    on_plateau="lr /= 5, at most twice; the next plateau stops training",
    max_epochs=30,
    weights="best validation top-1",
)


BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "resnet": lambda: ResNetForImageClassification(
        ResNetConfig(
            num_channels=1,
            embedding_size=32,
            hidden_sizes=[32, 64, 128],
            depths=[1, 1, 1],
            layer_type="basic",
            image_size=28,
            num_labels=10,
        )
    ),
    "convnext": lambda: ConvNextForImageClassification(
        ConvNextConfig(
            num_channels=1,
            patch_size=2,
            hidden_sizes=[32, 64, 128],
            depths=[1, 1, 1],
            num_stages=3,
            image_size=28,
            num_labels=10,
        )
    ),
    "vit": lambda: ViTForImageClassification(ViTConfig(**TRANSFORMER)),
    "deit": lambda: DeiTForImageClassificationWithTeacher(DeiTConfig(**TRANSFORMER)),
}
DISTILLED_FROM = {"deit": "resnet"}


@functools.cache
def tensors(split: str, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised images (N, 1, 28, 28) and labels of a Fashion-MNIST split (cached: do not modify them)."""
    ds = load_fashion_mnist(split, limit=limit)
    images = np.stack([np.asarray(im, dtype=np.float32) for im in ds["image"]]) / 255.0
    x = (torch.from_numpy(images)[:, None] - FASHION_MNIST_MEAN[0]) / FASHION_MNIST_STD[0]
    return x.contiguous(), torch.tensor(ds["label"], dtype=torch.long)


def train_val() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 55,000 training and the 5,000 validation images (the last ones of the train split), with labels."""
    x, y = tensors("train")
    return x[:-VAL_SIZE], y[:-VAL_SIZE], x[-VAL_SIZE:], y[-VAL_SIZE:]


@torch.inference_mode()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Logits of `model` in eval mode (a DeiT with teacher: the mean of both heads); restores the previous mode."""
    was_training = model.training
    model.eval()
    out = torch.cat([model(pixel_values=xb).logits for xb in x.split(batch_size)])
    model.train(was_training)
    return out


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in [0, 1]."""
    return float((predict(model, x).argmax(-1) == y).float().mean())


def _paths(name: str, cache_dir: Path) -> tuple[Path, Path]:
    return cache_dir / f"teacher_{name}.safetensors", cache_dir / f"teacher_{name}.json"


def train(
    name: str,
    cache_dir: Path = CACHE,
    seed: int = 0,
    max_epochs: int = 30,
    train_limit: int | None = None,
    log: Callable[[str], None] = print,
) -> tuple[nn.Module, dict]:
    """Train teacher `name` to convergence (module docstring), save it to `cache_dir`, return (model.eval(), info)."""
    xtr, ytr, xval, yval = train_val()
    if train_limit is not None:
        xtr, ytr = xtr[:train_limit], ytr[:train_limit]
    hard = None
    if name in DISTILLED_FROM:  # the teacher's top class on every training image, unflipped and flipped
        teacher, _ = load_teacher(
            DISTILLED_FROM[name], cache_dir, seed=seed, max_epochs=max_epochs, train_limit=train_limit, log=log
        )
        hard = torch.stack([predict(teacher, xtr).argmax(-1), predict(teacher, xtr.flip(-1)).argmax(-1)], 1)
    torch.manual_seed(seed)
    model = BUILDERS[name]()
    opt = torch.optim.AdamW(model.parameters(), lr=CRITERION["lr"], weight_decay=CRITERION["weight_decay"])
    g = torch.Generator().manual_seed(seed)
    bs = CRITERION["batch_size"]
    steps_per_epoch = math.ceil(len(ytr) / bs)
    lr, reductions, stale, best, best_state = CRITERION["lr"], 0, 0, -1.0, None
    history: list[float] = []
    step, start, max_hit = 0, time.perf_counter(), True
    for epoch in range(max_epochs):
        model.train()
        for idx in torch.randperm(len(ytr), generator=g).split(bs):
            flip = torch.rand(len(idx), generator=g) < 0.5
            xb = torch.where(flip[:, None, None, None], xtr[idx].flip(-1), xtr[idx])
            for group in opt.param_groups:
                group["lr"] = lr * min(1.0, (step + 1) / steps_per_epoch)
            out = model(pixel_values=xb)
            if hard is None:
                loss = F.cross_entropy(out.logits, ytr[idx], label_smoothing=CRITERION["label_smoothing"])
            else:
                loss = (
                    F.cross_entropy(out.cls_logits, ytr[idx], label_smoothing=CRITERION["label_smoothing"])
                    + F.cross_entropy(out.distillation_logits, hard[idx, flip.long()])
                ) / 2
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
        top1 = accuracy(model, xval, yval)
        history.append(top1)
        if top1 > best:
            best_state = copy.deepcopy(model.state_dict())
        if top1 >= best + 0.001:
            stale = 0
        else:
            stale += 1
        best = max(best, top1)
        log(
            f"{name} epoch {epoch + 1}: val {top1:.4f} (best {best:.4f}), lr {lr:.1e}, loss {loss.item():.3f}, "
            f"{time.perf_counter() - start:.0f} s"
        )
        if stale >= 2:
            if reductions == 2:
                max_hit = False
                break
            lr, reductions, stale = lr / 5, reductions + 1, 0
    seconds = time.perf_counter() - start
    model.load_state_dict(best_state)
    model.eval()
    xt, yt = tensors("test")
    info = dict(
        name=name,
        epochs=len(history),
        steps=step,
        seconds=seconds,
        max_epochs_hit=max_hit,
        val_top1_history=history,
        val_top1=best,
        test_top1=accuracy(model, xt, yt),
        macs=count_macs(model),
        params=sum(p.numel() for p in model.parameters()),
        seed=seed,
        criterion=dict(CRITERION, max_epochs=max_epochs, train_images=len(ytr)),
        distilled_from=DISTILLED_FROM.get(name),
        torch_threads=torch.get_num_threads(),
    )
    weights, meta = _paths(name, cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    meta.write_text(json.dumps(info, indent=1) + "\n")
    log(f"{name}: {json.dumps({k: v for k, v in info.items() if k not in ('criterion', 'val_top1_history')})}")
    return model, info


def load_teacher(name: str, cache_dir: Path = CACHE, **train_kwargs) -> tuple[nn.Module, dict]:
    """(model.eval(), info) of teacher `name` from `cache_dir`, trained first (see `train`) when missing."""
    if name not in BUILDERS:
        raise ValueError(f"Unknown teacher {name!r}; expected one of {sorted(BUILDERS)}.")
    weights, meta = _paths(name, Path(cache_dir))
    if not weights.exists():
        return train(name, Path(cache_dir), **train_kwargs)
    model = BUILDERS[name]()
    model.load_state_dict(load_file(str(weights)))
    return model.eval(), json.loads(meta.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--names", default="resnet,convnext,deit,vit")
    p.add_argument("--cache-dir", type=Path, default=CACHE)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-epochs", type=int, default=30)
    p.add_argument("--train-limit", type=int, default=None, help="train on the first N images only (quick tests)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    log = lambda s: print(s, flush=True)  # noqa: E731
    infos = [
        load_teacher(
            name, args.cache_dir, seed=args.seed, max_epochs=args.max_epochs, train_limit=args.train_limit, log=log
        )[1]
        for name in args.names.split(",")
    ]
    print("| teacher | MACs (M) | params (K) | epochs | max epochs hit | val top-1 | test top-1 | train s |")
    print("|---|---|---|---|---|---|---|---|")
    for i in infos:
        print(
            f"| {i['name']} | {i['macs'] / 1e6:.2f} | {i['params'] / 1e3:.1f} | {i['epochs']} | "
            f"{i['max_epochs_hit']} | {100 * i['val_top1']:.2f} | {100 * i['test_top1']:.2f} | {i['seconds']:.0f} |"
        )


if __name__ == "__main__":
    main()
