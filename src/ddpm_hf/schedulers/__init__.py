"""Drop-in DDPM and DDIM schedulers: diffusers' config keys and API over the float64 core in ``diffusion_math``,
and the registry that gives every scheduler (ours or diffusers') the contract the pipeline uses."""

from .contract import SchedulerContract
from .registry import SCHEDULERS, contract_for, deterministic_ddim, scheduler_class, to_ddpm_hf_scheduler
from .scheduling_ddim import DDIMScheduler, DDIMSchedulerOutput
from .scheduling_ddpm import DDPMScheduler, DDPMSchedulerOutput

__all__ = [
    "DDIMScheduler",
    "DDIMSchedulerOutput",
    "DDPMScheduler",
    "DDPMSchedulerOutput",
    "SCHEDULERS",
    "SchedulerContract",
    "contract_for",
    "deterministic_ddim",
    "scheduler_class",
    "to_ddpm_hf_scheduler",
]
