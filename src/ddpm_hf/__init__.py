"""ddpm_hf: DDPM and DDIM for the Hugging Face ecosystem, drop-in for diffusers' classes of the same names."""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# Public names resolve lazily so that importing the package stays cheap and each part loads on first use.
_EXPORTS = {
    "DDPMScheduler": "ddpm_hf.schedulers",
    "DDIMScheduler": "ddpm_hf.schedulers",
    "UNet2DModel": "ddpm_hf.models",
    "DDPMPipeline": "ddpm_hf.pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ddpm_hf' has no attribute {name!r}")
