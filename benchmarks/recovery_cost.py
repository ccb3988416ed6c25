"""Cost of reconstruction and of the search policy at real shapes (random weights: only time and memory count here).

Each configuration runs in a fresh subprocess on timm models at 224 px with Taylor importance over the calibration
batches (default 8 of 16 random images, `--batches`; the search holds out 2 more): wall time of every pruning step
(graph, importance, budget (incl. the search), surgery, reconstruction) and peak RSS. Configurations alternate
so machine load hits them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

from _common import machine, save_json

PY = sys.executable


def worker(spec: dict) -> dict:
    import timm
    import torch

    from optimum_isoprune import IsomorphicPruner, IsomorphicPruningConfig, count_macs

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    torch.manual_seed(0)
    model = timm.create_model(spec["model"], pretrained=False).eval()
    batches = spec["batches"] + (2 if spec["policy"] == "search" else 0)
    x = torch.randn(batches * 16, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    pruner = IsomorphicPruner(model)
    config = IsomorphicPruningConfig(
        target_macs=spec["fraction"] * count_macs(model),
        reconstruction=spec["reconstruction"],
        budget_policy=spec["policy"],
        search_candidates=spec.get("candidates", 24),
        search_finalists=spec.get("finalists"),
        num_calibration_batches=spec["batches"],
        calibration_batch_size=16,
    )
    pruner.prune(config, calibration_dataset=x)
    return dict(
        spec,
        timings=pruner.report.timings,
        rss_before_mb=rss_before,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        macs_ratio=pruner.report.macs_ratio,
        reconstruction=pruner.report.reconstruction,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", default="vit_base_patch16_224")
    p.add_argument("--fraction", type=float, default=0.5)
    p.add_argument(
        "--configs",
        default="none:shared,least_squares:shared",
        help="reconstruction:policy, comma-separated; search@N sets search_finalists=N",
    )
    p.add_argument("--candidates", type=int, default=24)
    p.add_argument("--batches", type=int, default=8, help="calibration batches of 16 images (importance and refit)")
    p.add_argument("--out", default="recovery_cost.json", help="file name under benchmarks/results")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker)), default=float))
        return
    rows = []
    for model in args.models.split(","):
        for config in args.configs.split(","):
            reconstruction, policy = config.split(":")
            policy, _, finalists = policy.partition("@")
            spec = dict(
                model=model,
                fraction=args.fraction,
                reconstruction=reconstruction,
                policy=policy,
                candidates=args.candidates,
                batches=args.batches,
                finalists=int(finalists) if finalists else None,
            )
            out = subprocess.run(
                [PY, __file__, "--worker", json.dumps(spec)],
                capture_output=True,
                text=True,
                env={**os.environ, "TQDM_DISABLE": "1"},
            )
            if out.returncode:
                raise RuntimeError(out.stderr[-2000:])
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            t = row["timings"]
            print(
                f"{model} {config}: total {t['total']:.1f} s, importance {t['importance']:.1f}, budget "
                f"{t['budget']:.1f}, reconstruction {t.get('reconstruction', 0):.1f}, peak RSS "
                f"{row['peak_rss_mb']:.0f} MB",
                flush=True,
            )
    save_json(args.out, dict(meta=machine(), rows=rows))


if __name__ == "__main__":
    main()
