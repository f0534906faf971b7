#!/usr/bin/env python
"""Training throughput: `training/train.py` vs a reference loop built from diffusers' own pieces.

The reference follows diffusers' ``train_unconditional.py`` semantics: ``diffusers.UNet2DModel`` +
``DDPMScheduler.add_noise`` + AdamW + ``diffusers.training_utils.EMAModel`` (warmup, power 3/4), an LR
schedule stepped per batch, noise drawn then moved, MSE on eps. Both get the same network config (the tiny
preset), batch, data (the built-in digits tensor), thread count and dtype, and run as separate processes,
interleaved, so the shared machine's load hits both alike.

    OMP_NUM_THREADS=1 python benchmarks/bench_training.py --rounds 3 --steps 60

Prints images/s after warm-up, time to first step (from process start, imports included) and peak RSS for
each run, and the median ratio ours / reference.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import runpy
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_SCRIPT = os.path.join(ROOT, "training", "train.py")
WARMUP_STEPS = 5


def reference_train(steps: int, batch_size: int, resolution: int = 16, seed: int = 0, lr: float = 1e-4,
                    warmup: int = 500, device: str = "cpu", on_first_step=None):
    """The example's loop on the digits; returns (unet, ema_model, images/s after warm-up).

    Hyperparameters default to the example's: lr 1e-4, cosine with 500 warmup steps counted in batches,
    AdamW betas (0.95, 0.999), weight decay 1e-6, grad clip 1, EMAModel(0.9999, warmup, inv_gamma 1, power 3/4).
    """
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from ddpm_hf.data import load_digits_tensor
    from ddpm_hf.training import MODEL_PRESETS

    torch.manual_seed(seed)
    images = load_digits_tensor(resolution)
    loader = torch.utils.data.DataLoader(images, batch_size=batch_size, shuffle=True, drop_last=False)
    config = dict(MODEL_PRESETS["tiny"], sample_size=resolution, in_channels=1, out_channels=1)
    model = UNet2DModel(**config).to(device)
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    lr_scheduler = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=warmup, num_training_steps=steps)
    ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75,
                   model_cls=UNet2DModel, model_config=model.config)
    step, warm_start = 0, None
    model.train()
    while step < steps:
        for clean in loader:
            clean = clean.to(device)
            noise = torch.randn(clean.shape, dtype=clean.dtype).to(device)
            timesteps = torch.randint(0, 1000, (clean.shape[0],), device=device).long()
            noisy = noise_scheduler.add_noise(clean, noise, timesteps)
            loss = F.mse_loss(model(noisy, timesteps).sample.float(), noise.float())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
            ema.step(model.parameters())
            step += 1
            if step == 1 and on_first_step is not None:
                on_first_step()
            if step == WARMUP_STEPS:
                warm_start = time.perf_counter()
            if step >= steps:
                break
    rate = (steps - WARMUP_STEPS) * batch_size / (time.perf_counter() - warm_start)
    return model, ema, rate


def worker(kind: str, steps: int, batch_size: int, threads: int, t0: float) -> dict:
    """Run one side in this process; ``t0`` is the parent's clock at spawn (for time to first step)."""
    import torch

    torch.set_num_threads(threads)
    result: dict = {"kind": kind}
    if kind == "reference":
        first = {}
        _, _, rate = reference_train(steps, batch_size, on_first_step=lambda: first.setdefault("t", time.time()))
        result.update(images_per_sec=rate, time_to_first_step_s=first["t"] - t0)
    else:
        train_main = runpy.run_path(TRAIN_SCRIPT, run_name="train_recipe")["main"]  # imports the training stack

        imports_done = time.time()
        with tempfile.TemporaryDirectory() as out:
            metrics = train_main(["--output_dir", out, "--max_train_steps", str(steps), "--train_batch_size",
                                  str(batch_size), "--num_threads", str(threads), "--logger", "none",
                                  "--checkpointing_steps", str(steps + 1), "--eval_batch_size", "4",
                                  "--ddpm_num_inference_steps", "2"])
        result.update(images_per_sec=metrics["images_per_sec"],
                      time_to_first_step_s=imports_done - t0 + metrics["time_to_first_step_s"])
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", choices=["ours", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--t0", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.batch_size, args.threads, args.t0)))
        return

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=os.path.join(ROOT, "src"))
    print(f"torch threads per process: {args.threads}; batch {args.batch_size}; {args.steps} steps "
          f"({WARMUP_STEPS} warm-up); tiny preset, 16x16 digits, fp32, CPU")
    results: dict = {"ours": [], "reference": []}
    for round_index in range(args.rounds):
        for kind in ("reference", "ours") if round_index % 2 else ("ours", "reference"):
            command = [sys.executable, __file__, "--worker", kind, "--steps", str(args.steps), "--batch_size",
                       str(args.batch_size), "--threads", str(args.threads), "--t0", str(time.time())]
            out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            results[kind].append(row)
            print(f"round {round_index} {kind:9s}: {row['images_per_sec']:7.1f} img/s, first step "
                  f"{row['time_to_first_step_s']:5.1f} s, peak RSS {row['peak_rss_mb']:6.0f} MB", flush=True)
    med = {k: {m: statistics.median(r[m] for r in rows) for m in ("images_per_sec", "time_to_first_step_s",
                                                                    "peak_rss_mb")} for k, rows in results.items()}
    for kind, values in med.items():
        print(f"median {kind:9s}: {values['images_per_sec']:7.1f} img/s, first step "
              f"{values['time_to_first_step_s']:5.1f} s, peak RSS {values['peak_rss_mb']:6.0f} MB")
    ratios = [o["images_per_sec"] / r["images_per_sec"] for o, r in zip(results["ours"], results["reference"])]
    print(f"images/s ratio ours/reference per round: {[round(x, 2) for x in ratios]}; "
          f"median {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
