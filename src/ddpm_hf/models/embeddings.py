"""Timestep embeddings of the DDPM U-Net, parameter-compatible with diffusers' ``embeddings.py``.

DDPM (Ho et al. 2020, Appendix B) conditions every residual block on t through the Transformer sinusoidal
position embedding (Vaswani et al. 2017, Sec. 3.5) followed by a two-layer MLP.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_MAX_PERIOD = 10000


def sinusoidal_frequencies(num_channels: int, freq_shift: float, device: torch.device | None = None) -> torch.Tensor:
    """Return the float32 frequencies ``exp(-ln(10000) * i / (half - freq_shift))``, ``i < num_channels // 2``.

    Args:
        num_channels: width of the embedding; half of it gets sines and half cosines.
        freq_shift: diffusers' ``freq_shift`` (1 reproduces the TF DDPM code, 0 the Transformer paper).
        device: where to build the table.

    Returns:
        A float32 tensor of shape ``(num_channels // 2,)``.
    """
    half = num_channels // 2
    exponent = torch.arange(half, dtype=torch.float32, device=device) * (-math.log(_MAX_PERIOD))
    return torch.exp(exponent / (half - freq_shift))


class SinusoidalTimestepEmbedding(nn.Module):
    """Sinusoidal embedding of (possibly fractional) timesteps; diffusers' ``Timesteps`` with scale 1.

    The frequency table is built once at init (float32, never saved) instead of on every call.

    Args:
        num_channels: output width.
        flip_sin_to_cos: put the cosines first (diffusers' default) instead of the sines.
        freq_shift: see ``sinusoidal_frequencies``.
    """

    def __init__(self, num_channels: int, flip_sin_to_cos: bool, freq_shift: float):
        super().__init__()
        if num_channels // 2 - freq_shift == 0:
            raise ValueError(f"freq_shift={freq_shift!r} must differ from block_out_channels[0] // 2")
        self.num_channels = num_channels
        self.flip_sin_to_cos = flip_sin_to_cos
        self.freq_shift = freq_shift
        self.register_buffer("frequencies", sinusoidal_frequencies(num_channels, freq_shift), persistent=False)

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Embed a 1-D tensor of timesteps into a float32 ``(len(timesteps), num_channels)`` tensor."""
        freqs = self.frequencies
        if freqs.dtype != torch.float32:  # a model cast to half precision would otherwise round the table
            freqs = sinusoidal_frequencies(self.num_channels, self.freq_shift, timesteps.device)
        args = timesteps.float()[:, None] * freqs[None, :]
        sin, cos = torch.sin(args), torch.cos(args)
        emb = torch.cat([cos, sin] if self.flip_sin_to_cos else [sin, cos], dim=-1)
        if self.num_channels % 2:
            emb = F.pad(emb, (0, 1))
        return emb


class GaussianFourierEmbedding(nn.Module):
    """Random Fourier features of log(t) (Song et al. 2021, score SDE); diffusers' ``GaussianFourierProjection``.

    Args:
        embedding_size: number of random frequencies (the output has twice as many channels).
        scale: standard deviation of the frequencies at init.
    """

    def __init__(self, embedding_size: int, scale: float = 16.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(embedding_size) * scale, requires_grad=False)

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Embed positive timesteps into ``(len(timesteps), 2 * embedding_size)``."""
        proj = torch.log(timesteps)[:, None] * self.weight[None, :] * (2 * math.pi)
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)


class TimestepMLP(nn.Module):
    """The two-layer SiLU MLP applied to the timestep embedding (parameter names of diffusers' TimestepEmbedding).

    Args:
        in_channels: width of the sinusoidal embedding.
        time_embed_dim: hidden and output width.
    """

    def __init__(self, in_channels: int, time_embed_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        """Map ``(B, in_channels)`` to ``(B, time_embed_dim)``."""
        return self.linear_2(F.silu(self.linear_1(emb), inplace=True))
