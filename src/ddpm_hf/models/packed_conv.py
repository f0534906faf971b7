"""Convolutions with pre-packed oneDNN weights for CPU inference (opt-in: ``UNet2DModel.enable_weight_prepacking``).

Why: ``F.conv2d`` on CPU hands oneDNN a plain ``(C_out, C_in, kh, kw)`` weight, and oneDNN reorders it into its
blocked layout on every call. Profiled on the DDPM CIFAR-10 net at batch 2 (one thread, ``ONEDNN_VERBOSE``), those
weight reorders cost ~12% of the convolution time, and more for the small 4x4/8x8 maps, where a conv is a few
hundred microseconds. Packing each weight once (``torch.ops.mkldnn._reorder_convolution_weight``) and running
``torch.ops.mkldnn._convolution_pointwise`` removes them; that op returns channels-last maps, which also spares
oneDNN the per-call activation reorders of the following convs. Its fixed cost per call is higher, so small
weights and 1x1 convs stay on ``F.conv2d`` (``MIN_PACKED_WEIGHT``). This is what Inductor's weight freezing does for
compiled CPU models, here for eager inference.

The packs are a cache beside the parameters, never in ``state_dict``: they are used only when prepacking is on,
autograd is off (``torch.no_grad``/``torch.inference_mode``), the input is on the CPU and fp32 or bf16 (or bf16
autocast is on), and outside ``torch.compile``. A pack is rebuilt when its weight is replaced (``.to()``, a new
Parameter) or changed in place through autograd-visible ops (optimizer steps, ``load_state_dict``,
``torch.no_grad(): p.copy_(...)``), detected by the tensor's version counter. Writes through ``p.data`` are not
seen by that counter: call ``enable_weight_prepacking()`` again after them (it drops every pack).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

__all__ = ["PackCache", "PackableConv2d", "conv2d", "set_prepacking"]

_PACKABLE_DTYPES = (torch.float32, torch.bfloat16)
# The packed op costs ~25-30 us more per call than F.conv2d (one thread, measured at batch 1 and 8 on 4x4-16x16
# maps), so only weights whose per-call reorder costs more than that are packed: 3x3 (or the 2x2 phase) kernels
# of at least this many elements (64 -> 64 channels 3x3 and up). 1x1 convs measured slower packed at every size.
MIN_PACKED_WEIGHT = 32768
_MKLDNN = torch.backends.mkldnn.is_available()


class PackCache(dict):
    """Packed weights by dtype. oneDNN's opaque tensors cannot be copied or pickled, so copies start empty."""

    def __deepcopy__(self, memo) -> "PackCache":
        return PackCache()

    def __reduce__(self):
        return PackCache, ()


def _autocast_bf16() -> bool:
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


class PackableConv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters, same module type for hooks) that can run with a pre-packed oneDNN weight.

    ``prepack`` is off by default; ``UNet2DModel.enable_weight_prepacking`` turns it on where ``worth_packing``
    (setting it by hand forces it). Subclasses whose
    effective kernel is computed from ``weight`` (the fused upsampling conv) override ``packing_geometry``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.prepack = False
        self._packs = PackCache()

    def worth_packing(self) -> bool:
        """Whether packing this conv pays (see ``MIN_PACKED_WEIGHT``)."""
        return tuple(self.kernel_size) != (1, 1) and self.weight.numel() >= MIN_PACKED_WEIGHT

    def packing_geometry(self) -> tuple[Callable[[], torch.Tensor], torch.Tensor | None, list[int], list[int]]:
        """The effective kernel (a function of the current weight), its bias, padding and stride."""
        return (lambda: self.weight), self.bias, list(self.padding), list(self.stride)

    def uses_pack(self, x: torch.Tensor) -> bool:
        """Whether this call can run on the packed weight (see the module docstring)."""
        # Without autocast the input must already have the weight's dtype: F.conv2d refuses a mismatch, and so
        # must this path rather than cast the weight silently.
        # is_compiling() first: Dynamo must not trace the rest (it refuses to trace mkldnn.is_available).
        return (self.prepack and not torch.compiler.is_compiling() and not torch.is_grad_enabled() and x.is_cpu
                and self.groups == 1 and self.padding_mode == "zeros" and tuple(self.dilation) == (1, 1)
                and (_autocast_bf16() or (x.dtype == self.weight.dtype and x.dtype in _PACKABLE_DTYPES))
                and _MKLDNN)

    def packed_conv(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution on the packed weight (packing it first if it is missing or stale); channels-last out."""
        dtype = torch.bfloat16 if _autocast_bf16() else x.dtype  # what F.conv2d would compute in
        kernel, bias, padding, stride = self.packing_geometry()
        stamp = (self.weight.data_ptr(), self.weight._version,
                 None if self.bias is None else (self.bias.data_ptr(), self.bias._version))
        entry = self._packs.get(dtype)
        if entry is None or entry[0] != stamp:
            weight = kernel().to(dtype=dtype, memory_format=torch.channels_last)
            packed = torch.ops.mkldnn._reorder_convolution_weight(weight, padding, stride, [1, 1], 1, list(x.shape))
            bias = None if bias is None else bias.to(dtype)
            entry = self._packs[dtype] = (stamp, packed, bias, padding, stride)
        _, packed, bias, padding, stride = entry
        return torch.ops.mkldnn._convolution_pointwise(x.to(dtype), packed, bias, padding, stride, [1, 1], 1,
                                                       "none", [], "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``F.conv2d`` with this module's parameters, on the packed weight where ``uses_pack(x)``."""
        if self.uses_pack(x):
            return self.packed_conv(x)
        return super().forward(x)


def conv2d(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0) -> PackableConv2d:
    """A ``PackableConv2d`` with bias, like ``nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding)``."""
    return PackableConv2d(in_channels, out_channels, kernel_size=kernel_size, stride=stride, padding=padding)


def set_prepacking(module: nn.Module, enabled: bool) -> None:
    """Turn packing on (where ``worth_packing``) or off for every ``PackableConv2d`` under ``module``; forget packs.

    Args:
        module: a model or block.
        enabled: pack from now on, or not.
    """
    for sub in module.modules():
        if isinstance(sub, PackableConv2d):
            sub.prepack = enabled and sub.worth_packing()
            sub._packs.clear()

