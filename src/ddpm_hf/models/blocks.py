"""Building blocks of the DDPM U-Net with the parameter names and shapes of diffusers' blocks.

Written for speed on the inference path (profiled against diffusers 0.42.1 on CPU):
- activations run in place on fresh tensors and residual adds accumulate into the conv output, so a block
  allocates about half as many feature maps;
- on CPU, the nearest-neighbour 2x upsampling followed by a 3x3 conv is computed as one 2x2 conv on the
  low-resolution map whose four output phases are interleaved (``subpixel_upsample_conv``): the same function
  with about 2.25x fewer multiply-adds and no 4x-sized intermediate (on an H100 it measured no faster, so CUDA
  keeps the plain path);
- attention keeps the feature map's memory format, so no conv downstream sees a channels-last input with
  channels-first weights (diffusers' attention returns a channels-last view, after which every conv in the
  lower half of the net re-packs its weights on every call).

Module calls still go through ``nn.Module.__call__`` for every conv, linear and norm, so accelerate / diffusers
hooks (offloading, layerwise casting) keep working.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .packed_conv import PackableConv2d, conv2d

ACTIVATIONS = ("silu", "swish", "mish", "gelu", "relu")


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Return diffusers' ``get_activation(name)`` as a function that works in place where autograd allows.

    Args:
        name: one of ``ACTIVATIONS`` (case-insensitive, like diffusers).

    Returns:
        A function of one tensor; callers only pass tensors they own (fresh norm outputs).
    """
    name = name.lower()
    # partial objects rather than lambdas, so that models stay picklable (torch.save(model)).
    if name in ("silu", "swish"):
        return partial(F.silu, inplace=True)
    if name == "mish":
        return partial(F.mish, inplace=True)
    if name == "relu":
        return partial(F.relu, inplace=True)
    if name == "gelu":
        return F.gelu
    raise ValueError(f"act_fn={name!r} is not supported; allowed: {', '.join(ACTIVATIONS)}")


def _phase_taps() -> torch.Tensor:
    """The 0/1 matrix that maps a 3x3 kernel to the four 2x2 kernels of its nearest-upsampled phases.

    Output pixel (2i + a, 2j + b) of conv3x3(upsample2x(x)) reads low-resolution rows {i-1: w0, i: w1 + w2} when
    a = 0 and {i: w0 + w1, i+1: w2} when a = 1 (columns likewise with b), so each phase is a 2x2 conv.

    Returns:
        A float32 tensor of shape ``(16, 9)``: row ``(a, b, ty, tx)``, column ``(ky, kx)``.
    """
    rows = torch.tensor([[[1.0, 0, 0], [0, 1, 1]], [[1.0, 1, 0], [0, 0, 1]]])  # (phase, tap, kernel row)
    return torch.einsum("aty,bsx->abtsyx", rows, rows).reshape(16, 9)


