"""The pipeline's fast path: a 16-bit network with the sampler's maths in fp32, and an optional compiled network.

Opt-in the way diffusers does it: ``DDPMPipeline.from_pretrained(path, torch_dtype=torch.bfloat16)`` or
``pipe.to(dtype=torch.bfloat16)`` puts the *network* in bf16. Unlike diffusers' ``DDPMPipeline`` (which draws
the noise and runs every scheduler step in the unet's dtype), the sample x_t, the noise and each scheduler step
stay in float32 (``sample_dtype``); only the network's input is cast down and its output cast back up. A bf16
x_t would lose the small per-step updates: with 8 mantissa bits, x_t + 1e-3 * eps rounds back to x_t for |x_t|
above about 0.25. The step coefficients themselves come from the schedulers' float64 tables.

bf16 pays only where the hardware computes it: on a CPU without bf16 instructions oneDNN emulates it with fp32
arithmetic plus conversions, several times slower than fp32. ``check_network_dtype`` warns then, once per
pipeline call, naming what was detected (``ddpm_hf.hardware``).

``compile_unet`` is the compiled route: ``torch.compile`` with Inductor, weight freezing (constant-folded,
pre-packed weights: valid because sampling runs under ``torch.inference_mode`` with fixed weights) and, on a GPU,
``mode="reduce-overhead"`` (CUDA graphs) for small batches. Its one-off compile cost is returned, not hidden in
the first sampling call.
"""

from __future__ import annotations

import functools
import time
import warnings
from typing import Callable

import torch

from .hardware import describe_hardware

__all__ = ["check_network_dtype", "compile_unet", "cpu_bf16_native", "sample_dtype"]

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def sample_dtype(network_dtype: torch.dtype) -> torch.dtype:
    """The dtype of x_t, the noise and the scheduler step for a network in ``network_dtype``.

    Args:
        network_dtype: the unet's parameter dtype.

    Returns:
        float32 for a bf16/fp16 network, else the network's own dtype (fp32, or float64 for a float64 net).
    """
    return torch.float32 if network_dtype in _LOW_PRECISION else network_dtype


@functools.lru_cache(maxsize=1)
def cpu_bf16_native() -> bool:
    """Whether this CPU runs bf16 convolutions and matmuls on bf16 instructions (read once per process)."""
    return describe_hardware().cpu_bf16_native


@functools.lru_cache(maxsize=1)
def _cpu_fp16_native() -> bool:
    # oneDNN runs fp16 natively only with AVX512-FP16 or AMX-FP16; elsewhere it is emulated like bf16.
    return any(flag in describe_hardware().cpu_flags for flag in ("avx512_fp16", "amx_fp16"))


def check_network_dtype(dtype: torch.dtype, device: torch.device) -> None:
    """Warn when a 16-bit network on a CPU would be emulated (slower than fp32, not faster).

    Args:
        dtype: the unet's dtype.
        device: where it runs.
    """
    if device.type != "cpu" or dtype not in _LOW_PRECISION:
        return
    native = cpu_bf16_native() if dtype == torch.bfloat16 else _cpu_fp16_native()
    if not native:
        name = "bf16" if dtype == torch.bfloat16 else "fp16"
        warnings.warn(
            f"the unet is in {dtype} on a CPU without native {name} instructions "
            f"({describe_hardware().summary()}): {name} is emulated there and runs slower than float32. "
            f"Use pipe.to(dtype=torch.float32) on this machine.", RuntimeWarning, stacklevel=3)


def compile_unet(pipeline, batch_size: int, mode: str | None = None, freezing: bool = True,
                 backend: str | Callable = "inductor") -> float:
    """Compile ``pipeline.unet`` in place with ``torch.compile`` and pay the compile cost now.

    Args:
        pipeline: a ``DDPMPipeline`` (its unet is replaced by the compiled module's wrapper, same weights).
        batch_size: the network batch the sampling calls will use (twice the image count under guidance); the
            warm-up call is made at this size, and another size later recompiles at about the same cost.
        mode: ``torch.compile``'s mode; None picks ``"reduce-overhead"`` (CUDA graphs) on a GPU and Inductor's
            default on a CPU, where CUDA graphs do not exist. Ignored by backends other than Inductor.
        freezing: Inductor weight freezing (weights folded as constants; CPU convolutions pre-packed).
        backend: ``torch.compile``'s backend (Inductor by default; e.g. ``"aot_eager"`` to debug a graph).

    Returns:
        The seconds spent compiling in the warm-up calls. The sampling calls that follow at ``batch_size`` reuse
        that graph: they run inference tensors, as the warm-up does (``DDPMPipeline._denoise``).
    """
    device = pipeline._execution_device
    if mode is None:
        mode = "reduce-overhead" if device.type == "cuda" else "default"
    if backend == "inductor":
        # Weight freezing reads inductor's global config; set here because torch.compile's options= cannot be
        # combined with mode= (torch raises "Either mode or options can be specified, but both can't be specified").
        torch._inductor.config.freezing = freezing
        pipeline.unet.compile(mode=mode)
    else:
        pipeline.unet.compile(backend=backend)
    start = time.perf_counter()
    _warm_up(pipeline, batch_size, calls=4 if mode == "reduce-overhead" else 2)  # CUDA graphs record on a later call
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _warm_up(pipeline, batch_size: int, calls: int) -> None:
    """Call the unet as the sampling loop does: inference tensors, the timestep a 0-d view into an int64 table at
    a different offset each call (so neither a new storage nor a new offset recompiles)."""
    config = pipeline.unet.config
    size = config.sample_size if isinstance(config.sample_size, int) else config.sample_size[0]
    device = pipeline._execution_device
    with torch.inference_mode():
        sample = torch.zeros(batch_size, config.in_channels, size, size, device=device, dtype=pipeline.unet.dtype)
        table = torch.arange(calls, device=device)
        kwargs = {}
        if config.get("num_class_embeds") is not None:
            kwargs["class_labels"] = torch.zeros(batch_size, dtype=torch.long, device=device)
        for i in range(calls):
            pipeline.unet(sample, table[i], **kwargs, return_dict=False)
