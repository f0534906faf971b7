"""What this machine can run fast: CPU model and SIMD flags, native bfloat16, torch threads, GPUs.

One function, ``describe_hardware``, that the benchmarks print and a bf16 fast path can consult before choosing
a dtype. "Native" bf16 on a CPU means oneDNN has bf16 kernels for it (``torch.ops.mkldnn._is_mkldnn_bf16_supported``)
*and* the CPU has bf16 instructions (``avx512_bf16`` dot products or AMX tiles, ``amx_bf16`` in /proc/cpuinfo);
without them oneDNN emulates bf16 with fp32 arithmetic plus conversions, which is slower than fp32. Native is
necessary, not sufficient, for bf16 to win: with ``avx512_bf16`` but no AMX, one bf16 dot-product instruction
per cycle can be no faster than two fp32 FMAs (measure; ``benchmarks/bench_unet.py`` does).
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field

import torch

__all__ = ["HardwareInfo", "describe_hardware"]

# Flags worth printing next to a timing: the SIMD width and the bf16/fp16/int8 dot-product extensions.
_REPORTED_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16",
                   "amx_tile", "amx_bf16", "amx_int8", "asimd", "bf16", "sve")
_BF16_INSTRUCTION_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 dot products, AMX tiles, Arm BF16


@dataclass(frozen=True)
class HardwareInfo:
    """A snapshot of the machine as torch sees it.

    Attributes:
        cpu_model: the CPU's marketing name (/proc/cpuinfo "model name", else ``platform.processor()``).
        cpu_flags: the flags of ``_REPORTED_FLAGS`` this CPU has, in that order.
        logical_cpus: CPUs this process may run on.
        torch_threads: ``torch.get_num_threads()`` now.
        cpu_bf16_native: bf16 convolutions and matmuls run on bf16 instructions (see the module docstring).
        cpu_amx: AMX bf16 tiles are present (the case where bf16 is several times faster than fp32).
        gpus: names of the visible CUDA devices.
        gpu_bf16: the current CUDA device supports bf16 natively.
    """

    cpu_model: str
    cpu_flags: tuple[str, ...]
    logical_cpus: int
    torch_threads: int
    cpu_bf16_native: bool
    cpu_amx: bool
    gpus: tuple[str, ...] = field(default=())
    gpu_bf16: bool = False

    def summary(self) -> str:
        """One line for a benchmark header: model, CPUs, threads, flags, bf16 status, GPUs."""
        bf16 = "native" + (" (AMX)" if self.cpu_amx else " (no AMX)") if self.cpu_bf16_native else "emulated"
        gpus = ", ".join(self.gpus) if self.gpus else "none"
        return (f"CPU {self.cpu_model}, {self.logical_cpus} CPUs, torch threads {self.torch_threads}, "
                f"flags [{' '.join(self.cpu_flags) or 'none of ' + '/'.join(_REPORTED_FLAGS)}], "
                f"CPU bf16 {bf16}; GPUs: {gpus}" + (" (bf16)" if self.gpu_bf16 else ""))


def _cpuinfo(path: str) -> tuple[str, set[str]]:
    """Model name and flags of the first CPU listed in ``path`` ("", empty set where unreadable)."""
    model, flags = "", set()
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key == "model name" and not model:
                    model = value.strip()
                elif key in ("flags", "features") and not flags:  # "Features" on Arm
                    flags = set(value.split())
                if model and flags:
                    break
    except OSError:
        pass
    return model, flags


def _onednn_bf16() -> bool:
    """oneDNN's own verdict: it has bf16 kernels for this CPU (it also says yes where it would emulate)."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def describe_hardware(cpuinfo_path: str = "/proc/cpuinfo") -> HardwareInfo:
    """Detect the CPU, its flags, native bf16 support, the torch thread count and the GPUs.

    Args:
        cpuinfo_path: where to read the CPU model and flags (Linux format; other systems give no flags, and
            then bf16 counts as native only if oneDNN says so and the platform is not x86).

    Returns:
        A ``HardwareInfo``.
    """
    model, flags = _cpuinfo(cpuinfo_path)
    onednn_bf16 = _onednn_bf16()
    if flags:
        has_bf16_instructions = any(flag in flags for flag in _BF16_INSTRUCTION_FLAGS)
    else:  # no /proc/cpuinfo (macOS, Windows): trust oneDNN on Arm, whose bf16 check is by instruction
        has_bf16_instructions = platform.machine().lower() in ("arm64", "aarch64")
    gpus: tuple[str, ...] = ()
    gpu_bf16 = False
    if torch.cuda.is_available():
        gpus = tuple(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        gpu_bf16 = torch.cuda.is_bf16_supported()
    return HardwareInfo(
        cpu_model=model or platform.processor() or platform.machine(),
        cpu_flags=tuple(flag for flag in _REPORTED_FLAGS if flag in flags),
        logical_cpus=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1,
        torch_threads=torch.get_num_threads(),
        cpu_bf16_native=onednn_bf16 and has_bf16_instructions,
        cpu_amx="amx_bf16" in flags,
        gpus=gpus,
        gpu_bf16=gpu_bf16,
    )
