"""``UNet2DModel``: the DDPM epsilon-network, a faster drop-in for ``diffusers.UNet2DModel`` (0.42.1).

Same config arguments and defaults, same parameter names and shapes, same outputs (to float32 rounding), so a
diffusers checkpoint loads here with ``from_pretrained`` and ours loads in stock diffusers. Architecture: Ho et
al. 2020, Appendix B (PixelCNN++-style U-Net with wide-ResNet blocks, GroupNorm, sinusoidal time embedding and
self-attention at chosen resolutions).
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d import UNet2DOutput
from diffusers.utils import (CONFIG_NAME, SAFE_WEIGHTS_INDEX_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_INDEX_NAME,
                             WEIGHTS_NAME)
from torch import nn

from .blocks import DownBlock, MidBlock, UpBlock, activation, memory_format_of
from .config_checks import ConfigError, strip_legacy_prefix, validate_config
from .embeddings import GaussianFourierEmbedding, SinusoidalTimestepEmbedding, TimestepMLP
from .packed_conv import conv2d, set_prepacking

__all__ = ["UNet2DModel", "UNet2DOutput"]

_FLOAT32_MAX = torch.finfo(torch.float32).max
_INT64_MIN, _INT64_MAX = torch.iinfo(torch.int64).min, torch.iinfo(torch.int64).max


def _validate(config) -> None:
    """Check every config value before building anything (see ``config_checks``)."""
    try:
        validate_config(dict(config))
    except ConfigError as error:
        if error.key in config.get("_use_default_values", ()):
            raise type(error)(error.key, f"{error} (the default: the config does not set {error.key})") from None
        raise


def _with_variant(name: str, variant: str | None) -> str:
    # diffusers' file naming: the variant goes before the last extension (model.fp16.safetensors).
    if not variant:
        return name
    stem, extension = name.rsplit(".", 1)
    return f"{stem}.{variant}.{extension}"


def _weights_file(folder: str, variant: str | None, use_safetensors: bool | None) -> str:
    """The weights file ``from_pretrained`` read in ``folder``: the first that exists, in diffusers' order."""
    names = [SAFETENSORS_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME]
    if use_safetensors is False:
        names = names[2:]
    paths = [os.path.join(folder, _with_variant(name, variant)) for name in names]
    return next((path for path in paths if os.path.isfile(path)), paths[0])


def _is_shape_mismatch(error: Exception) -> bool:
    # diffusers 0.42.1 reports a shape mismatch as ValueError (low_cpu_mem_usage=True, the default) or as
    # torch's RuntimeError "size mismatch" (low_cpu_mem_usage=False), neither naming the file.
    if isinstance(error, ValueError):
        return "expected shape" in str(error)
    return isinstance(error, RuntimeError) and "size mismatch" in str(error)


