"""Network forward: diffusers.UNet2DModel vs ddpm_hf.UNet2DModel, and both against the machine's conv limit.

For each preset (tiny at batch 8, the DDPM CIFAR-10 net at batch 2) and dtype (fp32; bf16 autocast where the CPU
has native bf16, "emulated, skipped" otherwise) one interleaved run alternates diffusers', ours (default) and
ours with ``enable_weight_prepacking()`` (the order reverses every round), same weights and inputs, and in the
same rounds times every distinct convolution shape the forward runs, alone, same dtype (bf16 tensors for bf16),
both as ``F.conv2d`` and on a packed oneDNN weight with a channels-last input. The best 3x3 one is the limit.

Printed: median and fastest times, the ratio diffusers / ours of the medians, per round (median and min-max
spread) and of the fastest rounds (noise on a shared machine only adds time); the forward's GFLOP/s
(``torch.utils.flop_counter.FlopCounterMode``) as a fraction of the limit; and how long the forward's convs take
alone, each shape at its own best, as a share of the forward (what bounds the fraction without faster kernels).
Times are per-thread CPU time (``time.thread_time``), which does not count time spent waiting for a core on a
shared machine; ``--clock wall`` uses ``time.perf_counter``.

``--profile`` adds, per net and dtype, a torch.profiler table of the top ops by self CPU time.

Usage:
    OMP_NUM_THREADS=1 python benchmarks/bench_unet.py                      # eager, both presets, fp32 + bf16
    OMP_NUM_THREADS=1 python benchmarks/bench_unet.py --configs tiny --rounds 30 --profile
    OMP_NUM_THREADS=1 python benchmarks/bench_unet.py --modes eager compiled --memory-format channels_last
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from ddpm_hf.hardware import describe_hardware

CASES = {"tiny": 8, "ddpm-cifar10": 2}  # preset -> batch size


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CASES), choices=list(CASES), help="presets to time")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                        help="fp32, and/or bf16 autocast (only where the CPU has native bf16)")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (medians reported)")
    parser.add_argument("--calls", type=int, default=3, help="forward calls per network per round")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for both networks")
    parser.add_argument("--modes", nargs="+", default=["eager"], choices=["eager", "compiled"],
                        help="eager and/or torch.compile (Inductor) for both networks")
    parser.add_argument("--memory-format", default="contiguous", choices=["contiguous", "channels_last"],
                        help="memory format of both nets' weights and inputs")
    parser.add_argument("--clock", default="cpu", choices=["cpu", "wall"], help="thread CPU time or wall time")
    parser.add_argument("--profile", action="store_true", help="print a per-op profile of each net and dtype")
    return parser.parse_args()


def build_pair(preset: str, memory_format: torch.memory_format):
    """Return (diffusers net, our net) in eval mode holding the same random weights."""
    import diffusers

    from ddpm_hf.models import UNET_PRESETS, UNet2DModel

    torch.manual_seed(0)
    theirs = diffusers.UNet2DModel(**UNET_PRESETS[preset]).eval()
    ours = UNet2DModel(**UNET_PRESETS[preset]).eval()
    ours.load_state_dict(theirs.state_dict())
    return theirs.to(memory_format=memory_format), ours.to(memory_format=memory_format)


def dtype_context(dtype: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()


def _conv_arg(args: tuple, kwargs: dict | None, index: int, name: str, default: int) -> tuple[int, int]:
    value = args[index] if len(args) > index else (kwargs or {}).get(name, default)
    return tuple(value) if isinstance(value, (list, tuple)) else (value, value)


class _ConvRecorder(TorchDispatchMode):
    """Counts every convolution a forward runs, by (input shape, weight shape, stride, padding)."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.conv2d.default:  # (input, weight, bias=None, stride=1, padding=0, ...)
            stride, padding = (_conv_arg(args, kwargs, i, name, default)
                               for i, name, default in ((3, "stride", 1), (4, "padding", 0)))
            self.counts[(tuple(args[0].shape), tuple(args[1].shape), stride, padding)] += 1
        return func(*args, **(kwargs or {}))


def conv_cases(net, x: torch.Tensor, t: torch.Tensor, dtype: str) -> list:
    """Every distinct conv shape that ``net``'s (unpacked) forward runs: (name, FLOPs, count, is_3x3, callables).

    The callables are the conv as ``F.conv2d`` and, where oneDNN is available, on a packed weight with a
    channels-last input; both in the benchmark's dtype.
    """
    with torch.inference_mode(), _ConvRecorder() as recorder:
        net(x, t)
    cases = []
    for (in_shape, w_shape, stride, padding), count in sorted(recorder.counts.items()):
        to = dict(dtype=torch.bfloat16 if dtype == "bf16" else torch.float32, memory_format=x_format(x))
        xi, w = torch.randn(in_shape).to(**to), torch.randn(w_shape).to(**to)
        b = torch.randn(w_shape[0]).to(xi.dtype)
        out = F.conv2d(xi, w, b, stride, padding)
        flops = 2 * out.numel() * w_shape[1] * w_shape[2] * w_shape[3]
        fns = [lambda xi=xi, w=w, b=b, s=stride, p=padding: F.conv2d(xi, w, b, s, p)]
        if torch.backends.mkldnn.is_available():
            xl, wl = xi.to(memory_format=torch.channels_last), w.to(memory_format=torch.channels_last)
            packed = torch.ops.mkldnn._reorder_convolution_weight(wl, list(padding), list(stride), [1, 1], 1,
                                                                  list(in_shape))
            fns.append(lambda xl=xl, w=packed, b=b, s=stride, p=padding: torch.ops.mkldnn._convolution_pointwise(
                xl, w, b, list(p), list(s), [1, 1], 1, "none", [], ""))
        name = f"{in_shape}*{tuple(w_shape)}->{tuple(out.shape)}"
        cases.append((name, flops, count, tuple(w_shape[2:]) == (3, 3), fns))
    return cases


