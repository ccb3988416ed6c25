"""Startup time of the console script against `python -c "import torch"`, measured side by side.

Each round runs every command once in a fresh interpreter (round-robin, so a load spike from other
users of the machine hits all commands of a round alike); the reported time is the median over the
rounds. The goal of issue #21: `optimum-isoprune --help` under 1.5x the time of importing torch.

    python benchmarks/startup.py --rounds 7
    python benchmarks/startup.py --source /path/to/another/checkout   # the same numbers for other code
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

COMMANDS = {
    "import torch": ["-c", "import torch"],
    "optimum-isoprune --help": ["-m", "optimum_isoprune", "--help"],
    "optimum-isoprune prune --help": ["-m", "optimum_isoprune", "prune", "--help"],
    "import optimum_isoprune": ["-c", "import optimum_isoprune"],
    "from optimum_isoprune import IsomorphicPruner": ["-c", "from optimum_isoprune import IsomorphicPruner"],
}


def run_once(python: str, args: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run([python, *args], env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7, help="fresh interpreters per command (default: 7)")
    parser.add_argument("--python", default=sys.executable, help="interpreter to time (default: this one)")
    parser.add_argument("--source", help="checkout whose optimum_isoprune is imported (default: the installed one)")
    args = parser.parse_args()

    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    if args.source:
        env["PYTHONPATH"] = os.pathsep.join([str(Path(args.source).resolve()), env.get("PYTHONPATH", "")])
    for command in COMMANDS.values():  # warm the file cache once, untimed
        run_once(args.python, command, env)
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.rounds):
        for name, command in COMMANDS.items():
            times[name].append(run_once(args.python, command, env))

    torch_s = statistics.median(times["import torch"])
    print(f"median of {args.rounds} fresh interpreters, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    print(f"{'command':48}{'median s':>10}{'min s':>8}{'vs torch':>10}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:48}{median:10.2f}{min(values):8.2f}{median / torch_s:9.2f}x")
    ratio = statistics.median(times["optimum-isoprune --help"]) / torch_s
    print(f"optimum-isoprune --help / import torch = {ratio:.2f} (goal: under 1.5)")


if __name__ == "__main__":
    main()
