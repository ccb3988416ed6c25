"""Part 2 - cost of pruning: wall time and peak memory of optimum-isoprune vs torch-pruning's MetaPruner
called directly (isomorphic=True, global_pruning=True, heads pruned), same ratio / importance / round_to.

Every measurement runs in a fresh subprocess (peak RSS = ru_maxrss of that process; "extra" = peak minus
the RSS right before pruning, i.e. after the model and calibration data exist). Runs of the two tools
alternate (ours, theirs, ours, theirs, ...) so machine load hits both alike; we report medians and ratios.

What is timed:
* ours: `IsomorphicPruner(model).prune(config, calibration_dataset=loader)` - includes the deep copy of
  the model (the original is never modified), the MACs cost model, the budget search when a target is
  given, the conversion to the pruned model class and the final MACs count.
* torch-pruning: `MetaPruner(...)` construction (graph build) + gradient accumulation (Taylor) +
  `pruner.step()` + writing the new head counts back into the attention modules.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from _common import machine, save_json

PY = sys.executable
HERE = os.path.dirname(os.path.abspath(__file__))


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def worker(spec: dict) -> dict:
    import timm
    import torch
    import torch_pruning as tp

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    torch.manual_seed(0)
    model = timm.create_model(spec["model"], pretrained=False).eval()
    k, bs = spec.get("batches", 0), 8
    g = torch.Generator().manual_seed(0)
    x = torch.randn(max(k, 1) * bs, 3, 224, 224, generator=g)
    y = torch.randint(0, 1000, (max(k, 1) * bs,), generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=bs)
    ratio = spec.get("ratio", 0.4)
    if spec["tool"] == "ours":  # importing the package (transformers, datasets, ...) is set-up, not pruning
        from optimum_isoprune import IsomorphicPruner, IsomorphicPruningConfig
    before = _rss_mb()
    out = {}
    cpu0 = _cpu()
    tick = time.perf_counter()
    if spec["tool"] == "ours":
        kwargs = dict(
            importance=spec["importance"],
            grouping="isomorphic",
            round_to=8,
            seed=0,
            num_calibration_batches=max(k, 1),
            calibration_batch_size=bs,
            budget_policy=spec.get("policy", "shared"),
        )
        if spec.get("target_fraction"):
            from optimum_isoprune import count_macs

            kwargs["target_macs"] = spec["target_fraction"] * count_macs(model)
            tick = time.perf_counter()  # the MACs count of the unpruned model is set-up, not pruning
        else:
            kwargs["pruning_ratio"] = ratio
        pruner = IsomorphicPruner(model)
        pruned = pruner.prune(
            IsomorphicPruningConfig(**kwargs), calibration_dataset=loader if spec["importance"] == "taylor" else None
        )
        out["timings"] = dict(pruner.report.timings)
        out["macs_after"] = pruner.report.macs_after
        out["macs_before"] = pruner.report.macs_before
    else:
        attention_cls = timm.models.vision_transformer.Attention
        num_heads = {m.qkv: m.num_heads for m in model.modules() if isinstance(m, attention_cls)}
        imp = (
            tp.importance.GroupTaylorImportance()
            if spec["importance"] == "taylor"
            else tp.importance.GroupMagnitudeImportance(p=2)
        )
        pruner = tp.pruner.MetaPruner(
            model,
            torch.zeros(1, 3, 224, 224),
            importance=imp,
            global_pruning=True,
            isomorphic=True,
            pruning_ratio=ratio,
            ignored_layers=[model.get_classifier()],
            num_heads=num_heads,
            prune_num_heads=bool(num_heads),
            prune_head_dims=True,
            head_pruning_ratio=ratio if num_heads else 0.0,
            round_to=8,
        )
        out["timings"] = {"graph": time.perf_counter() - tick}
        if spec["importance"] == "taylor":
            t2 = time.perf_counter()
            model.zero_grad()
            for i, (xb, yb) in enumerate(loader):
                if i >= k:
                    break
                torch.nn.functional.cross_entropy(model(xb), yb).backward()
            out["timings"]["importance"] = time.perf_counter() - t2
        t3 = time.perf_counter()
        pruner.step()
        for m in model.modules():
            if isinstance(m, attention_cls):
                m.num_heads = pruner.num_heads[m.qkv]
                m.head_dim = m.qkv.out_features // (3 * m.num_heads)
                if hasattr(m, "attn_dim"):  # timm >= 1.0.2x keeps the inner width too
                    m.attn_dim = m.num_heads * m.head_dim
        out["timings"]["step"] = time.perf_counter() - t3
        pruned = model
    out["wall_s"] = time.perf_counter() - tick
    out["cpu_s"] = _cpu() - cpu0
    with torch.no_grad():
        pruned(torch.zeros(1, 3, 224, 224))  # the pruned model must run
    out["rss_before_mb"] = before
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["params_after"] = sum(p.numel() for p in pruned.parameters())
    return out


def run(spec: dict) -> dict:
    proc = subprocess.run(
        [PY, os.path.abspath(__file__), "--worker", json.dumps(spec)], capture_output=True, text=True, cwd=HERE
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {**spec, "error": proc.stderr[-1500:]}
    result = {**spec, **json.loads(lines[-1][7:])}
    result["extra_mb"] = result["peak_rss_mb"] - result["rss_before_mb"]
    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in result.items()}), flush=True)
    return result


MODELS = {
    "vit_b16": "vit_base_patch16_224",
    "vit_l16": "vit_large_patch16_224",
    "convnext_b": "convnext_base",
    "deit_tiny": "deit_tiny_patch16_224",
}
LARGE = {"vit_l16"}  # fewer runs: only ours vs torch-pruning at the same ratio, --repeats-large times


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--models", default="vit_b16,convnext_b,vit_l16")
    p.add_argument("--repeats-large", type=int, default=1)
    p.add_argument("--taylor-batches", type=int, default=0, help="Taylor runs in the main table (0: growth only)")
    p.add_argument("--growth-model", default="deit_tiny")
    p.add_argument("--growth", default="1,2,4,8")
    p.add_argument("--only", default="main,growth")
    args = p.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    meta = machine()
    rows = []
    only = args.only.split(",")
    if "main" in only:
        for key in args.models.split(","):
            model = MODELS[key]
            specs = [
                dict(tool="ours", importance="magnitude"),
                dict(tool="tp", importance="magnitude"),
                dict(tool="ours", importance="magnitude", target_fraction=0.5, policy="shared"),
                dict(tool="ours", importance="magnitude", target_fraction=0.5, policy="allocate"),
            ]
            reps = args.repeats
            if key in LARGE:
                specs, reps = specs[:2], args.repeats_large
            if args.taylor_batches:
                specs += [
                    dict(tool="ours", importance="taylor", batches=args.taylor_batches),
                    dict(tool="tp", importance="taylor", batches=args.taylor_batches),
                ]
            for r in range(reps):
                for spec in specs:
                    rows.append(run({**spec, "model": model, "key": key, "repeat": r, "part": "main"}))
                save_json("prune_cost.json", dict(meta=meta, seed=0, rows=rows))
    if "growth" in only and args.growth:
        model = MODELS[args.growth_model]
        for k in [int(v) for v in args.growth.split(",")]:
            for tool in ("ours", "tp"):
                rows.append(
                    run(
                        dict(
                            tool=tool,
                            importance="taylor",
                            batches=k,
                            model=model,
                            key=args.growth_model,
                            repeat=0,
                            part="growth",
                        )
                    )
                )
            save_json("prune_cost.json", dict(meta=meta, seed=0, rows=rows))
    save_json("prune_cost.json", dict(meta=meta, seed=0, rows=rows))


if __name__ == "__main__":
    main()
