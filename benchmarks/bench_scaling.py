#!/usr/bin/env python
"""Scaling: images/s of `training/train.py` at 1 and 2 processes on this machine, beside the per-process figure.

Trains at the script's defaults (tiny preset, built-in digits at 16x16, batch 64 per process) for a fixed number
of steps: once as a plain process, once as two gloo ranks (``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu
--num_processes 2``), interleaved over ``--rounds``. Each rank's step time comes from timing its DataLoader
fetches (benchmarks/bench_data.py's child); total images/s = the ranks' images/s summed (the ranks step in lock
step, so each rank's batch / step time counts once per rank).

    OMP_NUM_THREADS=1 python benchmarks/bench_scaling.py --steps 40 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile

from bench_data import RESULTS, bench_env, measure, print_machine


def two_process_launch() -> list[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", default=os.path.join(RESULTS, "bench_scaling.json"))
    args = parser.parse_args()
    machine = print_machine()
    work = tempfile.mkdtemp(prefix="ddpm_hf-bench-scaling-")
    runs = {1: [], 2: []}
    try:
        for round_ in range(args.rounds):
            for processes in (1, 2):
                launch = [sys.executable] if processes == 1 else two_process_launch()
                env = dict(bench_env(work), ACCELERATE_USE_CPU="1")
                ranks = measure(launch, [], args.steps, args.batch, work, env)
                print(f"round {round_} processes {processes}: {ranks}", flush=True)
                if all("error" not in r for r in ranks) and len(ranks) == processes:
                    runs[processes].append(ranks)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = {}
    for processes, results in runs.items():
        if results:
            per_process = statistics.median(r["images_per_s"] for ranks in results for r in ranks)
            total = statistics.median(sum(r["images_per_s"] for r in ranks) for ranks in results)
            table[processes] = {"total_images_per_s": total, "per_process_images_per_s": per_process}
    print(f"\n{'processes':>9s} {'total images/s':>15s} {'per process':>12s} {'speed-up':>9s}")
    for processes, row in table.items():
        speedup = row["total_images_per_s"] / table[1]["total_images_per_s"] if 1 in table else float("nan")
        row["speedup"] = speedup
        print(f"{processes:9d} {row['total_images_per_s']:15.0f} {row['per_process_images_per_s']:12.0f} "
              f"{speedup:9.2f}")
    machine["loadavg_end"] = os.getloadavg()
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"machine": machine, "settings": vars(args), "table": table}, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
