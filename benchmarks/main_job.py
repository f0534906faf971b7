#!/usr/bin/env python
"""The README's main job, measured: ``accelerate launch training/train.py`` (no flags) and then
``python -m ddpm_hf.evaluate`` on its export, from a clean checkout of the current commit.

Prints every figure the README quotes for the main job (optimizer steps, wall time of the whole command, images/s,
time to first step, FID against its real-vs-real floor with both counts, bits/dim) beside the machine (CPU model
and flags, torch threads). Nothing is timed in a test; this script is the source of those README numbers.

``--two-processes`` runs the same recipe as two gloo ranks of batch 32 (global batch 64, so the same optimizer
steps): ``ACCELERATE_USE_CPU=1 accelerate launch --config_file training/accelerate_configs/cpu_2proc.yaml
training/train.py --train_batch_size 32``.

    python benchmarks/main_job.py [--two-processes] [--keep DIR]
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def clean_checkout(where: str) -> str:
    """A worktree of HEAD (uncommitted edits excluded), so the figures belong to a commit."""
    path = os.path.join(where, "checkout")
    subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", path, "HEAD"], check=True, capture_output=True)
    return path


def run_logged(command: list[str], cwd: str, env: dict, log: str) -> tuple[float, str, str]:
    """Run ``command``; returns (wall seconds, its stdout, its stderr), which also go to ``log``."""
    start = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    with open(log, "w") as handle:
        handle.write(result.stdout + result.stderr)
    if result.returncode:
        sys.exit(f"{' '.join(command)} failed ({result.returncode}); log: {log}\n{result.stderr[-2000:]}")
    return wall, result.stdout, result.stderr


def train_command(two_processes: bool, out: str) -> tuple[list[str], dict]:
    """The main job's launch command and the environment it adds, one process or two gloo ranks of batch 32."""
    if not two_processes:
        return ["accelerate", "launch", "training/train.py", "--output_dir", out], {}
    return (["accelerate", "launch", "--config_file", "training/accelerate_configs/cpu_2proc.yaml", "training/train.py",
             "--train_batch_size", "32", "--output_dir", out], {"ACCELERATE_USE_CPU": "1"})


def training_metrics(output: str) -> dict:
    """The training script's final ``Done: {...}`` line."""
    line = next(line for line in reversed(output.splitlines()) if "ddpm_hf.train: Done: " in line)
    return ast.literal_eval(line.split("Done: ", 1)[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", default=None, help="Write the export here and keep it (default: a temp folder).")
    parser.add_argument("--two-processes", action="store_true",
                        help="Two gloo ranks of batch 32 (training/accelerate_configs/cpu_2proc.yaml) instead of one.")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="ddpm_hf-main-job-")
    checkout = clean_checkout(work)
    try:
        out = os.path.abspath(args.keep) if args.keep else os.path.join(work, "ddpm-digits")
        command, extra_env = train_command(args.two_processes, out)
        env = dict(os.environ, PYTHONPATH=os.path.join(checkout, "src"))
        from ddpm_hf.hardware import describe_hardware  # noqa: E402  (the installed package describes the machine)

        commit = subprocess.run(["git", "-C", checkout, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        print(f"machine: {describe_hardware()}")
        print(f"commit {commit}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
        print("command: " + " ".join([f"{k}={v}" for k, v in extra_env.items()] + command))
        train_wall, _, train_log = run_logged(command, checkout, dict(env, **extra_env),
                                              os.path.join(work, "train.log"))
        metrics = training_metrics(train_log)
        total_batch = next((line.split("total batch ")[1].split()[0] for line in train_log.splitlines()
                            if "total batch " in line), "?")
        threads = next((line.split("torch_threads=")[1].split()[0] for line in train_log.splitlines()
                        if "torch_threads=" in line), "?")
        eval_wall, eval_out, _ = run_logged([sys.executable, "-m", "ddpm_hf.evaluate", out], checkout, env,
                                         os.path.join(work, "evaluate.log"))
        results = json.loads(eval_out[eval_out.index("{"):eval_out.rindex("}") + 1])
    finally:
        subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", checkout], capture_output=True)
    print(f"train: {metrics['global_step']} optimizer steps, {train_wall / 60:.2f} min wall for the whole command, "
          f"{metrics['images_per_sec']:.0f} images/s, time to first step {metrics['time_to_first_step_s']:.2f} s, "
          f"torch threads {threads}, {metrics['num_processes']} process(es), total batch {total_batch}")
    print(f"evaluate ({eval_wall:.0f} s): " + json.dumps(results))
    print(f"export: {out}" + ("" if args.keep else " (temporary)"))


if __name__ == "__main__":
    main()