def phase_kernel(weight: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """The ``(4 C_out, C_in, 2, 2)`` kernel of the four nearest-upsampled phases of a 3x3 ``weight``.

    Args:
        weight: ``(C_out, C_in, 3, 3)`` conv weight.
        taps: ``_phase_taps()`` in the weight's dtype and device.

    Returns:
        The phase kernel (output channel ``4 c + 2 a + b`` is phase ``(a, b)`` of channel ``c``), channels-last.
    """
    c_out, c_in = weight.shape[:2]
    # (C_out, 16, C_in) is, read as (4 C_out, 2, 2, C_in), a channels-last 2x2 kernel: no copy needed.
    phase_w = torch.matmul(taps, weight.reshape(c_out, c_in, 9).transpose(1, 2))
    return phase_w.view(4 * c_out, 2, 2, c_in).permute(0, 3, 1, 2)


def interleave_phases(phases: torch.Tensor, bias: torch.Tensor | None, fmt: torch.memory_format) -> torch.Tensor:
    """Assemble ``(B, C, 2H, 2W)`` from the ``(B, 4 C, H+1, W+1)`` phase maps of ``phase_kernel`` (+ bias)."""
    batch, c4, height, width = phases.shape
    c_out, height, width = c4 // 4, height - 1, width - 1
    # Output (c, 2i + a, 2j + b) is phase (c, a, b) at (i + a, j + b): one strided view reads all four phases,
    # so the interleave is a single copy (four slice copies cost twice as much from a channels-last map).
    s_b, s_c, s_h, s_w = phases.stride()
    grid = phases.as_strided((batch, c_out, height, 2, width, 2),
                             (s_b, 4 * s_c, s_h, 2 * s_c + s_h, s_w, s_c + s_w))
    out = torch.empty((batch, c_out, 2 * height, 2 * width), dtype=phases.dtype, device=phases.device,
                      memory_format=fmt)
    out.view(batch, c_out, height, 2, width, 2).copy_(grid)
    # The bias is added here rather than in the conv: Inductor in torch 2.11 cannot lower a conv whose bias
    # is a view of a computed tensor (bias.repeat_interleave(4)).
    return out if bias is None else out.add_(bias.view(1, c_out, 1, 1))


def subpixel_upsample_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           taps: torch.Tensor) -> torch.Tensor:
    """Compute ``conv2d(interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1)`` exactly.

    Args:
        x: ``(B, C_in, H, W)`` input in either memory format.
        weight: ``(C_out, C_in, 3, 3)`` conv weight.
        bias: ``(C_out,)`` conv bias or None.
        taps: ``_phase_taps()`` in the weight's dtype and device.

    Returns:
        ``(B, C_out, 2H, 2W)`` in the memory format of ``x``.
    """
    phases = F.conv2d(x, phase_kernel(weight, taps), None, padding=1)  # (B, 4 C_out, H+1, W+1)
    return interleave_phases(phases, bias, memory_format_of(x))


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """``torch.channels_last`` for a strictly channels-last 4-D tensor, else ``torch.contiguous_format``."""
    channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last else torch.contiguous_format


def _subpixel_pays_off(x: torch.Tensor) -> bool:
    # On CPU the 2x2 phase conv does 16 (H+1)(W+1) multiply-adds per output channel and input channel instead of
    # 36 H W, but building the phase kernel costs a fixed ~300 of those; measured break-even is near this bound.
    _, _, height, width = x.shape
    return x.is_cpu and x.shape[0] * (36 * height * width - 16 * (height + 1) * (width + 1)) >= 512


