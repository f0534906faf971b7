#!/usr/bin/env python
"""Where a training step's time goes: ours vs diffusers' `UNet2DModel`, same weights, batch, dtype and thread.

One step is what both training loops do per batch: the network's forward on noisy images, the MSE against the
noise, the backward, AdamW. Both nets are timed interleaved (``--rounds`` rounds of ``--steps`` steps each), then
each is profiled with ``torch.profiler`` over ``--steps`` steps; the table shows the median forward, backward and
optimizer times and the top ops by self CPU time, so a missed training-speed target can be read off it.

    OMP_NUM_THREADS=1 python benchmarks/profile_training_step.py --rounds 5 --steps 10
"""

from __future__ import annotations

import argparse
import statistics
import time

import diffusers
import torch
import torch.nn.functional as F

import ddpm_hf
from ddpm_hf.hardware import describe_hardware
from ddpm_hf.models import UNET_PRESETS


def build(cls: type, config: dict, state: dict | None = None) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = cls(**config).train()
    if state is not None:
        model.load_state_dict(state)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: tuple, bf16: bool) -> tuple[float, ...]:
    """One training step; returns (forward, backward, optimizer) seconds."""
    x, t, noise = batch
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = F.mse_loss(model(x, t).sample.float(), noise)
    forward = time.perf_counter()
    loss.backward()
    backward = time.perf_counter()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return forward - start, backward - forward, time.perf_counter() - backward


def top_ops(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: tuple, bf16: bool, steps: int,
            count: int = 8) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step(model, optimizer, batch, bf16)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return ", ".join(f"{e.key} {100 * e.self_cpu_time_total / total:.0f}%" for e in events[:count])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (fp32 master weights), as training")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = dict(UNET_PRESETS["tiny"], in_channels=3, out_channels=3, sample_size=16)
    ours = build(ddpm_hf.UNet2DModel, config)
    theirs = build(diffusers.UNet2DModel, config, ours[0].state_dict())
    generator = torch.Generator().manual_seed(0)
    batch = (torch.randn(args.batch, 3, 16, 16, generator=generator),
             torch.randint(0, 1000, (args.batch,), generator=generator),
             torch.randn(args.batch, 3, 16, 16, generator=generator))
    for pair in (ours, theirs):  # allocator and oneDNN warm-up
        for _ in range(3):
            step(*pair, batch, args.bf16)
    times = {"ours": [], "diffusers": []}
    for round_ in range(args.rounds):
        order = (("ours", ours), ("diffusers", theirs)) if round_ % 2 == 0 else (("diffusers", theirs), ("ours", ours))
        for name, pair in order:
            times[name] += [step(*pair, batch, args.bf16) for _ in range(args.steps)]
    print(f"machine: {describe_hardware()}")
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, 1 thread, tiny net (3 channels) 16x16, "
          f"batch {args.batch}, {'bf16 autocast' if args.bf16 else 'fp32'}, {args.rounds} interleaved rounds x "
          f"{args.steps} steps")
    medians = {name: [statistics.median(s[i] for s in rows) for i in range(3)] for name, rows in times.items()}
    for name, (fwd, bwd, opt) in medians.items():
        print(f"{name:9s}: forward {1e3 * fwd:6.1f} ms, backward {1e3 * bwd:6.1f} ms, AdamW {1e3 * opt:5.1f} ms, "
              f"step {1e3 * (fwd + bwd + opt):6.1f} ms")
    ratio = [d / o for d, o in zip(medians["diffusers"], medians["ours"])]
    print(f"diffusers / ours: forward {ratio[0]:.2f}x, backward {ratio[1]:.2f}x, AdamW {ratio[2]:.2f}x, step "
          f"{sum(medians['diffusers']) / sum(medians['ours']):.2f}x")
    for name, pair in (("ours", ours), ("diffusers", theirs)):
        print(f"top ops, {name}: {top_ops(*pair, batch, args.bf16, args.steps)}")


if __name__ == "__main__":
    main()
