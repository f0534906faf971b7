"""The scheduler contract: what the pipeline asks a scheduler instead of sniffing class names or signatures.

ddpm_hf's own schedulers implement ``SchedulerContract`` themselves; diffusers' schedulers get an adapter
(``adapters.DiffusersSchedulerAdapter``) from ``registry.contract_for``. The argument checks every implementation
shares live here, so a pipeline argument is refused with the same message whatever the scheduler.
"""

from __future__ import annotations

import json
import numbers
from typing import Any, Collection, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

Generator = torch.Generator | list[torch.Generator] | None


@runtime_checkable
class SchedulerContract(Protocol):
    """What the pipeline needs from a scheduler (ours implement it; diffusers' get an adapter).

    ``stock_class_name`` is the diffusers class a saved folder records; ``init_noise_sigma`` scales the initial
    noise (read it after ``set_inference_timesteps``); ``step`` and ``scale_model_input`` are the scheduler's own.
    """

    stock_class_name: str

    @property
    def init_noise_sigma(self) -> float | torch.Tensor: ...

    def default_num_inference_steps(self) -> int:
        """The step count used when the caller gives none."""

    def set_inference_timesteps(self, num_inference_steps: int | None = None, timesteps: Sequence[int] | None = None,
                                device: str | torch.device | None = None) -> torch.Tensor:
        """Validate, apply the default, build the table; returns ``scheduler.timesteps``."""

    def step_kwargs(self, *, eta: float = 0.0, use_clipped_model_output: bool | None = None,
                    generator: Generator = None) -> dict[str, Any]:
        """The validated keyword arguments for ``step``."""

    def scale_model_input(self, sample: torch.Tensor, timestep: Any) -> torch.Tensor:
        """The network's input at ``timestep`` (identity for DDPM/DDIM; sigma scaling for Euler/Heun)."""

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, **kwargs: Any) -> Any:
        """The scheduler's ``step``."""

    def stock_divergences(self) -> list[str]:
        """[] iff stock diffusers samples this config identically; else the reasons."""


def config_json(scheduler: Any) -> str:
    """The scheduler's public config as canonical JSON: the cache key of decisions made per config."""
    config = {k: v for k, v in scheduler.config.items() if not k.startswith("_")}
    return json.dumps(config, sort_keys=True, default=lambda v: v.tolist() if hasattr(v, "tolist") else repr(v))


def int_list(timesteps: Any) -> list[int]:
    """A custom timestep list as Python ints; TypeError for anything that is not a sequence of integers."""
    if isinstance(timesteps, (torch.Tensor, np.ndarray)):
        timesteps = timesteps.tolist()
    if not isinstance(timesteps, (list, tuple)) or not all(
        isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in timesteps
    ):
        raise TypeError(f"timesteps must be a list of ints (descending training timesteps), got {timesteps!r:.80}")
    return [int(t) for t in timesteps]


def inference_arguments(num_inference_steps: Any, timesteps: Any, default: int, custom_allowed: bool,
                        owner: str) -> tuple[int | None, list[int] | None]:
    """Check the step-count arguments of ``set_inference_timesteps`` and apply the default.

    Args:
        num_inference_steps: the caller's step count or None.
        timesteps: the caller's custom table or None.
        default: the scheduler's ``default_num_inference_steps()``.
        custom_allowed: whether the scheduler's ``set_timesteps`` takes a custom list.
        owner: the scheduler's class name, for messages.

    Returns:
        ``(num_inference_steps, None)`` or ``(None, custom_list)``.
    """
    if timesteps is not None:
        if num_inference_steps is not None:
            raise ValueError("pass either num_inference_steps or timesteps, not both")
        if not custom_allowed:
            raise ValueError(f"timesteps needs a scheduler that accepts custom timesteps; {owner}.set_timesteps "
                             "does not")
        return None, int_list(timesteps)
    if num_inference_steps is None:
        num_inference_steps = default
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
    return num_inference_steps, None


def build_step_kwargs(accepted: Collection[str], owner: str, eta: Any, use_clipped_model_output: bool | None,
                      generator: Generator) -> dict[str, Any]:
    """Keyword arguments for a ``step`` that takes the names in ``accepted`` (as diffusers' pipelines pass them).

    Args:
        accepted: the keyword names the scheduler's ``step`` takes.
        owner: the scheduler's class name, for messages.
        eta: DDIM's eta in [0, 1]; a nonzero value needs a ``step`` that takes ``eta``.
        use_clipped_model_output: passed when not None; needs a ``step`` that takes it.
        generator: passed where ``step`` takes one (deterministic solvers such as UniPC take none).

    Returns:
        The keyword arguments.
    """
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be a float in [0, 1] (0 = DDIM, 1 = DDPM-like), got {eta!r}")
    kwargs: dict[str, Any] = {"generator": generator} if "generator" in accepted else {}
    if "eta" in accepted:
        kwargs["eta"] = eta
    elif eta != 0:
        raise ValueError(f"eta={eta} needs a scheduler whose step takes eta (DDIMScheduler), not {owner}")
    if use_clipped_model_output is not None:
        if "use_clipped_model_output" not in accepted:
            raise ValueError(f"use_clipped_model_output needs a DDIMScheduler, not {owner}")
        kwargs["use_clipped_model_output"] = use_clipped_model_output
    return kwargs