class UpsampleConv(PackableConv2d):
    """Nearest 2x upsampling fused with the following 3x3 conv (diffusers' ``Upsample2D(use_conv=True)``).

    With weight prepacking on, the packed kernel is the 2x2 phase kernel (the bias is added after the interleave).
    """

    def __init__(self, channels: int):
        super().__init__(channels, channels, kernel_size=3, padding=1)
        self.register_buffer("phase_taps", _phase_taps(), persistent=False)

    def packing_geometry(self):
        """The phase kernel of the current weight, no bias, padding 1, stride 1."""
        return (lambda: phase_kernel(self.weight, self.phase_taps.to(self.weight.dtype))), None, [1, 1], [1, 1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Upsample ``(B, C, H, W)`` to ``(B, C, 2H, 2W)``."""
        if not _subpixel_pays_off(x):
            return nn.Conv2d.forward(self, F.interpolate(x, scale_factor=2.0, mode="nearest"))
        if self.uses_pack(x):
            return interleave_phases(self.packed_conv(x), self.bias, torch.channels_last)
        return subpixel_upsample_conv(x, self.weight, self.bias, self.phase_taps.to(self.weight.dtype))


class Upsample(nn.Module):
    """Holder that gives the upsampling conv diffusers' parameter path ``upsamplers.0.conv``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = UpsampleConv(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Upsample ``(B, C, H, W)`` to ``(B, C, 2H, 2W)``."""
        return self.conv(x)


class Downsample(nn.Module):
    """Stride-2 3x3 conv (diffusers' ``Downsample2D(use_conv=True)``); padding 0 pads right/bottom like TF.

    Args:
        channels: input and output channels.
        padding: conv padding; 0 means asymmetric ``(0, 1, 0, 1)`` zero padding as in the DDPM TF code.
    """

    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.pad_right_bottom = padding == 0
        self.conv = conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Downsample ``(B, C, H, W)`` to ``(B, C, H/2, W/2)``."""
        if self.pad_right_bottom:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class ResnetBlock(nn.Module):
    """Wide-ResNet block of DDPM (Ho et al. 2020, App. B): GN, act, conv, + time, GN, act, dropout, conv, skip.

    Args:
        in_channels: input channels.
        out_channels: output channels (a 1x1 ``conv_shortcut`` is added when they differ).
        temb_channels: width of the time embedding.
        groups: GroupNorm groups.
        eps: GroupNorm epsilon.
        dropout: dropout before the second conv.
        act_fn: activation name (see ``activation``).
        time_scale_shift: "default" adds the projected embedding before the second norm; "scale_shift" applies
            ``norm(h) * (1 + scale) + shift`` (improved DDPM, Nichol & Dhariwal 2021).
        output_scale_factor: the output is divided by this.
        resample: None, "down" (2x2 average pool) or "up" (nearest 2x), applied after the first activation.
    """

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, groups: int, eps: float,
                 dropout: float, act_fn: str, time_scale_shift: str, output_scale_factor: float = 1.0,
                 resample: str | None = None):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = conv2d(in_channels, out_channels, 3, padding=1)
        proj_channels = 2 * out_channels if time_scale_shift == "scale_shift" else out_channels
        self.time_emb_proj = nn.Linear(temb_channels, proj_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.act = activation(act_fn)
        self.scale_shift = time_scale_shift == "scale_shift"
        self.output_scale_factor = output_scale_factor
        self.resample = resample

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        return F.interpolate(x, scale_factor=2.0, mode="nearest")

    def forward(self, x: torch.Tensor, temb_act: torch.Tensor) -> torch.Tensor:
        """Apply the block.

        Args:
            x: ``(B, in_channels, H, W)``.
            temb_act: the time embedding after the activation, ``(B, temb_channels)`` (shared by all blocks).

        Returns:
            ``(B, out_channels, H', W')``.
        """
        h = self.act(self.norm1(x))
        if self.resample is not None:
            x, h = self._resample(x), self._resample(h)
        h = self.conv1(h)
        t = self.time_emb_proj(temb_act)[:, :, None, None]
        if self.scale_shift:
            scale, shift = t.chunk(2, dim=1)
            h = torch.addcmul(shift, self.norm2(h), scale + 1)
        else:
            h = self.norm2(h.add_(t))  # conv1's output is not needed by its backward, so add in place
        h = self.act(h)
        if self.training and self.dropout.p > 0:
            h = self.dropout(h)
        h = self.conv2(h)
        h = h.add_(x if self.conv_shortcut is None else self.conv_shortcut(x))
        if self.output_scale_factor != 1:
            h = h.div_(self.output_scale_factor)
        return h


class SelfAttention(nn.Module):
    """Multi-head self-attention over the pixels with a residual connection (diffusers' ``Attention`` as built
    by ``AttnDownBlock2D``/``UNetMidBlock2D``: GroupNorm, q/k/v/out projections with bias, scaled dot product).

    Args:
        channels: feature channels.
        head_dim: channels per head (``channels // head_dim`` heads).
        groups: GroupNorm groups, or None for no norm (diffusers' mid block with scale_shift).
        eps: GroupNorm epsilon.
        output_scale_factor: the output is divided by this.
    """

    # Lets diffusers' loader rename pre-0.14 checkpoint keys (query/key/value/proj_attn) for this module.
    _from_deprecated_attn_block = True

    def __init__(self, channels: int, head_dim: int, groups: int | None, eps: float, output_scale_factor: float = 1.0):
        super().__init__()
        self.heads = channels // head_dim
        inner = self.heads * head_dim
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps) if groups is not None else None
        self.to_q = nn.Linear(channels, inner)
        self.to_k = nn.Linear(channels, inner)
        self.to_v = nn.Linear(channels, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, channels)])
        self.output_scale_factor = output_scale_factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend over the ``H * W`` positions of ``x`` ``(B, C, H, W)``; returns the same shape and memory format."""
        batch, channels, height, width = x.shape
        n = height * width
        h = self.group_norm(x) if self.group_norm is not None else x
        # 2-D tokens so that every projection is one addmm with its bias fused; a view for channels-last input.
        tokens = h.permute(0, 2, 3, 1).reshape(batch * n, channels)
        q, k, v = (proj(tokens).view(batch, n, self.heads, -1).transpose(1, 2)
                   for proj in (self.to_q, self.to_k, self.to_v))
        attn = F.scaled_dot_product_attention(q, k, v)
        out = self.to_out[0](attn.transpose(1, 2).reshape(batch * n, -1))
        # (B, HW, C) read as (B, C, H, W) is a channels-last view; adding it to x keeps x's memory format.
        out = torch.add(x, out.view(batch, n, channels).transpose(1, 2).view(batch, channels, height, width))
        if self.output_scale_factor != 1:
            out = out.div_(self.output_scale_factor)
        return out


class _CheckpointedBlock(nn.Module):
    """Base of the U-Net stages: diffusers' ModelMixin turns ``gradient_checkpointing`` on per stage."""

    def __init__(self):
        super().__init__()
        self.gradient_checkpointing = False

    def _resnet(self, resnet: ResnetBlock, x: torch.Tensor, temb_act: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(resnet, x, temb_act)
        return resnet(x, temb_act)


def _attentions(channels: int, head_dim: int | None, num_layers: int, resnet_kwargs: dict) -> nn.ModuleList | None:
    """One self-attention per ResNet block of a stage (diffusers' ``attentions``), or None without attention."""
    if head_dim is None:
        return None
    return nn.ModuleList(
        SelfAttention(channels, head_dim, resnet_kwargs["groups"], resnet_kwargs["eps"]) for _ in range(num_layers)
    )


def _resampler(kind: str | None, channels: int, direction: str, resnet_kwargs: dict,
               conv: Callable[[], nn.Module]) -> nn.ModuleList | None:
    """A stage's ``downsamplers``/``upsamplers``: the conv resampler, a resampling ResNet block, or None."""
    if kind == "conv":
        return nn.ModuleList([conv()])
    if kind == "resnet":
        return nn.ModuleList([ResnetBlock(channels, channels, resample=direction, **resnet_kwargs)])
    return None


class DownBlock(_CheckpointedBlock):
    """One encoder stage: ``num_layers`` ResNet blocks (each optionally followed by attention) and a downsampler.

    Covers diffusers' ``DownBlock2D`` (``head_dim=None``) and ``AttnDownBlock2D``.

    Args:
        in_channels, out_channels: channels into and out of the stage.
        num_layers: ResNet blocks in the stage.
        head_dim: attention head width, or None for no attention.
        downsample: None, "conv" or "resnet" (a ResNet block with 2x2 average pooling).
        downsample_padding: padding of the "conv" downsampler.
        resnet_kwargs: ``temb_channels, groups, eps, dropout, act_fn, time_scale_shift`` for every ResNet block.
    """

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, head_dim: int | None,
                 downsample: str | None, downsample_padding: int, resnet_kwargs: dict):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, **resnet_kwargs) for i in range(num_layers)
        )
        self.attentions = _attentions(out_channels, head_dim, num_layers, resnet_kwargs)
        self.downsamplers = _resampler(downsample, out_channels, "down", resnet_kwargs,
                                       lambda: Downsample(out_channels, downsample_padding))

    def forward(self, h: torch.Tensor, temb_act: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        """Run the stage on ``h``, appending every intermediate output to ``skips``; returns the last one."""
        for i, resnet in enumerate(self.resnets):
            h = self._resnet(resnet, h, temb_act)
            if self.attentions is not None:
                h = self.attentions[i](h)
            skips.append(h)
        if self.downsamplers is not None:
            down = self.downsamplers[0]
            h = self._resnet(down, h, temb_act) if isinstance(down, ResnetBlock) else down(h)
            skips.append(h)
        return h


class UpBlock(_CheckpointedBlock):
    """One decoder stage: ResNet blocks on [h, skip] concatenations (optionally with attention) and an upsampler.

    Covers diffusers' ``UpBlock2D`` (``head_dim=None``) and ``AttnUpBlock2D``.

    Args:
        in_channels: channels of the deepest skip this stage consumes (its last block's skip).
        prev_output_channel: channels coming from the stage below.
        out_channels: channels of this stage.
        num_layers: ResNet blocks (diffusers uses ``layers_per_block + 1``).
        head_dim: attention head width, or None for no attention.
        upsample: None, "conv" or "resnet" (a ResNet block with nearest 2x upsampling).
        resnet_kwargs: as for ``DownBlock``.
    """

    def __init__(self, in_channels: int, prev_output_channel: int, out_channels: int, num_layers: int,
                 head_dim: int | None, upsample: str | None, resnet_kwargs: dict):
        super().__init__()
        resnets = []
        for i in range(num_layers):
            skip_channels = in_channels if i == num_layers - 1 else out_channels
            resnet_in = prev_output_channel if i == 0 else out_channels
            resnets.append(ResnetBlock(resnet_in + skip_channels, out_channels, **resnet_kwargs))
        self.resnets = nn.ModuleList(resnets)
        self.attentions = _attentions(out_channels, head_dim, num_layers, resnet_kwargs)
        self.upsamplers = _resampler(upsample, out_channels, "up", resnet_kwargs, lambda: Upsample(out_channels))

    def forward(self, h: torch.Tensor, temb_act: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        """Run the stage, popping one skip connection from ``skips`` per ResNet block."""
        for i, resnet in enumerate(self.resnets):
            h = self._resnet(resnet, torch.cat([h, skips.pop()], dim=1), temb_act)
            if self.attentions is not None:
                h = self.attentions[i](h)
        if self.upsamplers is not None:
            up = self.upsamplers[0]
            h = self._resnet(up, h, temb_act) if isinstance(up, ResnetBlock) else up(h)
        return h


class MidBlock(_CheckpointedBlock):
    """The bottleneck: ResNet, (attention, ResNet) (diffusers' ``UNetMidBlock2D`` with one layer).

    Args:
        channels: feature channels.
        head_dim: attention head width, or None for no attention (``add_attention=False``).
        attn_groups: GroupNorm groups of the attention, or None for no norm.
        output_scale_factor: every ResNet and attention output is divided by this.
        resnet_kwargs: as for ``DownBlock``.
    """

    def __init__(self, channels: int, head_dim: int | None, attn_groups: int | None, output_scale_factor: float,
                 resnet_kwargs: dict):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(channels, channels, output_scale_factor=output_scale_factor, **resnet_kwargs) for _ in range(2)
        )
        if head_dim is not None:
            self.attentions = nn.ModuleList(
                [SelfAttention(channels, head_dim, attn_groups, resnet_kwargs["eps"], output_scale_factor)]
            )
        else:
            self.attentions = None

    def forward(self, h: torch.Tensor, temb_act: torch.Tensor) -> torch.Tensor:
        """Apply the bottleneck to ``h``."""
        h = self._resnet(self.resnets[0], h, temb_act)
        if self.attentions is not None:
            h = self.attentions[0](h)
        return self._resnet(self.resnets[1], h, temb_act)
