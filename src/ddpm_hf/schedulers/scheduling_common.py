"""What DDPMScheduler and DDIMScheduler share: config validation, the float64 schedule, the timestep table,
x_0 prediction with clipping/thresholding, and the forward process (``add_noise``, ``get_velocity``).

Per-step work is kept on the host side cheap: ``set_timesteps`` builds the table once, per-step coefficients are
computed in float64 by ``ddpm_hf.diffusion_math`` over the whole table and kept as Python floats, and a step
finds its table index without reading the timestep's value from the device when it is one of ``self.timesteps``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin

from .. import diffusion_math as dm
from ..timestep_spacing import TIMESTEP_SPACINGS, check_custom_timesteps, make_timesteps


def check_choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    """Raise ValueError unless ``value`` is one of ``allowed``."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


def check_bool(name: str, value: Any) -> None:
    """Raise TypeError unless ``value`` is a bool."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def check_int(name: str, value: Any, minimum: int) -> None:
    """Raise TypeError for a non-int and ValueError for an int below ``minimum``."""
    if not isinstance(value, numbers.Integral) or isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")


def check_real(name: str, value: Any, low: float, high: float, low_open: bool = True, high_open: bool = False) -> None:
    """Raise TypeError for a non-number and ValueError unless ``value`` is finite and inside the interval."""
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a float in {interval}, got {value!r}")
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (math.isfinite(value) and above and below):
        raise ValueError(f"{name} must be a finite float in {interval}, got {value!r}")


class TableScheduler(SchedulerMixin, ConfigMixin):
    """Base of the two schedulers: a float64 schedule plus a descending table of timesteps to visit.

    Public state, as in diffusers: ``betas``, ``alphas``, ``alphas_cumprod`` (float64, CPU, never moved),
    ``final_alpha_cumprod`` (the bar(alpha) a step to "before t = 0" lands on), ``timesteps`` (int64),
    ``num_inference_steps``, ``custom_timesteps``, ``init_noise_sigma``.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    def _init_schedule(self, final_alpha_is_one: bool) -> None:
        """Validate the shared config keys and build the float64 schedule and the full default table."""
        cfg = self.config
        check_int("num_train_timesteps", cfg.num_train_timesteps, 1)
        check_choice("beta_schedule", cfg.beta_schedule, dm.BETA_SCHEDULES)
        for name in ("beta_start", "beta_end"):
            check_real(name, getattr(cfg, name), 0.0, 1.0, high_open=True)
        check_choice("prediction_type", cfg.prediction_type, dm.PREDICTION_TYPES)
        check_choice("timestep_spacing", cfg.timestep_spacing, TIMESTEP_SPACINGS)
        for name in ("clip_sample", "thresholding", "rescale_betas_zero_snr"):
            check_bool(name, getattr(cfg, name))
        check_real("dynamic_thresholding_ratio", cfg.dynamic_thresholding_ratio, 0.0, 1.0)
        check_real("clip_sample_range", cfg.clip_sample_range, 0.0, math.inf, high_open=True)
        check_real("sample_max_value", cfg.sample_max_value, 0.0, math.inf, high_open=True)
        check_int("steps_offset", cfg.steps_offset, 0)

        betas = dm.make_betas(
            cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end, cfg.beta_schedule, cfg.trained_betas
        )
        if cfg.rescale_betas_zero_snr:
            betas = dm.rescale_zero_terminal_snr(betas)
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = dm.alphas_cumprod_from_betas(betas)
        final = 1.0 if final_alpha_is_one else self.alphas_cumprod[0].item()
        self.final_alpha_cumprod = torch.tensor(final, dtype=torch.float64)
        self.init_noise_sigma = 1.0
        self._alphas_cumprod_by_device: dict[torch.device, torch.Tensor] = {}
        self.num_inference_steps: int | None = None
        self.custom_timesteps = False
        self._set_table(list(range(cfg.num_train_timesteps - 1, -1, -1)), None)

    # ---- timestep table -----------------------------------------------------------------------------------------

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: Sequence[int] | None = None,
    ) -> None:
        """Choose the timesteps to visit (run before sampling).

        Args:
            num_inference_steps: number of steps, in ``[1, num_train_timesteps]``, spaced by the config's
                ``timestep_spacing``. Mutually exclusive with ``timesteps``.
            device: where ``self.timesteps`` lives (it stays on CPU when ``None``).
            timesteps: a custom strictly descending list of training timesteps in ``[0, num_train_timesteps)``.
        """
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps (an int) or timesteps (a descending list)")
        cfg = self.config
        if timesteps is not None:
            table = check_custom_timesteps(timesteps, cfg.num_train_timesteps)
        else:
            table = make_timesteps(cfg.timestep_spacing, cfg.num_train_timesteps, num_inference_steps, cfg.steps_offset)
        self.custom_timesteps = timesteps is not None
        self.num_inference_steps = len(table)
        self._set_table(table, device)

    def _set_table(self, table: list[int], device: str | torch.device | None) -> None:
        self.timesteps = torch.tensor(table, dtype=torch.int64, device=device)
        self._table = table
        self._prev_table = table[1:] + [-1]
        self._index_of = {t: i for i, t in enumerate(table)}
        self._coefficients: dict[Any, list] = {}

    def _alpha_pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """float64 bar(alpha) at each table entry and at the entry visited next (the final alpha after the last)."""
        t = torch.tensor(self._table)
        prev = torch.tensor(self._prev_table)
        a_prev = torch.where(prev >= 0, self.alphas_cumprod[prev.clamp(min=0)], self.final_alpha_cumprod)
        return self.alphas_cumprod[t], a_prev

    def _step_index(self, timestep: int | torch.Tensor) -> int:
        """Position of ``timestep`` in the table; no device read when it is a view of ``self.timesteps``."""
        if isinstance(timestep, torch.Tensor):
            if timestep.numel() != 1:
                raise ValueError(f"timestep must be a single int, got a tensor of shape {tuple(timestep.shape)}")
            table = self.timesteps
            # Iterating over self.timesteps yields views into its storage: the offset is the index.
            if timestep.dtype == table.dtype and timestep.device == table.device and (
                timestep.untyped_storage().data_ptr() == table.untyped_storage().data_ptr()
            ):
                return timestep.storage_offset() - table.storage_offset()
        index = self._index_of.get(int(timestep))
        if index is None:
            raise ValueError(
                f"timestep {int(timestep)} is not in scheduler.timesteps; call set_timesteps and step through "
                f"those values (current table starts {self._table[:5]})"
            )
        return index

    def previous_timestep(self, timestep: int | torch.Tensor) -> torch.Tensor:
        """The timestep visited after ``timestep`` in the table, or -1 after the last one."""
        return torch.tensor(self._prev_table[self._step_index(timestep)], device=self.timesteps.device)

    def _check_finite(self, name: str, values: Sequence[torch.Tensor]) -> None:
        if not all(torch.isfinite(v).all() for v in values):
            t = self.config.num_train_timesteps - 1
            raise ValueError(
                f"{name} is not finite on this timestep table: with rescale_betas_zero_snr=True, bar(alpha) at "
                f"t={t} is 0 and prediction_type='{self.config.prediction_type}' cannot recover x_0 there "
                "(diffusers issue 3851). Use prediction_type 'v_prediction' or 'sample', or a table without "
                f"t={t} (timestep_spacing='leading' or custom timesteps)."
            )

    # ---- x_0 and the forward process ----------------------------------------------------------------------------

    def _limit_x0(self, x0: torch.Tensor) -> torch.Tensor:
        """Dynamic thresholding or clipping of the predicted x_0 (thresholding wins when both are on, as in diffusers)."""
        cfg = self.config
        if cfg.thresholding:
            return dm.dynamic_threshold(x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
        if cfg.clip_sample:
            return x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
        return x0

    def _alphas_cumprod_on(self, device: torch.device) -> torch.Tensor:
        """A cached copy of ``alphas_cumprod`` on ``device`` (float32 on MPS, which lacks float64)."""
        if device not in self._alphas_cumprod_by_device:
            dtype = torch.float32 if device.type == "mps" else torch.float64
            self._alphas_cumprod_by_device[device] = self.alphas_cumprod.to(device=device, dtype=dtype)
        return self._alphas_cumprod_by_device[device]

    def _alpha_at(self, timesteps: int | torch.Tensor, device: torch.device) -> torch.Tensor:
        table = self._alphas_cumprod_on(device)
        return table[torch.as_tensor(timesteps, device=device).long()]

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor) -> torch.Tensor:
        """Forward process x_t = sqrt(bar(alpha)_t) x_0 + sqrt(1 - bar(alpha)_t) eps (DDPM eq. 4).

        Coefficients are computed in float64 per call and cast to the sample's dtype; no state is changed.

        Args:
            original_samples: clean samples x_0, shape ``(B, ...)``.
            noise: eps, same shape.
            timesteps: one int per sample (shape ``(B,)``) or a single int.

        Returns:
            x_t in ``original_samples``' dtype.
        """
        return dm.q_sample(original_samples, noise, self._alpha_at(timesteps, original_samples.device))

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor) -> torch.Tensor:
        """The v-prediction target v = sqrt(bar(alpha)_t) eps - sqrt(1 - bar(alpha)_t) x_0.

        Args:
            sample: clean samples x_0.
            noise: eps, same shape.
            timesteps: one int per sample or a single int.

        Returns:
            v in ``sample``'s dtype.
        """
        return dm.velocity(sample, noise, self._alpha_at(timesteps, sample.device))

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        """Identity: DDPM and DDIM feed x_t to the model unscaled (kept for scheduler interchangeability)."""
        return sample

    def __len__(self) -> int:
        return self.config.num_train_timesteps
