"""The DDPM epsilon-network: ``UNet2DModel``, a faster drop-in for diffusers' class of the same name."""

from .presets import UNET_PRESETS
from .unet_2d import UNet2DModel, UNet2DOutput

__all__ = ["UNET_PRESETS", "UNet2DModel", "UNet2DOutput"]
