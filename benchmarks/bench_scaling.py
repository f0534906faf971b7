#!/usr/bin/env python
"""Scaling: images/s of `training/train.py` as 1 process x 1 thread, 1 process x 2 threads, 2 processes x 1 thread
at --batch each and 2 processes x 1 thread at --batch / 2 each, beside the per-process figure; with ``--busy`` a
neighbour burns one core throughout.

Trains at the script's defaults (tiny preset, built-in digits at 16x16, batch 64 per process) for a fixed number
of steps: once as a plain process, once as two gloo ranks (``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu
--num_processes 2``), interleaved over ``--rounds``. The split-batch arm keeps the global batch at --batch (the
main job's recipe: same optimizer steps); the other two-process arm doubles it. Each rank's step time comes from
timing its DataLoader fetches (benchmarks/bench_data.py's child); total images/s = the ranks' images/s summed (the
ranks step in lock step, so each rank's batch / step time counts once per rank).

    OMP_NUM_THREADS=1 python benchmarks/bench_scaling.py --steps 40 --rounds 2 [--busy]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile

from bench_data import RESULTS, bench_env, measure, print_machine


def two_process_launch() -> list[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)]


# arm: (processes, threads per process, whether the processes split --batch between them)
ARMS = {"1 process x 1 thread": (1, 1, False), "1 process x 2 threads": (1, 2, False),
        "2 processes x 1 thread": (2, 1, False), "2 processes x 1 thread, split batch": (2, 1, True)}
BUSY_LOOP = "while True: pass"  # a neighbour that wants one core all the time


def run_arms(args: argparse.Namespace, work: str) -> dict[str, list]:
    """Each arm once per round, interleaved; returns the rank summaries of the runs that worked."""
    runs: dict[str, list] = {arm: [] for arm in ARMS}
    for round_ in range(args.rounds):
        for arm, (processes, threads, split) in ARMS.items():
            launch = [sys.executable] if processes == 1 else two_process_launch()
            env = dict(bench_env(work), ACCELERATE_USE_CPU="1", OMP_NUM_THREADS=str(threads))
            batch = args.batch // processes if split else args.batch
            ranks = measure(launch, ["--num_threads", str(threads)], args.steps, batch, work, env)
            print(f"round {round_} {arm}: {ranks}", flush=True)
            if all("error" not in r for r in ranks) and len(ranks) == processes:
                runs[arm].append(ranks)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--busy", action="store_true", help="Keep one core busy with another process meanwhile.")
    parser.add_argument("--json", default=None, help="Default: results/bench_scaling[_busy].json")
    args = parser.parse_args()
    machine = print_machine()
    machine["busy_neighbour"] = args.busy
    work = tempfile.mkdtemp(prefix="ddpm_hf-bench-scaling-")
    neighbour = subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) if args.busy else None
    try:
        runs = run_arms(args, work)
    finally:
        if neighbour is not None:
            neighbour.kill()
        shutil.rmtree(work, ignore_errors=True)
    table = {}
    for arm, results in runs.items():
        if results:
            per_process = statistics.median(r["images_per_s"] for ranks in results for r in ranks)
            total = statistics.median(sum(r["images_per_s"] for r in ranks) for ranks in results)
            processes, _, split = ARMS[arm]
            table[arm] = {"total_images_per_s": total, "per_process_images_per_s": per_process,
                          "global_batch": args.batch if split else args.batch * processes}
    base = table.get("1 process x 1 thread", {}).get("total_images_per_s", float("nan"))
    print(f"\nbusy neighbour: {args.busy}; load average at the end {os.getloadavg()}")
    print(f"{'arm':>36s} {'global batch':>12s} {'total images/s':>15s} {'per process':>12s} {'vs 1x1':>7s}")
    for arm, row in table.items():
        row["speedup"] = row["total_images_per_s"] / base
        print(f"{arm:>36s} {row['global_batch']:12d} {row['total_images_per_s']:15.0f} "
              f"{row['per_process_images_per_s']:12.0f} {row['speedup']:7.2f}")
    machine["loadavg_end"] = os.getloadavg()
    path = args.json or os.path.join(RESULTS, "bench_scaling_busy.json" if args.busy else "bench_scaling.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"machine": machine, "settings": vars(args), "table": table}, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
