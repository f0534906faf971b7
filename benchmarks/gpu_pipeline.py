"""GPU sampling time, diffusers.DDPMPipeline vs ddpm_hf.DDPMPipeline, fp32 and bf16 (about 2 minutes on an H100).

    PYTHONPATH=src python benchmarks/gpu_pipeline.py [--repeats 3] [--compile]

Same weights, seed and dtype for both; runs interleaved and timed with CUDA synchronisation. Cases: the tiny
16x16 digits net at batch 64 and the DDPM paper's CIFAR-10 net at batch 64, DDPM sampling with 100 steps.
With ``--compile``, our unet is also run through ``torch.compile`` (its one-off compile time, about a minute
per case, is printed separately from the sampling time). Prints one line per run and a summary of median ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time

import diffusers
import torch

import ddpm_hf
from ddpm_hf.models import UNET_PRESETS

CASES = [("tiny 16x16", "tiny", 64, 100), ("CIFAR-10 32x32", "ddpm-cifar10", 64, 100)]


def build(preset: str, dtype: torch.dtype) -> tuple[diffusers.DDPMPipeline, ddpm_hf.DDPMPipeline]:
    torch.manual_seed(0)
    stock_unet = diffusers.UNet2DModel(**UNET_PRESETS[preset]).eval()
    our_unet = ddpm_hf.UNet2DModel.from_config(stock_unet.config).eval()
    our_unet.load_state_dict(stock_unet.state_dict())
    stock = diffusers.DDPMPipeline(stock_unet, diffusers.DDPMScheduler()).to("cuda", dtype)
    ours = ddpm_hf.DDPMPipeline(our_unet, ddpm_hf.DDPMScheduler()).to("cuda", dtype)
    for pipe in (stock, ours):
        pipe.set_progress_bar_config(disable=True)
    return stock, ours


def sample(pipe, batch: int, steps: int) -> tuple[float, torch.Tensor]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    images = pipe(batch_size=batch, num_inference_steps=steps, generator=torch.Generator("cuda").manual_seed(0),
                  output_type="pt").images
    torch.cuda.synchronize()
    return time.perf_counter() - start, images.float()


def run(name: str, preset: str, batch: int, steps: int, dtype: torch.dtype, repeats: int, compile_unet: bool) -> dict:
    stock, ours = build(preset, dtype)
    sample(stock, batch, 2)  # warm-up: cuDNN/cuBLAS heuristics, allocator
    sample(ours, batch, 2)
    label = f"{name} {str(dtype).replace('torch.', '')} batch {batch}, {steps} steps"
    results = {}
    variants = [("eager", ours)]
    if compile_unet:
        compiled = ddpm_hf.DDPMPipeline(ours.unet, ours.scheduler)
        compiled.set_progress_bar_config(disable=True)
        compiled.unet = torch.compile(ours.unet)
        compile_s, _ = sample(compiled, batch, 2)
        print(f"{label}: torch.compile one-off {compile_s:.1f} s (first call; not in the times below)")
        variants.append(("compiled", compiled))
    for variant, pipe in variants:
        ratios = []
        for r in range(repeats):
            t_stock, a = sample(stock, batch, steps)
            t_ours, b = sample(pipe, batch, steps)
            ratios.append(t_stock / t_ours)
            print(f"{label}, ours {variant}, run {r}: diffusers {t_stock * 1e3:8.1f} ms  ours {t_ours * 1e3:8.1f} ms  "
                  f"ratio {ratios[-1]:.2f}x  max|diff| {(a - b).abs().max().item():.1e}", flush=True)
        results[(label, variant)] = statistics.median(ratios)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time our unet under torch.compile")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 for both pipelines
    torch.backends.cudnn.allow_tf32 = False
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, diffusers {diffusers.__version__}", flush=True)
    summary = {}
    for dtype in (torch.float32, torch.bfloat16):
        for name, preset, batch, steps in CASES:
            summary.update(run(name, preset, batch, steps, dtype, args.repeats, args.compile))
    print("summary (median diffusers/ours):")
    for (label, variant), ratio in summary.items():
        print(f"  {label}, ours {variant}: {ratio:.2f}x")


if __name__ == "__main__":
    main()
