"""Validation of ``UNet2DModel`` config values: every bad value fails at construction, naming its key.

diffusers builds whatever it is given and fails later (a ``ZeroDivisionError`` for ``attn_norm_num_groups=0``, a
torch ``TypeError`` at the first forward for ``norm_eps=None``) or with a message that does not name the key.
Here a wrongly typed value raises ``ConfigTypeError`` (a ``TypeError``) and a value of the right type that this
class cannot build exactly raises ``ConfigValueError`` (a ``ValueError``); both name the key and what is allowed,
and carry the key in ``.key`` so that ``from_pretrained`` can add the config file to the message.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

from ..validation import is_finite_real, is_int, is_real
from .blocks import ACTIVATIONS

DOWN_BLOCK_TYPES = ("DownBlock2D", "AttnDownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "AttnUpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2D", None)
TIME_EMBEDDING_TYPES = ("positional", "fourier", "learned")
CLASS_EMBED_TYPES = (None, "timestep", "identity")
RESAMPLE_TYPES = ("conv", "resnet")
TIME_SCALE_SHIFTS = ("default", "scale_shift")


class ConfigError(Exception):
    """Base of the config errors below; ``key`` is the config key whose value is wrong."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


class ConfigValueError(ConfigError, ValueError):
    """A config value of the right type that ``UNet2DModel`` cannot build exactly."""


class ConfigTypeError(ConfigError, TypeError):
    """A config value of the wrong type."""


def strip_legacy_prefix(block_type: Any) -> Any:
    """Map diffusers' old "UNetRes" block names to the current ones (UNetResDownBlock2D == DownBlock2D)."""
    if isinstance(block_type, str) and block_type.startswith("UNetRes"):
        return block_type[len("UNetRes"):]
    return block_type


def _choice(cfg: dict, key: str, allowed: tuple) -> None:
    if cfg[key] not in allowed:
        raise ConfigValueError(key, f"{key}={cfg[key]!r} is not supported by ddpm_hf.UNet2DModel; "
                                    f"allowed: {list(allowed)}")


def _bool(cfg: dict, key: str) -> None:
    if not isinstance(cfg[key], bool):
        raise ConfigTypeError(key, f"{key}={cfg[key]!r} must be a bool (True or False)")


def _int(cfg: dict, key: str, minimum: int, optional: bool = False) -> None:
    value = cfg[key]
    if optional and value is None:
        return
    allowed = f"an int >= {minimum}" + (" or None" if optional else "")
    if not is_int(value):
        raise ConfigTypeError(key, f"{key}={value!r} must be {allowed}")
    if value < minimum:
        raise ConfigValueError(key, f"{key}={value!r} must be {allowed}")


def _number(cfg: dict, key: str, low: float = -math.inf, high: float = math.inf, low_inclusive: bool = True) -> None:
    value = cfg[key]
    bounds = [f">{'=' if low_inclusive else ''} {low}"] if low > -math.inf else []
    bounds += [f"< {high}"] if high < math.inf else []
    allowed = " and ".join(["a finite number"] + bounds)
    if not is_real(value):
        raise ConfigTypeError(key, f"{key}={value!r} must be {allowed}")
    if not (is_finite_real(value) and (value >= low if low_inclusive else value > low) and value < high):
        raise ConfigValueError(key, f"{key}={value!r} must be {allowed}")


def _block_types(cfg: dict, key: str, allowed: tuple) -> list:
    value = cfg[key]
    if not isinstance(value, (list, tuple)):
        raise ConfigTypeError(key, f"{key}={value!r} must be a list of block names from {list(allowed)}")
    types = [strip_legacy_prefix(t) for t in value]
    for i, block_type in enumerate(types):
        if block_type not in allowed:
            raise ConfigValueError(key, f"{key}[{i}]={block_type!r} is not supported by ddpm_hf.UNet2DModel; "
                                        f"allowed: {list(allowed)}")
    return types


def _channels(cfg: dict, stages: int) -> list[int]:
    value = cfg["block_out_channels"]
    if not isinstance(value, (list, tuple)) or not all(is_int(c) for c in value):
        raise ConfigTypeError("block_out_channels", f"block_out_channels={value!r} must be a list of positive ints")
    if any(c < 1 for c in value):
        raise ConfigValueError("block_out_channels", f"block_out_channels={list(value)} must be positive ints")
    if len(value) != stages or not value:
        raise ConfigValueError("block_out_channels", f"block_out_channels={list(value)} must have one entry per "
                                                     f"down block ({stages} down_block_types), at least one")
    return list(value)


def _sample_size(cfg: dict) -> None:
    value = cfg["sample_size"]
    pair = isinstance(value, (list, tuple)) and len(value) == 2 and all(is_int(v) for v in value)
    if value is None or is_int(value) or pair:
        sizes = [] if value is None else (list(value) if pair else [value])
        if all(s >= 1 for s in sizes):
            return
        raise ConfigValueError("sample_size", f"sample_size={value!r} must be positive")
    raise ConfigTypeError("sample_size", f"sample_size={value!r} must be None, an int or a (height, width) pair")


