#!/usr/bin/env python
"""Sampling across batch sizes on a GPU: diffusers' default pipeline against ours under CUDA graphs, with MFU.

    python benchmarks/gpu_cuda_graphs.py [--batches 1 4 16 64] [--steps 50] [--repeats 3]
    python benchmarks/gpu_cuda_graphs.py --device cpu --presets tiny --batches 1 2 --steps 2 --repeats 1  # dry run

Arms per (net, batch), same weights and seed, interleaved, each timed with device synchronisation: diffusers'
`DDPMPipeline` in fp32 eager (its default) and in bf16 eager, ours in bf16 eager, and ours in bf16 through
`pipe.compile_unet(batch)` (Inductor, ``mode="reduce-overhead"``: the denoising loop replays one CUDA graph per
batch size; on a CPU dry run Inductor's default mode). The compile cost is printed apart from the sampling times.
The model-FLOP utilisation is the network's FLOPs per forward (``torch.utils.flop_counter``) times the steps,
over the sampling time, against the GPU's dense bf16 peak (`BF16_PEAK_TFLOPS`; "n/a" for a GPU not listed).
Each batch size compiles once (tens of seconds): trim ``--batches``/``--presets`` to fit a short GPU lease.
"""

from __future__ import annotations

import argparse
import statistics
import time

import diffusers
import torch
from torch.utils.flop_counter import FlopCounterMode

import ddpm_hf
from ddpm_hf.hardware import describe_hardware
from ddpm_hf.models import UNET_PRESETS

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, matched against the device name in
# order (PCIe before the generic name: "H100 PCIe" is 756, the SXM "H100 80GB HBM3" 989).
BF16_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0), ("L40S", 362.0),
                    ("L4", 121.0), ("A10", 125.0))


def bf16_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak * 1e12 for key, peak in BF16_PEAK_TFLOPS if key in name), None)


def pipelines(preset: str, device: torch.device) -> dict[str, object]:
    """The four arms on one set of weights (ours is compiled later, per batch size)."""
    torch.manual_seed(0)
    stock = diffusers.UNet2DModel(**UNET_PRESETS[preset]).eval()
    arms = {"diffusers fp32": diffusers.DDPMPipeline(stock, diffusers.DDPMScheduler()).to(device)}
    stock_bf16 = diffusers.UNet2DModel.from_config(stock.config).eval()
    stock_bf16.load_state_dict(stock.state_dict())
    arms["diffusers bf16"] = diffusers.DDPMPipeline(stock_bf16, diffusers.DDPMScheduler()).to(device, torch.bfloat16)
    for name in ("ours bf16", "ours bf16 graphs"):
        unet = ddpm_hf.UNet2DModel.from_config(stock.config).eval()
        unet.load_state_dict(stock.state_dict())
        arms[name] = ddpm_hf.DDPMPipeline(unet, ddpm_hf.DDPMScheduler()).to(device, torch.bfloat16)
    for pipe in arms.values():
        pipe.set_progress_bar_config(disable=True)
    return arms


def sample_seconds(pipe, batch: int, steps: int, device: torch.device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    pipe(batch_size=batch, num_inference_steps=steps, generator=torch.Generator(device).manual_seed(0),
         output_type="pt")
    sync()
    return time.perf_counter() - start


def forward_flops(pipe, batch: int, device: torch.device) -> int:
    unet = pipe.unet
    size = unet.config.sample_size
    x = torch.randn(batch, unet.config.in_channels, size, size, device=device, dtype=unet.dtype)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        unet(x, torch.tensor(10, device=device))
    return counter.get_total_flops()


def run_preset(preset: str, batches: list[int], steps: int, repeats: int, device: torch.device) -> None:
    arms = pipelines(preset, device)
    peak = bf16_peak(device)
    for batch in batches:
        for name, pipe in arms.items():  # warm-up: cuDNN/cuBLAS heuristics, allocator (compile_unet warms its own)
            if name != "ours bf16 graphs":
                sample_seconds(pipe, batch, 2, device)
        compile_s = arms["ours bf16 graphs"].compile_unet(batch)  # a new batch size compiles (or records) again
        times = {name: [] for name in arms}
        for r in range(repeats):
            for name in (arms if r % 2 == 0 else reversed(list(arms))):
                times[name].append(sample_seconds(arms[name], batch, steps, device))
        median = {name: statistics.median(t) for name, t in times.items()}
        flops = forward_flops(arms["ours bf16"], batch, device) * steps
        mfu = {name: f"{100 * flops / (t * peak):.1f}%" if peak else "n/a" for name, t in median.items()}
        print(f"{preset} batch {batch}, {steps} steps ({flops / steps / 1e9:.2f} GFLOP a forward; compile_unet "
              f"{compile_s:.1f} s apart):")
        for name, t in median.items():
            print(f"  {name:17s} {1e3 * t:9.1f} ms  MFU {mfu[name]}")
        default, graphs = median["diffusers fp32"], median["ours bf16 graphs"]
        print(f"  diffusers fp32 / ours graphs {default / graphs:.2f}x; diffusers bf16 / ours bf16 eager "
              f"{median['diffusers bf16'] / median['ours bf16']:.2f}x; diffusers bf16 / ours graphs "
              f"{median['diffusers bf16'] / graphs:.2f}x", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "ddpm-cifar10"], choices=list(UNET_PRESETS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4, 16, 64])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: pass --device cpu for a dry run")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 for diffusers' default arm
    torch.backends.cudnn.allow_tf32 = False
    print(f"machine: {describe_hardware()}; torch {torch.__version__}, diffusers {diffusers.__version__}, "
          f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}", flush=True)
    for preset in args.presets:
        run_preset(preset, args.batches, args.steps, args.repeats, device)


if __name__ == "__main__":
    main()
