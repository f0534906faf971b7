"""ddpm_hf: DDPM and DDIM for the Hugging Face ecosystem, drop-in for diffusers' classes of the same names."""

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:  # the import graph as static tools and IDEs should see it
    from .models import UNet2DModel
    from .pipeline import DDPMPipeline
    from .schedulers import DDIMScheduler, DDPMScheduler

# At run time the public names resolve lazily: `import ddpm_hf.data` (the training data path) then does not pay
# for importing diffusers' pipeline machinery.
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
