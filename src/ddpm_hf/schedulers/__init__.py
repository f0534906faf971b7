"""Drop-in DDPM and DDIM schedulers: diffusers' config keys and API over the float64 core in ``diffusion_math``."""

from .scheduling_ddim import DDIMScheduler, DDIMSchedulerOutput
from .scheduling_ddpm import DDPMScheduler, DDPMSchedulerOutput

__all__ = ["DDIMScheduler", "DDIMSchedulerOutput", "DDPMScheduler", "DDPMSchedulerOutput"]
