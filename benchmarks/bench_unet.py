"""CPU forward-time ratio diffusers.UNet2DModel / ddpm_hf.UNet2DModel with the same weights.

Both networks get identical weights and inputs; calls are interleaved A/B and repeated, and the median of the
per-round ratios is printed (other processes share this machine, so single timings are noisy).

Usage:
    OMP_NUM_THREADS=1 python benchmarks/bench_unet.py                 # eager and compiled, both configs
    OMP_NUM_THREADS=1 python benchmarks/bench_unet.py --modes eager   # eager only
    python benchmarks/bench_unet.py --threads 2 --rounds 30 --configs tiny
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

CASES = {"tiny": 8, "ddpm-cifar10": 2}  # preset -> batch size


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CASES), choices=list(CASES), help="presets to time")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved A/B rounds (median reported)")
    parser.add_argument("--calls", type=int, default=3, help="forward calls per network per round")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for both networks")
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"],
                        help="eager and/or torch.compile (Inductor) for both networks")
    return parser.parse_args()


def build_pair(preset: str):
    """Return (diffusers net, our net) in eval mode holding the same random weights."""
    import diffusers

    from ddpm_hf.models import UNET_PRESETS, UNet2DModel

    torch.manual_seed(0)
    theirs = diffusers.UNet2DModel(**UNET_PRESETS[preset]).eval()
    ours = UNet2DModel(**UNET_PRESETS[preset]).eval()
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def time_calls(net, x: torch.Tensor, t: torch.Tensor, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        net(x, t)
    return (time.perf_counter() - start) / calls


def interleaved_ratio(theirs, ours, x: torch.Tensor, t: torch.Tensor, rounds: int, calls: int) -> tuple[float, float, float]:
    """Median diffusers time, median our time and median per-round ratio (diffusers / ours)."""
    a_times, b_times, ratios = [], [], []
    with torch.no_grad():
        for net in (theirs, ours):  # warm-up (and compilation)
            for _ in range(2):
                net(x, t)
        for r in range(rounds):
            pair = (theirs, ours) if r % 2 == 0 else (ours, theirs)  # alternate who goes first
            times = {id(net): time_calls(net, x, t, calls) for net in pair}
            a_times.append(times[id(theirs)])
            b_times.append(times[id(ours)])
            ratios.append(a_times[-1] / b_times[-1])
    return statistics.median(a_times), statistics.median(b_times), statistics.median(ratios)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch.get_num_threads()={torch.get_num_threads()} for both networks, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    print(f"{'config':<14}{'batch':>6}{'mode':>10}{'diffusers ms':>14}{'ours ms':>10}{'ratio':>8}")
    for preset in args.configs:
        batch = CASES[preset]
        theirs, ours = build_pair(preset)
        cfg = ours.config
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=generator)
        t = torch.randint(0, 1000, (batch,), generator=generator)
        for mode in args.modes:
            a, b = theirs, ours
            if mode == "compiled":
                torch._dynamo.reset()
                a, b = torch.compile(theirs), torch.compile(ours, fullgraph=True)
            ta, tb, ratio = interleaved_ratio(a, b, x, t, args.rounds, args.calls)
            print(f"{preset:<14}{batch:>6}{mode:>10}{ta * 1e3:>14.2f}{tb * 1e3:>10.2f}{ratio:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