def _check_scalars(cfg: dict) -> None:
    """Type and range of every key that stands alone."""
    _sample_size(cfg)
    for key in ("in_channels", "out_channels", "layers_per_block", "norm_num_groups"):
        _int(cfg, key, 1)
    for key in ("time_embedding_dim", "num_class_embeds", "num_train_timesteps", "attn_norm_num_groups"):
        _int(cfg, key, 1, optional=True)
    _int(cfg, "downsample_padding", 0)
    for key in ("center_input_sample", "flip_sin_to_cos", "add_attention"):
        _bool(cfg, key)
    for key, allowed in (("mid_block_type", MID_BLOCK_TYPES), ("time_embedding_type", TIME_EMBEDDING_TYPES),
                         ("class_embed_type", CLASS_EMBED_TYPES), ("resnet_time_scale_shift", TIME_SCALE_SHIFTS),
                         ("downsample_type", RESAMPLE_TYPES), ("upsample_type", RESAMPLE_TYPES)):
        _choice(cfg, key, allowed)
    if not isinstance(cfg["act_fn"], str) or cfg["act_fn"].lower() not in ACTIVATIONS:
        raise ConfigValueError("act_fn", f"act_fn={cfg['act_fn']!r} is not supported by ddpm_hf.UNet2DModel; "
                                         f"allowed: {list(ACTIVATIONS)}")
    _number(cfg, "freq_shift")
    _number(cfg, "dropout", 0.0, 1.0)
    _number(cfg, "mid_block_scale_factor", 0.0, low_inclusive=False)
    _number(cfg, "norm_eps", 0.0, low_inclusive=False)


def _attended_channels(cfg: dict, channels: list[int], down: list, up: list) -> list[int]:
    attended = [c for c, t in zip(channels, down) if t.startswith("Attn")]
    attended += [c for c, t in zip(channels[::-1], up) if t.startswith("Attn")]
    if cfg["mid_block_type"] is not None and cfg["add_attention"]:
        attended.append(channels[-1])
    return attended


def normalised_channels(channels: list[int], layers_per_block: int) -> set[int]:
    """Every channel count a GroupNorm sees: the stage widths and the decoder's [h, skip] concatenations."""
    widths = set(channels)
    reversed_channels = channels[::-1]
    for i, out in enumerate(reversed_channels):
        prev = reversed_channels[max(i - 1, 0)]
        deepest_skip = reversed_channels[min(i + 1, len(channels) - 1)]
        for j in range(layers_per_block + 1):
            skip = deepest_skip if j == layers_per_block else out
            widths.add((prev if j == 0 else out) + skip)
    return widths


def _check_groups(key: str, groups: int, channels: Iterable[int], block_out_channels: list[int]) -> None:
    for c in sorted(channels):
        if c % groups:
            raise ConfigValueError(key, f"{key}={groups} must divide every channel count a GroupNorm sees; "
                                        f"block_out_channels={block_out_channels} gives {c}")


def _check_relations(cfg: dict) -> None:
    """Keys that constrain each other: block lists and channels, heads, groups, embeddings."""
    down = _block_types(cfg, "down_block_types", DOWN_BLOCK_TYPES)
    up = _block_types(cfg, "up_block_types", UP_BLOCK_TYPES)
    if len(down) != len(up):
        raise ConfigValueError("up_block_types", f"down_block_types ({len(down)}) and up_block_types ({len(up)}) "
                                                 "must have the same length")
    channels = _channels(cfg, len(down))
    if cfg["time_embedding_type"] == "learned" and cfg["num_train_timesteps"] is None:
        raise ConfigValueError("num_train_timesteps", "num_train_timesteps=None must be a positive int when "
                                                      "time_embedding_type='learned'")
    half = channels[0] // 2
    if cfg["time_embedding_type"] == "positional" and not cfg["freq_shift"] < half:
        # Above half the sinusoid's frequencies grow as 10000 ** (i / (freq_shift - half)) and overflow to inf.
        raise ConfigValueError("freq_shift", f"freq_shift={cfg['freq_shift']!r} must be below "
                                             f"block_out_channels[0] // 2 = {half}")
    head_dim = cfg["attention_head_dim"]
    widest = min(_attended_channels(cfg, channels, down, up), default=None)
    if head_dim is not None and not is_int(head_dim):
        raise ConfigTypeError("attention_head_dim", f"attention_head_dim={head_dim!r} must be None or an int")
    if head_dim is not None and (head_dim < 1 or (widest is not None and head_dim > widest)):
        raise ConfigValueError("attention_head_dim", f"attention_head_dim={head_dim!r} must be None or an int in "
                                                     f"[1, {widest}] (the narrowest attention stage)")
    _check_groups("norm_num_groups", cfg["norm_num_groups"], normalised_channels(channels, cfg["layers_per_block"]),
                  channels)
    if cfg["attn_norm_num_groups"] is not None:
        _check_groups("attn_norm_num_groups", cfg["attn_norm_num_groups"], channels[-1:], channels)


def validate_config(cfg: dict) -> None:
    """Raise ``ConfigTypeError``/``ConfigValueError`` naming the first key whose value is wrong.

    Args:
        cfg: the full ``UNet2DModel`` config (every ``__init__`` argument).
    """
    _check_scalars(cfg)
    _check_relations(cfg)
