"""CUDA check and benchmark of ddpm_hf.UNet2DModel against diffusers.UNet2DModel (same weights and inputs).

1. Correctness on CUDA in float32 (TF32 off): relative max error of our output against diffusers'.
2. Forward-time ratio diffusers / ours, interleaved A/B rounds with CUDA events, median of the per-round ratios:
   float32 and bfloat16 autocast, eager and torch.compile, for the tiny preset at batch 64 and the DDPM CIFAR-10
   preset at batch 16. The compiled rows stop being attempted once --max-seconds is spent.
3. An "eager+subpixel" row: ours with the fused upsample-conv forced on (it is CPU-only by default), to see
   whether it also pays on the GPU.

Every case is printed as soon as it is measured, then a compact table at the end; a failing case prints its
error and the run goes on. Usage:
    python benchmarks/gpu_unet.py                       # everything (about 2 minutes on an H100)
    python benchmarks/gpu_unet.py --no-compile --rounds 10
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback

import torch

CASES = {"tiny": 64, "ddpm-cifar10": 16}  # preset -> batch size


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--rounds", type=int, default=20, help="interleaved A/B rounds")
    parser.add_argument("--calls", type=int, default=5, help="forward calls per network per round")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--max-seconds", type=float, default=150.0, help="no new compiled case after this")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    return parser.parse_args()


def build_pair(preset: str, device: torch.device):
    import diffusers

    from ddpm_hf.models import UNET_PRESETS, UNet2DModel

    torch.manual_seed(0)
    theirs = diffusers.UNet2DModel(**UNET_PRESETS[preset]).eval()
    ours = UNet2DModel(**UNET_PRESETS[preset]).eval()
    ours.load_state_dict(theirs.state_dict())
    return theirs.to(device), ours.to(device)


def make_inputs(net, batch: int, device: torch.device):
    cfg = net.config
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    return x, t


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def check_correctness(theirs, ours, x, t) -> float:
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad():
            return rel_err(ours(x, t).sample, theirs(x, t).sample)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


def time_calls(net, x, t, calls: int, dtype) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        start.record()
        for _ in range(calls):
            net(x, t)
        end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls  # ms


def interleaved(theirs, ours, x, t, rounds: int, calls: int, dtype: str):
    """Median ms of each network and median per-round ratio diffusers / ours."""
    a_ms, b_ms, ratios = [], [], []
    with torch.no_grad():
        for net in (theirs, ours):  # warm-up, and compilation for compiled modules
            for _ in range(3):
                time_calls(net, x, t, 1, dtype)
        for r in range(rounds):
            order = (theirs, ours) if r % 2 == 0 else (ours, theirs)
            ms = {id(net): time_calls(net, x, t, calls, dtype) for net in order}
            a_ms.append(ms[id(theirs)])
            b_ms.append(ms[id(ours)])
            ratios.append(a_ms[-1] / b_ms[-1])
    return statistics.median(a_ms), statistics.median(b_ms), statistics.median(ratios)


def main() -> int:
    args = parse_args()
    if not torch.cuda.is_available():
        print("CUDA is not available: this script needs a GPU.", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    from ddpm_hf.models import blocks

    cpu_only = blocks._subpixel_pays_off
    began = time.monotonic()
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}, cudnn.allow_tf32="
          f"{torch.backends.cudnn.allow_tf32} (timings), matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}",
          flush=True)
    rows, nets = [], {}
    for preset in args.configs:
        batch = CASES[preset]
        try:
            theirs, ours = build_pair(preset, device)
            x, t = make_inputs(ours, batch, device)
            err = check_correctness(theirs, ours, x, t)
        except Exception:  # keep going: a partial table is still useful
            traceback.print_exc()
            continue
        print(f"[correctness] {preset} batch {batch} fp32 (TF32 off): rel max err {err:.2e}", flush=True)
        rows.append((preset, batch, "fp32", "check", "", "", f"err {err:.1e}"))
        nets[preset] = (theirs, ours, x, t)
    # Cheap rows first; compiled rows (slow to build) last, float32 before bfloat16.
    cases = [(p, d, m) for m in ("eager", "eager+subpixel") for p in nets for d in args.dtypes]
    if not args.no_compile:
        cases += [(p, d, "compiled") for d in args.dtypes for p in nets]
    for preset, dtype, mode in cases:
        if mode == "compiled" and time.monotonic() - began > args.max_seconds:
            print(f"[skip] {preset} {dtype} compiled: --max-seconds spent", flush=True)
            continue
        theirs, ours, x, t = nets[preset]
        try:
            a, b = theirs, ours
            if mode == "compiled":
                torch._dynamo.reset()
                a, b = torch.compile(theirs), torch.compile(ours, fullgraph=True)
            blocks._subpixel_pays_off = (lambda _: True) if mode == "eager+subpixel" else cpu_only
            ta, tb, ratio = interleaved(a, b, x, t, args.rounds, args.calls, dtype)
        except Exception:
            traceback.print_exc()
            continue
        finally:
            blocks._subpixel_pays_off = cpu_only
        row = (preset, CASES[preset], dtype, mode, f"{ta:.3f}", f"{tb:.3f}", f"{ratio:.2f}x")
        rows.append(row)
        print("[timing]", *row, f"({time.monotonic() - began:.0f} s elapsed)", flush=True)
    print(f"\n{'config':<14}{'batch':>6}{'dtype':>6}{'mode':>16}{'diffusers ms':>14}{'ours ms':>10}{'ratio':>14}")
    for preset, batch, dtype, mode, ta, tb, ratio in rows:
        print(f"{preset:<14}{batch:>6}{dtype:>6}{mode:>16}{ta:>14}{tb:>10}{ratio:>14}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
