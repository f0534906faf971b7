"""Sampling time of diffusers.DDPMPipeline vs ddpm_hf.DDPMPipeline with the same weights, seed and thread count.

    OMP_NUM_THREADS=1 python benchmarks/bench_pipeline.py [--threads 1] [--repeats 3] [--with-1000] [--compile]

Cases: the tiny 16x16 digits net at batch 16 with 50 DDPM steps (and 1000 with ``--with-1000``), and the DDPM
paper's CIFAR-10 net at batch 4 with a few steps. Four arms per case, interleaved (each round runs all four, so
load from other processes hits them alike): diffusers' default (fp32, eager), diffusers with its unet in bf16,
ours in fp32 and ours on the fast path (bf16 network with fp32 sampler maths where this CPU has native bf16,
weight prepacking). Times are CPU seconds of the process (``time.process_time``). Each round prints every
arm's time; the summary gives the median per-round ratios: the fast path
against diffusers' default, and each dtype against the other library at the same dtype. With ``--compile``
our fast-path unet also goes through ``torch.compile`` (``DDPMPipeline.compile_unet``: Inductor, weight
freezing) and its one-off compile time is printed apart.
"""

from __future__ import annotations

import argparse
import statistics
import time

import diffusers
import numpy as np
import torch

import ddpm_hf
from ddpm_hf.fast_path import cpu_bf16_native
from ddpm_hf.hardware import describe_hardware
from ddpm_hf.models import UNET_PRESETS


def build(preset: str) -> dict[str, diffusers.DiffusionPipeline]:
    """The four arms, sharing one random initialisation."""
    torch.manual_seed(0)
    stock_unet = diffusers.UNet2DModel(**UNET_PRESETS[preset]).eval()
    pipes = {"diffusers fp32": diffusers.DDPMPipeline(stock_unet, diffusers.DDPMScheduler())}
    stock_bf16 = diffusers.UNet2DModel.from_config(stock_unet.config).eval()
    stock_bf16.load_state_dict(stock_unet.state_dict())
    pipes["diffusers bf16"] = diffusers.DDPMPipeline(stock_bf16.to(torch.bfloat16), diffusers.DDPMScheduler())
    fast_dtype = torch.bfloat16 if cpu_bf16_native() else torch.float32
    for name, dtype in (("ours fp32", torch.float32), ("ours fast", fast_dtype)):
        unet = ddpm_hf.UNet2DModel.from_config(stock_unet.config).eval()
        unet.load_state_dict(stock_unet.state_dict())
        unet.enable_weight_prepacking()
        pipes[name] = ddpm_hf.DDPMPipeline(unet.to(dtype), ddpm_hf.DDPMScheduler())
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    return pipes


def sample(pipe, batch: int, steps: int) -> tuple[float, np.ndarray]:
    # output_type="pt": diffusers' DDPMPipeline with a bf16 unet fails on CPU for "np"/"pil" (numpy has no bf16)
    # CPU seconds of this process (1 thread): time spent waiting for a core taken by other jobs is not counted.
    start = time.process_time()
    images = pipe(batch_size=batch, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                  output_type="pt").images
    return time.process_time() - start, images.float().numpy()


def run_case(name: str, preset: str, batch: int, steps: int, repeats: int, compile_unet: bool) -> dict[str, float]:
    pipes = build(preset)
    warm = {arm: sample(pipe, batch, 1)[1] for arm, pipe in pipes.items()}  # allocator, first-call paths, packs
    print(f"{name}: batch {batch}, {steps} steps; max |diffusers fp32 - arm| after 1 step: "
          + ", ".join(f"{arm} {np.abs(warm['diffusers fp32'] - x).max():.1e}" for arm, x in warm.items()))
    if compile_unet:
        seconds = pipes["ours fast"].compile_unet(batch)
        print(f"  torch.compile of our fast-path unet: one-off {seconds:.1f} s (not counted below)")
    times: dict[str, list[float]] = {arm: [] for arm in pipes}
    for r in range(repeats):
        for arm, pipe in pipes.items():
            times[arm].append(sample(pipe, batch, steps)[0])
        print(f"  round {r}: " + "  ".join(f"{arm} {t[-1]:7.2f} CPU-s" for arm, t in times.items()), flush=True)
    median = {arm: statistics.median(t) for arm, t in times.items()}
    pairs = {"fast path vs diffusers default": ("diffusers fp32", "ours fast"),
             "fp32 vs fp32": ("diffusers fp32", "ours fp32"), "bf16 vs bf16": ("diffusers bf16", "ours fast")}
    # median of the per-round ratios: each pair ran back to back, so a load spike mostly cancels within a round
    ratios = {k: statistics.median(a / b for a, b in zip(times[x], times[y])) for k, (x, y) in pairs.items()}
    print("  medians: " + ", ".join(f"{arm} {t:.2f} CPU-s" for arm, t in median.items()))
    print("  ratios (diffusers / ours): " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for every arm (default 1)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--with-1000", action="store_true", help="add the 1000-step tiny case")
    parser.add_argument("--cifar-steps", type=int, default=3, help="0 skips the CIFAR-10 case")
    parser.add_argument("--compile", action="store_true", help="torch.compile our fast-path unet (cost reported)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(describe_hardware().summary())
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, threads {torch.get_num_threads()} "
          f"(every arm); ours fast = {'bf16' if cpu_bf16_native() else 'fp32'} network, fp32 sampler maths, "
          f"prepacked; other jobs may load this machine")
    cases = [("tiny 16x16", "tiny", 16, 50)]
    if args.with_1000:
        cases.append(("tiny 16x16", "tiny", 16, 1000))
    if args.cifar_steps:
        cases.append(("CIFAR-10 32x32", "ddpm-cifar10", 4, args.cifar_steps))
    summary = [(name, steps, run_case(name, preset, batch, steps, args.repeats, args.compile))
               for name, preset, batch, steps in cases]
    print("summary (median diffusers / ours):")
    for name, steps, ratios in summary:
        print(f"  {name}, {steps} steps: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))


if __name__ == "__main__":
    main()