class UNet2DModel(ModelMixin, ConfigMixin):
    r"""The DDPM U-Net: predicts the noise (or x0 / v) of a noisy image at timestep t.

    A re-implementation of ``diffusers.UNet2DModel`` for the DDPM family with identical config, parameter names
    and outputs, tuned for speed. Config arguments are those of diffusers 0.42.1 with the same defaults; values
    this class does not build exactly (other block types, ``downsample_type`` other than "conv"/"resnet", ...)
    raise ValueError instead of giving a different network, and wrongly typed values raise TypeError; both name
    the key and the allowed values, at construction (diffusers fails later, or with torch's message).

    Args:
        sample_size: height and width of the samples (metadata only, used by pipelines).
        in_channels: channels of the input sample.
        out_channels: channels of the output (``2 * in_channels`` for learned variance).
        center_input_sample: map the input from [0, 1] to [-1, 1] first.
        time_embedding_type: "positional" (sinusoidal), "fourier" (Gaussian Fourier features of log t, output
            divided by t) or "learned" (an embedding table of ``num_train_timesteps`` rows).
        time_embedding_dim: width of the time embedding; defaults to ``4 * block_out_channels[0]``.
        freq_shift: sinusoidal frequency shift (1 for the DDPM paper's TF code).
        flip_sin_to_cos: put cosines before sines in the sinusoidal embedding.
        down_block_types: per stage, "DownBlock2D" or "AttnDownBlock2D" (with self-attention).
        mid_block_type: "UNetMidBlock2D" or None.
        up_block_types: per stage, "UpBlock2D" or "AttnUpBlock2D".
        block_out_channels: channels of each stage.
        layers_per_block: ResNet blocks per encoder stage (decoder stages get one more).
        mid_block_scale_factor: divisor of the mid block's residual outputs.
        downsample_padding: padding of the stride-2 downsampling conv; 0 pads right/bottom only (TF DDPM).
        downsample_type: "conv" or "resnet" downsampling in attention stages.
        upsample_type: "conv" or "resnet" upsampling in attention stages.
        dropout: dropout inside every ResNet block (0.1 in the DDPM CIFAR-10 recipe).
        act_fn: activation of the ResNet blocks ("silu"/"swish", "mish", "gelu", "relu").
        attention_head_dim: channels per attention head; None for a single head over all channels.
        norm_num_groups: GroupNorm groups.
        attn_norm_num_groups: GroupNorm groups of the mid-block attention; None means ``norm_num_groups`` with
            ``resnet_time_scale_shift="default"`` and no norm with "scale_shift" (as diffusers).
        norm_eps: GroupNorm epsilon.
        resnet_time_scale_shift: "default" (add the time embedding) or "scale_shift" (FiLM after the norm).
        add_attention: whether the mid block has attention.
        class_embed_type: None (an ``nn.Embedding`` of ``num_class_embeds`` labels if that is set), "timestep"
            (labels embedded like timesteps) or "identity" (labels are embeddings already).
        num_class_embeds: number of classes for class-conditional models.
        num_train_timesteps: rows of the "learned" time embedding.
    """

    _supports_gradient_checkpointing = True
    _prepack = False  # see enable_weight_prepacking; a class default also covers models pickled before it existed
    _skip_layerwise_casting_patterns = ["norm"]

    @register_to_config
    def __init__(
        self,
        sample_size: int | tuple[int, int] | None = None,
        in_channels: int = 3,
        out_channels: int = 3,
        center_input_sample: bool = False,
        time_embedding_type: str = "positional",
        time_embedding_dim: int | None = None,
        freq_shift: int = 0,
        flip_sin_to_cos: bool = True,
        down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        mid_block_type: str | None = "UNetMidBlock2D",
        up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        block_out_channels: tuple[int, ...] = (224, 448, 672, 896),
        layers_per_block: int = 2,
        mid_block_scale_factor: float = 1,
        downsample_padding: int = 1,
        downsample_type: str = "conv",
        upsample_type: str = "conv",
        dropout: float = 0.0,
        act_fn: str = "silu",
        attention_head_dim: int | None = 8,
        norm_num_groups: int = 32,
        attn_norm_num_groups: int | None = None,
        norm_eps: float = 1e-5,
        resnet_time_scale_shift: str = "default",
        add_attention: bool = True,
        class_embed_type: str | None = None,
        num_class_embeds: int | None = None,
        num_train_timesteps: int | None = None,
    ):
        super().__init__()
        _validate(self.config)
        channels = list(block_out_channels)
        time_embed_dim = time_embedding_dim or 4 * channels[0]
        self.sample_size = sample_size
        self.conv_in = conv2d(in_channels, channels[0], 3, padding=1)
        self.time_proj, proj_dim = self._build_time_proj(time_embedding_type, channels[0], flip_sin_to_cos,
                                                         freq_shift, num_train_timesteps)
        self.time_embedding = TimestepMLP(proj_dim, time_embed_dim)
        self.class_embedding = self._build_class_embedding(class_embed_type, num_class_embeds, proj_dim,
                                                           time_embed_dim)
        self.act = activation(act_fn)
        # Plain attributes: reading the FrozenDict config on every call costs more than the branch itself.
        self._center_input_sample = center_input_sample
        self._fourier = time_embedding_type == "fourier"
        self._class_labels_as_timesteps = class_embed_type == "timestep"

        resnet_kwargs = dict(temb_channels=time_embed_dim, groups=norm_num_groups, eps=norm_eps, dropout=dropout,
                             act_fn=act_fn, time_scale_shift=resnet_time_scale_shift)
        down_types = [strip_legacy_prefix(t) for t in down_block_types]
        up_types = [strip_legacy_prefix(t) for t in up_block_types]
        last = len(channels) - 1

        self.down_blocks = nn.ModuleList()
        for i, block_type in enumerate(down_types):
            attn = block_type == "AttnDownBlock2D"
            downsample = None if i == last else (downsample_type if attn else "conv")
            self.down_blocks.append(DownBlock(
                channels[max(i - 1, 0)], channels[i], layers_per_block,
                self._head_dim(attention_head_dim, channels[i]) if attn else None,
                downsample, downsample_padding, resnet_kwargs))

        self.mid_block = None
        if mid_block_type is not None:
            attn_groups = attn_norm_num_groups
            if attn_groups is None and resnet_time_scale_shift == "default":
                attn_groups = norm_num_groups
            self.mid_block = MidBlock(
                channels[-1], self._head_dim(attention_head_dim, channels[-1]) if add_attention else None,
                attn_groups, mid_block_scale_factor, resnet_kwargs)

        self.up_blocks = nn.ModuleList()
        reversed_channels = channels[::-1]
        for i, block_type in enumerate(up_types):
            attn = block_type == "AttnUpBlock2D"
            upsample = None if i == last else (upsample_type if attn else "conv")
            self.up_blocks.append(UpBlock(
                reversed_channels[min(i + 1, last)], reversed_channels[max(i - 1, 0)], reversed_channels[i],
                layers_per_block + 1, self._head_dim(attention_head_dim, reversed_channels[i]) if attn else None,
                upsample, resnet_kwargs))

        self.conv_norm_out = nn.GroupNorm(norm_num_groups, channels[0], eps=norm_eps)
        self.conv_out = conv2d(channels[0], out_channels, 3, padding=1)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "UNet2DModel":
        """Load a saved model as diffusers' ``ModelMixin.from_pretrained`` does (same arguments).

        Errors that diffusers raises without naming a file are re-raised naming it: a config value this class
        cannot build (including a key missing from config.json whose default does not fit the rest) gives a
        ValueError/TypeError naming config.json, weights of another config give a ValueError naming the weights.

        Args:
            pretrained_model_name_or_path: a local folder or a Hub repo id.
            **kwargs: passed on to ``ModelMixin.from_pretrained`` (``subfolder``, ``variant``, ``torch_dtype``, ...).

        Returns:
            The loaded ``UNet2DModel``, in eval mode.
        """
        folder = os.path.join(os.fspath(pretrained_model_name_or_path), kwargs.get("subfolder") or "")
        config_file = os.path.join(folder, CONFIG_NAME)
        try:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        except ConfigError as error:
            raise type(error)(error.key, f"{config_file}: {error}") from error
        except (ValueError, RuntimeError) as error:
            if not _is_shape_mismatch(error):
                raise
            weights = _weights_file(folder, kwargs.get("variant"), kwargs.get("use_safetensors"))
            raise ValueError(f"{weights}: the weights do not fit the config in {config_file} (a checkpoint of "
                             f"another model config?): {error}") from error

    def enable_weight_prepacking(self) -> None:
        """Run CPU inference on convolution weights packed once for oneDNN (see ``models/packed_conv.py``).

        Opt-in: it keeps an extra copy of every conv weight (per dtype used) and changes only how the same
        convolutions are computed (outputs agree with the default path to float rounding). It applies under
        ``torch.no_grad``/``torch.inference_mode`` on CPU in fp32, bf16 or bf16 autocast, outside
        ``torch.compile``; training and gradients always use the default path. Packs follow weight updates made
        through autograd-visible in-place ops and replacements; after writing weights through ``param.data``,
        call this again (it drops every pack). Parameters, ``state_dict`` and saving are unaffected.
        """
        self._prepack = True
        set_prepacking(self, True)

    def disable_weight_prepacking(self) -> None:
        """Go back to plain ``F.conv2d`` calls and free the packed weights."""
        self._prepack = False
        set_prepacking(self, False)

    @staticmethod
    def _head_dim(attention_head_dim: int | None, channels: int) -> int:
        return attention_head_dim if attention_head_dim is not None else channels

    @staticmethod
    def _build_time_proj(kind: str, channels: int, flip_sin_to_cos: bool, freq_shift: float,
                         num_train_timesteps: int | None) -> tuple[nn.Module, int]:
        if kind == "positional":
            return SinusoidalTimestepEmbedding(channels, flip_sin_to_cos, freq_shift), channels
        if kind == "fourier":
            return GaussianFourierEmbedding(channels, scale=16), 2 * channels
        return nn.Embedding(num_train_timesteps, channels), channels

    @staticmethod
    def _build_class_embedding(kind: str | None, num_class_embeds: int | None, proj_dim: int,
                               time_embed_dim: int) -> nn.Module | None:
        if kind is None:
            return nn.Embedding(num_class_embeds, time_embed_dim) if num_class_embeds is not None else None
        if kind == "timestep":
            return TimestepMLP(proj_dim, time_embed_dim)
        return nn.Identity()

    def _timesteps(self, timestep, sample: torch.Tensor) -> torch.Tensor:
        """Return the timesteps as a 1-D tensor of length ``batch`` on the sample's device."""
        batch = sample.shape[0]
        if not torch.is_tensor(timestep):
            if isinstance(timestep, bool) or not isinstance(timestep, (int, float)):
                raise TypeError(f"timestep must be an int, a float or a tensor, got {type(timestep).__name__}")
            if isinstance(timestep, float) and not (math.isfinite(timestep) and abs(timestep) <= _FLOAT32_MAX):
                raise ValueError(f"timestep must be finite in float32, got {timestep!r}")
            if isinstance(timestep, int) and not _INT64_MIN <= timestep <= _INT64_MAX:
                raise ValueError(f"timestep must fit in int64, got {timestep!r}")
            # Unlike diffusers, which casts every Python number to long, a fractional float stays fractional.
            dtype = torch.long if isinstance(timestep, int) else torch.float32
            return torch.full((batch,), timestep, dtype=dtype, device=sample.device)
        if timestep.dim() > 1 or timestep.numel() not in (1, batch):
            raise ValueError(f"timestep must be a scalar or have shape ({batch},), got {tuple(timestep.shape)}")
        if timestep.dtype == torch.bool or timestep.is_complex():
            raise ValueError(f"timestep must have an integer or floating dtype, got {timestep.dtype}")
        # Only float tensors can hold NaN/inf; checking integer ones would cost a device sync per step for nothing.
        # The check is skipped under torch.compile, where a data-dependent branch would break the graph.
        if timestep.is_floating_point() and not torch.compiler.is_compiling() \
                and not torch.isfinite(timestep.float()).all():
            raise ValueError(f"timestep must be finite in float32 (the embedding's precision), got {timestep}")
        return timestep.reshape(-1).to(sample.device).expand(batch)

    def _check_sample(self, sample: torch.Tensor) -> None:
        in_channels = self.conv_in.in_channels
        if not torch.is_tensor(sample) or sample.dim() != 4 or sample.shape[1] != in_channels:
            shape = tuple(sample.shape) if torch.is_tensor(sample) else type(sample).__name__
            raise ValueError(f"sample must be a (batch, {in_channels}, height, width) tensor, got {shape}")
        if not sample.is_floating_point():
            raise ValueError(f"sample must be a floating-point tensor, got dtype {sample.dtype}")
        factor = 2 ** (len(self.down_blocks) - 1)
        if sample.shape[2] % factor or sample.shape[3] % factor:
            raise ValueError(f"sample height and width must be multiples of {factor}, got {tuple(sample.shape[2:])}")

    def _embed(self, timesteps: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        """The time (plus class) embedding fed to every ResNet block, ``(B, time_embed_dim)``."""
        dtype = self.time_embedding.linear_1.weight.dtype
        emb = self.time_embedding(self.time_proj(timesteps).to(dtype))
        if self.class_embedding is None:
            if class_labels is not None:
                raise ValueError("class_labels were given but this model has no class embedding "
                                 "(set num_class_embeds or class_embed_type in the config)")
            return emb
        if class_labels is None:
            raise ValueError("class_labels must be given: this model is class-conditional")
        if self._class_labels_as_timesteps:
            class_labels = self.time_proj(class_labels).to(dtype)
        return emb + self.class_embedding(class_labels).to(emb.dtype)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> UNet2DOutput | tuple:
        """Predict the network output for a batch of noisy samples.

        Args:
            sample: ``(batch, in_channels, height, width)`` noisy input; height and width must be multiples of
                ``2 ** (len(block_out_channels) - 1)``.
            timestep: one timestep for the whole batch (Python number or 0-d/1-element tensor) or one per sample.
            class_labels: ``(batch,)`` labels for class-conditional models.
            return_dict: return a ``UNet2DOutput`` instead of a one-element tuple.

        Returns:
            ``UNet2DOutput`` with ``sample`` of shape ``(batch, out_channels, height, width)``, or ``(sample,)``.
        """
        self._check_sample(sample)
        timesteps = self._timesteps(timestep, sample)
        if self._center_input_sample:
            sample = 2 * sample - 1.0
        temb_act = self.act(self._embed(timesteps, class_labels))

        h = self.conv_in(sample)
        skips = [h]
        for block in self.down_blocks:
            h = block(h, temb_act, skips)
        if self.mid_block is not None:
            h = self.mid_block(h, temb_act)
        for block in self.up_blocks:
            h = block(h, temb_act, skips)
        h = self.conv_out(F.silu(self.conv_norm_out(h), inplace=True))  # diffusers' conv_act is SiLU for any act_fn

        if self._fourier:
            h = h / timesteps.reshape(-1, 1, 1, 1)
        if self._prepack:  # packed convs return channels-last maps; hand back the caller's layout
            h = h.contiguous(memory_format=memory_format_of(sample))
        if not return_dict:
            return (h,)
        return UNet2DOutput(sample=h)