def x_format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if not x.is_contiguous() else torch.contiguous_format


def forward_flops(net, x: torch.Tensor, t: torch.Tensor, dtype: str) -> int:
    with torch.inference_mode(), dtype_context(dtype), FlopCounterMode(display=False) as counter:
        net(x, t)
    return counter.get_total_flops()


def interleaved(fns: dict, rounds: int, calls: int, clock) -> dict[str, list[float]]:
    """Per-round mean seconds per call of each zero-argument function, order reversed every other round."""
    times = {name: [] for name in fns}
    for fn in fns.values():  # warm-up (oneDNN primitive caches, compilation)
        fn()
        fn()
    for r in range(rounds):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            start = clock()
            for _ in range(calls):
                fns[name]()
            times[name].append((clock() - start) / calls)
    return times


def run_case(nets: dict, x, t, dtype: str, flops: int, convs: list, args: argparse.Namespace, clock) -> None:
    """Time one (preset, dtype, mode): ``nets`` maps a peer name to a net, "diffusers" first; print the rows."""
    fns = {name: (lambda net=net: net(x, t)) for name, net in nets.items()}
    for name, _, _, _, conv_fns in convs:
        fns.update({f"{name}#{i}": fn for i, fn in enumerate(conv_fns)})
    with torch.inference_mode(), dtype_context(dtype):
        times = interleaved(fns, args.rounds, args.calls, clock)
    # Each conv shape at its best way (plain or packed), alone; the limit is the best 3x3 one.
    best = {name: min(statistics.median(times[f"{name}#{i}"]) for i in range(len(conv_fns)))
            for name, _, _, _, conv_fns in convs}
    limit_name, limit = max(((name, f / best[name]) for name, f, _, is_3x3, _ in convs if is_3x3),
                            key=lambda item: item[1])
    floor = sum(count * best[name] for name, _, count, _, _ in convs)
    conv_flops = sum(count * f for _, f, count, _, _ in convs)
    print(f"  forward {flops / 1e9:.3f} GFLOP ({conv_flops / flops:.0%} in convs); best 3x3 conv of the net's shapes "
          f"{limit / 1e9:.0f} GFLOP/s ({limit_name}); the forward's {sum(c[2] for c in convs)} convs alone, each "
          f"shape at its own best: {floor * 1e3:.2f} ms, {conv_flops / floor / limit:.0%} of the best conv's rate")
    base, base_min = statistics.median(times["diffusers"]), min(times["diffusers"])
    for name in nets:
        ratios = [a / b for a, b in zip(times["diffusers"], times[name])]
        median, fastest = statistics.median(times[name]), min(times[name])
        print(f"  {name:<15} median {median * 1e3:8.2f} ms, min {fastest * 1e3:8.2f} ms; diffusers/this: medians "
              f"{base / median:.2f}x, per round {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}),"
              f" mins {base_min / fastest:.2f}x; {flops / median / 1e9:4.0f} GFLOP/s = {flops / median / limit:.0%} "
              f"of the best conv (mins {flops / fastest / limit:.0%}); convs alone {floor / median:.0%} of it",
              flush=True)


def profile_case(theirs, ours, packed, x, t, dtype: str, rows: int = 12) -> None:
    """Print the top ops by self CPU time of three forwards of each net."""
    from torch.profiler import ProfilerActivity, profile

    for name, net in (("ours", ours), ("ours prepacked", packed), ("diffusers", theirs)):
        with torch.inference_mode(), dtype_context(dtype):
            net(x, t)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    net(x, t)
        print(f"  profile {name} ({dtype}, 3 forwards):")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=48))


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    hardware = describe_hardware()
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    memory_format = torch.channels_last if args.memory_format == "channels_last" else torch.contiguous_format
    print(f"torch {torch.__version__}; {hardware.summary()}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; "
          f"clock {args.clock}; memory format {args.memory_format}; {args.rounds} rounds x {args.calls} calls")
    for preset in args.configs:
        batch = CASES[preset]
        theirs, ours = build_pair(preset, memory_format)
        packed = copy.deepcopy(ours)
        packed.enable_weight_prepacking()
        cfg = ours.config
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=generator)
        x = x.to(memory_format=memory_format)
        t = torch.randint(0, 1000, (batch,), generator=generator)
        for dtype in args.dtypes:
            if dtype == "bf16" and not hardware.cpu_bf16_native:
                print(f"{preset} batch {batch} bf16: emulated, skipped (no native bf16 on this CPU)")
                continue
            flops, convs = forward_flops(ours, x, t, dtype), conv_cases(ours, x, t, dtype)
            for mode in args.modes:
                nets = {"diffusers": theirs, "ours": ours, "ours prepacked": packed}
                if mode == "compiled":  # Inductor; prepacking is the eager route to what freezing does there
                    torch._dynamo.reset()
                    nets = {"diffusers": torch.compile(theirs), "ours": torch.compile(ours, fullgraph=True)}
                print(f"{preset} batch {batch} {dtype} {mode}:", flush=True)
                run_case(nets, x, t, dtype, flops, convs, args, clock)
            if args.profile:
                profile_case(theirs, ours, packed, x, t, dtype)


if __name__ == "__main__":
    main()
