#!/usr/bin/env python
"""Prune timm models (`timm/<name>`: vit / deit incl. distilled, convnext, resnet), save, load back, compare.

The pruned timm model is saved in timm's Hugging Face layout plus the per-layer widths, and
`load_pruned_model` rebuilds it. `--wrapper` goes through transformers' `TimmWrapperForImageClassification`
instead (a timm model behind the transformers API).

    python examples/timm_model.py --model timm/deit_small_distilled_patch16_224.fb_in1k --target-macs 1.2G
    python examples/timm_model.py --model timm/convnext_tiny.fb_in1k --random-weights --target-macs 50%
    python examples/timm_model.py --smoke      # tiny deit (distilled), convnext and resnet, random weights
"""

from __future__ import annotations

import argparse
import tempfile

import timm
import torch

from optimum_isoprune import IsomorphicPruner, IsomorphicPruningConfig, count_macs
from optimum_isoprune.checkpoint import load_pruned_model, save_pruned_model
from optimum_isoprune.cli import parse_target

SMOKE_MODELS = {
    "timm/deit_tiny_distilled_patch16_224": dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4),
    "timm/convnext_atto": dict(dims=(16, 32, 48, 64), depths=(1, 1, 2, 1)),
    "timm/resnet18": dict(),
}


def build(name: str, random_weights: bool, wrapper: bool, **kwargs) -> torch.nn.Module:
    """A timm model by `timm/<name>`: Hub weights, or random ones; plain timm or behind TimmWrapper."""
    torch.manual_seed(0)
    if wrapper:
        from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

        if not random_weights:
            return TimmWrapperForImageClassification.from_pretrained(name).eval()
        arch = name.removeprefix("timm/").split(".")[0]
        size = kwargs.get("img_size", 224)
        config = TimmWrapperConfig(
            architecture=arch,
            num_labels=kwargs.pop("num_classes", 1000),
            model_args=kwargs,
            pretrained_cfg={"input_size": [3, size, size]},
        )
        return TimmWrapperForImageClassification(config).eval()
    if random_weights:
        return timm.create_model(name.removeprefix("timm/").split(".")[0], pretrained=False, **kwargs).eval()
    return timm.create_model(name.replace("timm/", "hf-hub:timm/", 1), pretrained=True).eval()


def prune_one(
    name: str,
    target_macs: str,
    random_weights: bool,
    wrapper: bool,
    output_dir: str | None,
    image_size: int | None = None,
    **kwargs,
) -> dict:
    model = build(name, random_weights, wrapper, **kwargs)
    value, is_share = parse_target(target_macs)
    target = value * count_macs(model, image_size=image_size) if is_share else value
    pruner = IsomorphicPruner(model, base_model_name_or_path=name)
    config = IsomorphicPruningConfig(target_macs=target, importance="magnitude", round_to=4, image_size=image_size)
    pruned = pruner.prune(config)
    with tempfile.TemporaryDirectory() as scratch:
        folder = output_dir or scratch
        save_pruned_model(pruned, folder, pruning_config=config, report=pruner.report)
        reloaded = load_pruned_model(folder)
        size = pruner.report.image_size
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            a, b = (m(pixel_values=x).logits if wrapper else m(x) for m in (pruned, reloaded))
        same = torch.allclose(a, b, atol=1e-5)
    report = pruner.report
    print(
        f"{name}: {report.macs_before / 1e6:.1f}M -> {report.macs_after / 1e6:.1f}M MACs, "
        f"{report.params_before / 1e6:.2f}M -> {report.params_after / 1e6:.2f}M params, reloaded logits equal: {same}"
    )
    return {"name": name, "report": report, "same_logits": same}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="timm/deit_small_distilled_patch16_224.fb_in1k")
    parser.add_argument("--target-macs", default="50%", help="e.g. 1.2G, or a share of the model's MACs: 50%%")
    parser.add_argument("--random-weights", action="store_true", help="random weights (offline)")
    parser.add_argument("--wrapper", action="store_true", help="load through transformers' TimmWrapper")
    parser.add_argument("--smoke", action="store_true", help="three tiny timm models, random weights, seconds")
    parser.add_argument("--output-dir", help="where to save the pruned model (default: a temporary folder)")
    args = parser.parse_args(argv)

    if args.smoke:
        results = [
            prune_one(
                name,
                args.target_macs,
                True,
                False,
                None,
                num_classes=10,
                image_size=None if "img_size" in kwargs else 64,
                **kwargs,
            )
            for name, kwargs in SMOKE_MODELS.items()
        ]
        deit = SMOKE_MODELS["timm/deit_tiny_distilled_patch16_224"]
        results.append(
            prune_one(
                "timm/deit_tiny_distilled_patch16_224", args.target_macs, True, True, None, num_classes=10, **deit
            )
        )
        return results
    return [prune_one(args.model, args.target_macs, args.random_weights, args.wrapper, args.output_dir)]


if __name__ == "__main__":
    main()
