#!/usr/bin/env python
"""Prune a transformers ConvNeXt (or ConvNeXtV2) to a MACs target, save it, load it back, check the logits.

# Hub weights, Taylor importance from an imagefolder (one sub-folder per class):
python examples/convnext.py --model facebook/convnext-tiny-224 --target-macs 2.2G --calibration-dataset ./images
# offline, random ConvNeXt-T weights, half the MACs:
python examples/convnext.py --random-weights --target-macs 50%
# tiny ConvNeXt, seconds:
python examples/convnext.py --smoke
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import (
    ConvNextConfig,
    ConvNextForImageClassification,
    ConvNextV2Config,
    ConvNextV2ForImageClassification,
)

from optimum_isoprune import IsomorphicPruner, IsomorphicPruningConfig, count_macs
from optimum_isoprune.checkpoint import load_pruned_model, save_pruned_model
from optimum_isoprune.cli import parse_target
from optimum_isoprune.data import load_image_dataset, prepare_dataset


def random_convnext(v2: bool, smoke: bool) -> torch.nn.Module:
    """ConvNeXt-T shapes (or a tiny two-stage one) with random weights."""
    kwargs = (
        dict(hidden_sizes=[32, 64], depths=[2, 2], num_stages=2, image_size=32, num_labels=10)
        if smoke
        else dict(hidden_sizes=[96, 192, 384, 768], depths=[3, 3, 9, 3], image_size=224, num_labels=1000)
    )
    config_class, model_class = (
        (ConvNextV2Config, ConvNextV2ForImageClassification) if v2 else (ConvNextConfig, ConvNextForImageClassification)
    )
    torch.manual_seed(0)
    return model_class(config_class(**kwargs)).eval()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="facebook/convnext-tiny-224", help="Hub id or local folder")
    parser.add_argument("--random-weights", action="store_true", help="ConvNeXt-T shapes, random weights (offline)")
    parser.add_argument("--v2", action="store_true", help="ConvNeXtV2 instead of ConvNeXt (with --random-weights)")
    parser.add_argument("--smoke", action="store_true", help="tiny random ConvNeXt, seconds")
    parser.add_argument("--target-macs", default="50%", help="e.g. 2.2G, or a share of the model's MACs: 50%%")
    parser.add_argument("--calibration-dataset", help="Hub dataset id or imagefolder dir (Taylor importance)")
    parser.add_argument("--output-dir", help="where to save the pruned model (default: a temporary folder)")
    args = parser.parse_args(argv)

    if args.smoke or args.random_weights:
        model = random_convnext(args.v2, args.smoke)
        pruner = IsomorphicPruner(model, base_model_name_or_path=None if args.smoke else args.model)
    else:
        pruner = IsomorphicPruner.from_pretrained(args.model)
        model = pruner.model
    value, is_share = parse_target(args.target_macs)
    target = value * count_macs(model) if is_share else value

    calibration = None
    if args.calibration_dataset:
        data = load_image_dataset(args.calibration_dataset, split="train").select(range(512))
        calibration = prepare_dataset(data, model=model)
    config = IsomorphicPruningConfig(target_macs=target, importance="taylor" if calibration else "magnitude")
    pruned = pruner.prune(config, calibration_dataset=calibration)
    print(pruner.report.summary())

    with tempfile.TemporaryDirectory() as scratch:
        folder = args.output_dir or scratch
        save_pruned_model(pruned, folder, pruning_config=config, report=pruner.report)
        reloaded = load_pruned_model(folder)
        size = pruner.report.image_size
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            same = torch.allclose(pruned(pixel_values=x).logits, reloaded(pixel_values=x).logits, atol=1e-5)
        print(f"Saved to {folder}; reloaded {type(reloaded).__name__}, same logits: {same}")
    return {"report": pruner.report, "same_logits": same, "model": type(reloaded).__name__}


if __name__ == "__main__":
    main()
