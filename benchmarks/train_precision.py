#!/usr/bin/env python
"""bf16 autocast training against fp32: loss curve and digits FID, with the fp32 seed-to-seed noise as yardstick.

    OMP_NUM_THREADS=1 python benchmarks/train_precision.py [--max_train_steps N] [--work DIR]

Trains the README main job (``accelerate launch training/train.py``: the default digits recipe, no flags besides
output folder, seed, steps and ``--num_threads 1``) three times, one after the other: fp32 seed A, fp32 seed B
(the seed-to-seed noise) and bf16 seed A (``--mixed_precision bf16``: autocast, fp32 master weights). Default
length: the main job's full 1,056 steps; ``--max_train_steps`` shortens all three alike.

Loss: each export's ``loss_history.csv`` (the mean loss of every 10-step logging window), averaged over windows of
``--window`` steps; the table sets |bf16 - fp32 A| beside |fp32 B - fp32 A|, and ``<prefix>.png`` draws the three
curves. FID: ``--num-samples`` digits from each export, drawn in fp32 (only the training precision differs) with
the same sampler and seed (``time_to_quality.py``'s ``draw``, seed 0), scored by ``time_to_quality.py``'s digits
FID against the 450 held-out test digits the runs never trained on, beside the real-vs-real floor band
(``--floor-repeats`` draws of as many train digits). Verdict: bf16 counts as within noise when its mean window loss
difference is at most the seed-to-seed one and its FID difference is at most max(seed-to-seed FID difference,
floor band spread). The runs train a clean worktree of HEAD (as ``main_job.py`` does), one after the other, not
interleaved: wall-time ratios are indicative only. An existing finished run in ``--work`` is reused (its recorded
wall time is printed). Writes ``<prefix>.json`` and ``.png``.
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
from pathlib import Path

import diffusers
import torch

import ddpm_hf
from ddpm_hf.hardware import describe_hardware
from ddpm_hf.training.loss_history import read_history
from time_to_quality import build_quality, draw, our_scheduler

ROOT = Path(__file__).resolve().parent.parent
MAIN_JOB_STEPS = 1056  # 48 epochs of the 1,347 training digits at batch 64: the README main job


def clean_checkout(work: Path) -> Path:
    """A worktree of HEAD in ``work`` (uncommitted edits excluded): the three runs train the same committed code."""
    path = work / "checkout"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), "HEAD"], check=True,
                   capture_output=True)
    return path


def train(checkout: Path, name: str, out: Path, seed: int, precision: str, steps: int | None) -> dict:
    """Run the main job from ``checkout`` into ``out`` (or reuse a finished run there); returns its record.

    Args:
        checkout: the clean checkout to train from.
        name: the run's label.
        out: its output folder.
        seed: ``--seed``.
        precision: ``no`` (fp32) or ``bf16``.
        steps: ``--max_train_steps``, or None for the main job's length.

    Returns:
        ``name, seed, precision, wall_s, images_per_sec, global_step, log_line`` (the run's device line).
    """
    record_path = out / "train_precision_run.json"
    if record_path.is_file():
        return json.loads(record_path.read_text()) | {"reused": True}
    command = ["accelerate", "launch", "--num_processes", "1", "training/train.py", "--output_dir", str(out),
               "--seed", str(seed), "--num_threads", "1", "--mixed_precision", precision]
    if steps is not None:
        command += ["--max_train_steps", str(steps)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(checkout / "src"))
    print(f"training {name}: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    result = subprocess.run(command, cwd=checkout, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    (out.parent / f"{name}.log").write_text(result.stdout + result.stderr)
    if result.returncode:
        sys.exit(f"{name} failed ({result.returncode}):\n{result.stderr[-2000:]}")
    lines = (result.stdout + result.stderr).splitlines()
    done = next(line for line in reversed(lines) if "ddpm_hf.train: Done: " in line)
    metrics = ast.literal_eval(done.split("Done: ", 1)[1])
    device_line = next((line.split("INFO")[-1].strip(" -:") for line in lines if "torch_threads=" in line), "?")
    record = {"name": name, "seed": seed, "precision": precision, "wall_s": wall,
              "images_per_sec": metrics["images_per_sec"], "global_step": metrics["global_step"],
              "log_line": device_line}
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return record


def window_means(history: list[tuple[int, float]], window: int) -> dict[int, float]:
    """Mean of the logged losses whose step lies in (k * window, (k + 1) * window], keyed by the window's end."""
    sums: dict[int, list[float]] = {}
    for step, loss in history:
        sums.setdefault(-(-step // window) * window, []).append(loss)
    return {end: sum(values) / len(values) for end, values in sorted(sums.items())}


def loss_table(curves: dict[str, dict[int, float]]) -> tuple[list[str], float, float]:
    """The printed table and the mean |bf16 - fp32 A| and |fp32 B - fp32 A| over the windows."""
    a, b, h = curves["fp32 A"], curves["fp32 B"], curves["bf16 A"]
    rows = [f"{'steps up to':>11} {'fp32 A':>9} {'fp32 B':>9} {'bf16 A':>9} {'|B - A|':>9} {'|bf16 - A|':>10}"]
    ends = sorted(set(a) & set(b) & set(h))
    for end in ends:
        rows.append(f"{end:>11} {a[end]:9.5f} {b[end]:9.5f} {h[end]:9.5f} {abs(b[end] - a[end]):9.5f} "
                    f"{abs(h[end] - a[end]):10.5f}")
    seed = sum(abs(b[e] - a[e]) for e in ends) / len(ends)
    bf16 = sum(abs(h[e] - a[e]) for e in ends) / len(ends)
    rows.append(f"{'mean':>11} {'':9} {'':9} {'':9} {seed:9.5f} {bf16:10.5f}")
    return rows, seed, bf16


def plot(histories: dict[str, list[tuple[int, float]]], path: Path, smooth: int) -> None:
    """The three loss curves, each a running mean over ``smooth`` logged points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, history in histories.items():
        steps, losses = [s for s, _ in history], [v for _, v in history]
        smoothed = [sum(losses[max(0, i - smooth + 1):i + 1]) / len(losses[max(0, i - smooth + 1):i + 1])
                    for i in range(len(losses))]
        ax.plot(steps, smoothed, label=name, linestyle="--" if name.startswith("bf16") else "-")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"training loss (running mean of {smooth} logged points)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("digits main job: fp32 (seeds A, B) vs bf16 autocast (seed A)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def fids(exports: dict[str, Path], sampler: str, num_samples: int, floor_repeats: int) -> tuple[dict, tuple]:
    """Digits FID of each export's fp32 samples (same sampler and noise) and the real-vs-real floor band."""
    name, steps = sampler.split(":")
    quality = None
    scores = {}
    for label, export in exports.items():
        pipe = ddpm_hf.DDPMPipeline.from_pretrained(str(export))  # fp32, the default
        pipe.set_progress_bar_config(disable=True)
        if quality is None:
            config = pipe.unet.config
            quality = build_quality(config.sample_size, config.in_channels, num_samples, floor_repeats)
        images, cpu, _ = draw(pipe, our_scheduler(name, pipe.scheduler.config), int(steps), num_samples)
        scores[label] = quality.fid(images)
        print(f"  FID {label}: {scores[label]:.2f} ({num_samples} samples, {name} {steps} steps, fp32, "
              f"{cpu:.1f} CPU-s)", flush=True)
    return scores, quality.band


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max_train_steps", type=int, default=None, help="Default: the main job's 1,056 steps.")
    parser.add_argument("--seeds", type=int, nargs=2, default=(0, 1), metavar=("A", "B"))
    parser.add_argument("--window", type=int, default=100, help="Steps per loss-table window.")
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--floor-repeats", type=int, default=20)
    parser.add_argument("--sampler", default="DPMSolverMultistep:6", help="NAME:STEPS as in bf16_quality.py.")
    parser.add_argument("--work", default=None, help="Folder of the three runs (kept; default: a temp folder).")
    parser.add_argument("--prefix", default="benchmarks/results/train_precision")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(args.work or tempfile.mkdtemp(prefix="ddpm_hf-train-precision-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    checkout = clean_checkout(work)
    commit = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    print(f"machine: {describe_hardware().summary()}")
    print(f"commit {commit}, torch {torch.__version__}, diffusers {diffusers.__version__}, load average "
          f"{os.getloadavg()[0]:.2f} (other jobs share this machine); {args.max_train_steps or MAIN_JOB_STEPS} "
          f"steps per run{' (shortened from the main job 1,056)' if args.max_train_steps else ''}")
    plan = {"fp32 A": (args.seeds[0], "no"), "fp32 B": (args.seeds[1], "no"), "bf16 A": (args.seeds[0], "bf16")}
    try:
        runs = {name: train(checkout, name.replace(" ", "_"), work / name.replace(" ", "_"), seed, precision,
                            args.max_train_steps) for name, (seed, precision) in plan.items()}
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(checkout)], capture_output=True)
    print("runs (sequential, not interleaved: the wall-time ratios are indicative only):")
    for name, run in runs.items():
        dtype = "bf16 autocast, fp32 master weights" if run["precision"] == "bf16" else "fp32"
        print(f"  {name}: seed {run['seed']}, {dtype}, {run['global_step']} steps, {run['wall_s'] / 60:.2f} min "
              f"wall, {run['images_per_sec']:.1f} images/s{' (reused)' if run.get('reused') else ''}; "
              f"{run['log_line']}")
    histories = {name: read_history(str(work / name.replace(" ", "_"))) for name in plan}
    curves = {name: window_means(history, args.window) for name, history in histories.items()}
    rows, seed_loss, bf16_loss = loss_table(curves)
    print(f"mean training loss per {args.window}-step window:")
    print("\n".join(rows))
    plot(histories, Path(f"{args.prefix}.png"), smooth=10)
    print(f"digits FID against the 450 held-out test digits (floor band: {args.floor_repeats} draws of "
          f"{args.num_samples} train digits):")
    scores, band = fids({name: work / name.replace(" ", "_") for name in plan}, args.sampler, args.num_samples,
                        args.floor_repeats)
    seed_fid, bf16_fid = abs(scores["fp32 B"] - scores["fp32 A"]), abs(scores["bf16 A"] - scores["fp32 A"])
    fid_noise = max(seed_fid, band[1] - band[0])
    print(f"  floor band {band[0]:.2f}-{band[1]:.2f} (spread {band[1] - band[0]:.2f}); |FID B - A| {seed_fid:.2f}, "
          f"|FID bf16 - A| {bf16_fid:.2f}")
    loss_ok, fid_ok = bf16_loss <= seed_loss, bf16_fid <= fid_noise
    print(f"verdict: bf16 loss curve {'WITHIN' if loss_ok else 'OUTSIDE'} the fp32 seed-to-seed noise "
          f"(mean window |bf16 - A| {bf16_loss:.5f} vs |B - A| {seed_loss:.5f}); bf16 FID "
          f"{'WITHIN' if fid_ok else 'OUTSIDE'} the noise (|bf16 - A| {bf16_fid:.2f} vs max(|B - A|, band spread) "
          f"{fid_noise:.2f})")
    result = {"machine": describe_hardware().summary(), "commit": commit, "runs": runs, "window": args.window,
              "loss_windows": curves, "mean_window_diff": {"seed": seed_loss, "bf16": bf16_loss},
              "fid": scores, "floor_band": band, "sampler": args.sampler, "num_samples": args.num_samples,
              "loss_within_noise": loss_ok, "fid_within_noise": fid_ok}
    Path(f"{args.prefix}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
