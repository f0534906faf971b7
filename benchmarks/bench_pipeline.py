"""Sampling time of diffusers.DDPMPipeline vs ddpm_hf.DDPMPipeline with the same weights, seed and thread count.

    OMP_NUM_THREADS=1 python benchmarks/bench_pipeline.py [--threads 1] [--repeats 3] [--skip-1000] [--compile]

Cases: the tiny 16x16 digits net at batch 16 with 50 and 1000 DDPM steps, and the DDPM paper's CIFAR-10 net at
batch 4 with a few steps. Runs are interleaved (diffusers, ours, diffusers, ours, ...) so that load from other
processes hits both alike; each line prints both times and their ratio, then the median ratio per case. With
``--compile`` our unet is also run through ``torch.compile`` (Inductor, weight freezing) and its one-off compile
time is printed separately.
"""

from __future__ import annotations

import argparse
import statistics
import time

import diffusers
import numpy as np
import torch

import ddpm_hf
from ddpm_hf.models import UNET_PRESETS


def build(preset: str) -> tuple[diffusers.DDPMPipeline, ddpm_hf.DDPMPipeline]:
    """The stock pipeline and ours, sharing one random initialisation."""
    torch.manual_seed(0)
    stock_unet = diffusers.UNet2DModel(**UNET_PRESETS[preset]).eval()
    our_unet = ddpm_hf.UNet2DModel.from_config(stock_unet.config).eval()
    our_unet.load_state_dict(stock_unet.state_dict())
    stock = diffusers.DDPMPipeline(stock_unet, diffusers.DDPMScheduler())
    ours = ddpm_hf.DDPMPipeline(our_unet, ddpm_hf.DDPMScheduler())
    for pipe in (stock, ours):
        pipe.set_progress_bar_config(disable=True)
    return stock, ours


def sample(pipe, batch: int, steps: int) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    images = pipe(batch_size=batch, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    return time.perf_counter() - start, images


def run_case(name: str, preset: str, batch: int, steps: int, repeats: int, compile_unet: bool) -> float:
    stock, ours = build(preset)
    _, a = sample(stock, batch, 1)  # warm-up (allocator, first-call paths)
    _, b = sample(ours, batch, 1)
    print(f"{name}: batch {batch}, {steps} steps; max |stock - ours| after 1 step = {np.abs(a - b).max():.2e}")
    if compile_unet:
        # Inductor with weight freezing: on CPU it pre-packs conv weights for oneDNN and fuses conv epilogues;
        # valid here because sampling runs under inference_mode with fixed weights.
        ours.unet.compile(options={"freezing": True})
        compile_s, _ = sample(ours, batch, 1)
        print(f"  torch.compile of our unet: one-off {compile_s:.1f} s (first call, not counted below)")
    ratios = []
    for r in range(repeats):
        t_stock, a = sample(stock, batch, steps)
        t_ours, b = sample(ours, batch, steps)
        ratios.append(t_stock / t_ours)
        print(f"  run {r}: diffusers {t_stock:7.2f} s  ours {t_ours:7.2f} s  ratio {ratios[-1]:.2f}x  "
              f"(max |diff| {np.abs(a - b).max():.1e})")
    median = statistics.median(ratios)
    print(f"  median ratio diffusers/ours: {median:.2f}x")
    return median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both pipelines (default 1)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-1000", action="store_true", help="skip the 1000-step case")
    parser.add_argument("--cifar-steps", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="torch.compile our unet (one-off cost reported)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, threads {torch.get_num_threads()} "
          f"(both pipelines), dtype float32, CPU")
    cases = [("tiny 16x16", "tiny", 16, 50)]
    if not args.skip_1000:
        cases.append(("tiny 16x16", "tiny", 16, 1000))
    cases.append(("CIFAR-10 32x32", "ddpm-cifar10", 4, args.cifar_steps))
    summary = [(name, steps, run_case(name, preset, batch, steps, args.repeats, args.compile))
               for name, preset, batch, steps in cases]
    print("summary (median diffusers/ours):")
    for name, steps, ratio in summary:
        print(f"  {name}, {steps} steps: {ratio:.2f}x")


if __name__ == "__main__":
    main()
