"""``SchedulerContract`` for diffusers' own schedulers (DPMSolverMultistep, UniPC, Euler, Heun, DDPM, DDIM, ...).

The adapter reads, once when it is built, which keywords the wrapped scheduler's ``step`` and ``set_timesteps``
take, so that nothing downstream inspects signatures: ``generator`` is passed only where ``step`` takes one (UniPC
is deterministic and takes none), ``eta`` only to DDIM-like steps, custom ``timesteps`` only where
``set_timesteps`` accepts them.
"""

from __future__ import annotations

import functools
import inspect
import json
from typing import Any, Sequence

import torch
from diffusers import SchedulerMixin

from .contract import Generator, build_step_kwargs, config_json, inference_arguments

# Default inference steps per diffusers class (None = the full chain of T steps), at most T. DDPM is ancestral
# sampling over the whole chain; DDIM follows diffusers' DDIMPipeline (50). DPM-Solver(++) "with only 20 steps
# can generate high-quality samples" (diffusers' DPMSolverMultistepScheduler docs; Lu et al. 2022), and UniPC
# targets fewer steps still (Zhao et al. 2023: 5-10), so 20 for both; without a step count diffusers' own
# pipeline loop ran DPMSolverMultistep over 1000 steps and failed with an IndexError. Heun makes two network
# calls per step, so 25 costs Euler's 50. Any other diffusers scheduler: 50.
DEFAULT_STEPS: dict[str, int | None] = {
    "DDPMScheduler": None,
    "DDIMScheduler": 50,
    "DPMSolverMultistepScheduler": 20,
    "UniPCMultistepScheduler": 20,
    "EulerDiscreteScheduler": 50,
    "HeunDiscreteScheduler": 25,
}
OTHER_DEFAULT_STEPS = 50


class DiffusersSchedulerAdapter:
    """The contract over a diffusers ``SchedulerMixin`` whose ``step(model_output, timestep, sample, ...)`` API
    diffusers' pipelines use.

    Args:
        scheduler: the diffusers scheduler (kept as ``self.scheduler``; its state is the sampling state).
    """

    def __init__(self, scheduler: SchedulerMixin):
        if not isinstance(scheduler, SchedulerMixin):
            raise TypeError(f"scheduler must be a diffusers SchedulerMixin, got {type(scheduler).__name__}")
        self.scheduler = scheduler
        self.stock_class_name = type(scheduler).__name__
        step = inspect.signature(scheduler.step).parameters
        if list(step)[:3] != ["model_output", "timestep", "sample"]:
            raise TypeError(f"{self.stock_class_name}.step must take (model_output, timestep, sample, ...) like "
                            f"diffusers' sampling schedulers, got ({', '.join(step)})")
        self._step_keywords = frozenset(step)
        set_timesteps = inspect.signature(scheduler.set_timesteps).parameters
        self._custom_timesteps = "timesteps" in set_timesteps
        self._takes_device = "device" in set_timesteps

    @property
    def init_noise_sigma(self) -> float | torch.Tensor:
        """The scale of the initial noise (Euler/Heun: sigma_max-like; read it after ``set_inference_timesteps``)."""
        return self.scheduler.init_noise_sigma

    @property
    def timesteps(self) -> torch.Tensor:
        """The wrapped scheduler's current table."""
        return self.scheduler.timesteps

    def default_num_inference_steps(self) -> int:
        """``DEFAULT_STEPS`` for the class (``OTHER_DEFAULT_STEPS`` if unlisted), at most num_train_timesteps."""
        num_train = self.scheduler.config.get("num_train_timesteps", 1000)
        steps = DEFAULT_STEPS.get(self.stock_class_name, OTHER_DEFAULT_STEPS)
        return num_train if steps is None else min(steps, num_train)

    def set_inference_timesteps(self, num_inference_steps: int | None = None, timesteps: Sequence[int] | None = None,
                                device: str | torch.device | None = None) -> torch.Tensor:
        """Check the arguments, apply the default, call the scheduler's ``set_timesteps``.

        Returns:
            the scheduler's ``timesteps``.
        """
        steps, custom = inference_arguments(num_inference_steps, timesteps, self.default_num_inference_steps(),
                                            self._custom_timesteps, self.stock_class_name)
        kwargs: dict[str, Any] = {"device": device} if device is not None and self._takes_device else {}
        if custom is not None:
            self.scheduler.set_timesteps(timesteps=custom, **kwargs)
        else:
            self.scheduler.set_timesteps(steps, **kwargs)
        return self.scheduler.timesteps

    def step_kwargs(self, *, eta: float = 0.0, use_clipped_model_output: bool | None = None,
                    generator: Generator = None) -> dict[str, Any]:
        """The validated keyword arguments for the scheduler's ``step``."""
        return build_step_kwargs(self._step_keywords, self.stock_class_name, eta, use_clipped_model_output,
                                 generator)

    def scale_model_input(self, sample: torch.Tensor, timestep: Any) -> torch.Tensor:
        """The scheduler's ``scale_model_input`` (Euler/Heun divide by sqrt(sigma^2 + 1); others: identity)."""
        return self.scheduler.scale_model_input(sample, timestep)

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, **kwargs: Any) -> Any:
        """The scheduler's ``step``."""
        return self.scheduler.step(model_output, timestep, sample, **kwargs)

    def stock_divergences(self) -> list[str]:
        """What stock diffusers' ``DDPMPipeline`` loop, which a saved folder names, would do differently.

        The scheduler is diffusers' own, so it samples the same anywhere; but stock ``DDPMPipeline.__call__``
        passes ``generator`` to ``step``, never scales the initial noise by ``init_noise_sigma`` and never calls
        ``scale_model_input``. Checked on a fresh copy of the scheduler; cached per class and config.
        """
        return list(_pipeline_loop_reasons(type(self.scheduler), config_json(self.scheduler)))


@functools.lru_cache(maxsize=64)
def _pipeline_loop_reasons(cls: type, config_json: str) -> tuple[str, ...]:
    name = cls.__name__
    reasons = []
    if "generator" not in inspect.signature(cls.step).parameters:
        reasons.append(f"{name}.step takes no generator, which stock DDPMPipeline passes to it (TypeError)")
    try:  # a config diffusers' class refuses (DDIM with quad spacing) is a reason, not a crash of the caller
        copy = cls.from_config(json.loads(config_json))
        copy.set_timesteps(min(10, copy.config.get("num_train_timesteps", 1000)))
    except (ValueError, NotImplementedError) as error:
        return (*reasons, f"{name} cannot sample this config in stock diffusers ({type(error).__name__}: {error})")
    sigma = float(copy.init_noise_sigma)
    if sigma != 1.0:
        reasons.append(f"{name}.init_noise_sigma is {sigma:.4g}; stock DDPMPipeline does not scale the initial noise")
    probe = torch.linspace(-2.0, 2.0, 8).reshape(1, 2, 2, 2)
    if not torch.equal(copy.scale_model_input(probe, copy.timesteps[0]), probe):
        reasons.append(f"{name}.scale_model_input is not the identity; stock DDPMPipeline never calls it")
    return tuple(reasons)
