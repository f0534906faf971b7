"""Inference timestep tables: which training timesteps a sampler visits, in descending order.

The ``leading``, ``linspace`` and ``trailing`` rules are those of Lin et al. 2024 ("Common Diffusion Noise
Schedules and Sample Steps are Flawed", Table 2) and return the same integers as diffusers 0.42.1 wherever
diffusers' tables are valid; ``quad`` is the quadratic sequence of the DDIM paper (App. D.2). Two diffusers
defects are fixed here (see docs/compatibility.md):

* ``trailing`` used a float ``arange`` whose rounding yields ``N + 1`` entries ending in ``-1`` for some
  ``N`` (62 values at ``T = 1000``, e.g. 61, 103, 121); we keep exactly the first ``N`` entries.
* ``leading`` with ``steps_offset`` can start at ``t >= T`` (``steps_offset=1``, ``N = T``) and then fail
  with an IndexError deep inside ``step``; we raise a ValueError when the table is built.
"""

from __future__ import annotations

import numbers
from typing import Sequence

import numpy as np
import torch

TIMESTEP_SPACINGS = ("leading", "linspace", "trailing", "quad")

# DDIM's reference implementation ends the quadratic sequence at 0.8 * T (ermongroup/ddim, runners/diffusion.py).
_QUAD_END_FRACTION = (4, 5)


def _check_count(num_inference_steps: int, num_train_timesteps: int) -> None:
    if not isinstance(num_inference_steps, numbers.Integral) or isinstance(num_inference_steps, bool):
        raise TypeError(
            f"num_inference_steps must be an int in [1, {num_train_timesteps}], got {num_inference_steps!r}"
        )
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(
            f"num_inference_steps must be in [1, num_train_timesteps={num_train_timesteps}], got {num_inference_steps}"
        )


def leading(num_train_timesteps: int, num_inference_steps: int, steps_offset: int = 0) -> list[int]:
    """Multiples of ``T // N`` from 0, plus ``steps_offset``: ``T=1000, N=10`` gives ``[900, ..., 0]``."""
    ratio = num_train_timesteps // num_inference_steps
    table = [i * ratio + steps_offset for i in reversed(range(num_inference_steps))]
    if table[0] >= num_train_timesteps:
        raise ValueError(
            f"timestep_spacing='leading' with steps_offset={steps_offset} and num_inference_steps="
            f"{num_inference_steps} would visit t={table[0]}, outside [0, num_train_timesteps="
            f"{num_train_timesteps}); use steps_offset <= {num_train_timesteps - 1 - (num_inference_steps - 1) * ratio}"
            " or fewer steps"
        )
    return table


def linspace(num_train_timesteps: int, num_inference_steps: int) -> list[int]:
    """``N`` points evenly spread over ``[0, T - 1]``, rounded (half to even, like numpy)."""
    points = np.linspace(0, num_train_timesteps - 1, num_inference_steps).round()[::-1]
    return [int(t) for t in points]


def trailing(num_train_timesteps: int, num_inference_steps: int) -> list[int]:
    """``round(T - i * T / N) - 1`` for ``i < N``: always starts at ``T - 1``, exactly ``N`` entries."""
    # numpy's float arange gives the same values as diffusers; float error can append an (N+1)-th entry that
    # rounds to -1, hence the slice.
    points = np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / num_inference_steps))
    return [int(t) - 1 for t in points[:num_inference_steps]]


def quad(num_train_timesteps: int, num_inference_steps: int) -> list[int]:
    """DDIM App. D.2: ``tau_i = floor(c i^2)`` with ``c`` chosen so the last entry is ``floor(0.8 T)``.

    Where the quadratic would repeat a timestep (``c < 1``, i.e. many steps), each entry is raised to one more
    than its predecessor, so the table always has ``N`` distinct steps and never exceeds ``T - 1``.
    """
    num, den = _QUAD_END_FRACTION
    last = num_inference_steps - 1
    table: list[int] = []
    for i in range(num_inference_steps):
        # Exact integer floor of (num/den) * T * (i / last)^2; a float c would misround some entries.
        t = (num * num_train_timesteps * i * i) // (den * last * last) if last else 0
        table.append(max(t, table[-1] + 1) if table else t)
    return table[::-1]


def make_timesteps(
    timestep_spacing: str, num_train_timesteps: int, num_inference_steps: int, steps_offset: int = 0
) -> list[int]:
    """Build the descending table for ``num_inference_steps`` steps with one of ``TIMESTEP_SPACINGS``.

    Args:
        timestep_spacing: ``"leading"``, ``"linspace"``, ``"trailing"`` or ``"quad"``.
        num_train_timesteps: T.
        num_inference_steps: N, in ``[1, T]``.
        steps_offset: added to ``leading`` tables only (as in diffusers).

    Returns:
        ``N`` strictly descending ints in ``[0, T)``.
    """
    _check_count(num_inference_steps, num_train_timesteps)
    if timestep_spacing == "leading":
        return leading(num_train_timesteps, num_inference_steps, steps_offset)
    if timestep_spacing == "linspace":
        return linspace(num_train_timesteps, num_inference_steps)
    if timestep_spacing == "trailing":
        return trailing(num_train_timesteps, num_inference_steps)
    if timestep_spacing == "quad":
        return quad(num_train_timesteps, num_inference_steps)
    raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {timestep_spacing!r}")


def _is_integer_dtype(array: torch.Tensor | np.ndarray) -> bool:
    if isinstance(array, torch.Tensor):
        return not array.dtype.is_floating_point and not array.dtype.is_complex and array.dtype != torch.bool
    return np.issubdtype(array.dtype, np.integer)


def check_custom_timesteps(timesteps: Sequence[int] | torch.Tensor | np.ndarray, num_train_timesteps: int) -> list[int]:
    """Validate a user-given table: non-empty, integers, strictly descending, all in ``[0, T)``.

    Returns:
        The table as a list of Python ints.
    """
    if isinstance(timesteps, (torch.Tensor, np.ndarray)):
        if timesteps.ndim != 1 or not _is_integer_dtype(timesteps):
            raise TypeError(f"timesteps must be a 1-d sequence of ints, got {timesteps!r}")
        values = [int(t) for t in timesteps.tolist()]
    elif isinstance(timesteps, Sequence) and not isinstance(timesteps, str):
        if not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in timesteps):
            raise TypeError(f"timesteps must be a sequence of ints, got {list(timesteps)!r}")
        values = [int(t) for t in timesteps]
    else:
        raise TypeError(f"timesteps must be a list of ints, got {type(timesteps).__name__}")
    if not values:
        raise ValueError("timesteps must not be empty")
    if any(b >= a for a, b in zip(values, values[1:])):
        raise ValueError(f"timesteps must be strictly descending (no duplicates), got {values}")
    if values[0] >= num_train_timesteps or values[-1] < 0:
        raise ValueError(f"timesteps must all lie in [0, num_train_timesteps={num_train_timesteps}), got {values}")
    return values
