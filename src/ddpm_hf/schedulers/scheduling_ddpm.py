"""DDPM ancestral sampling (Ho et al. 2020, Algorithm 2) as a drop-in for ``diffusers.DDPMScheduler``."""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from .. import diffusion_math as dm
from ..validation import check_choice
from .scheduling_common import TableScheduler, check_step_inputs

__all__ = ["DDPMScheduler", "DDPMSchedulerOutput"]

_LEARNED = ("learned", "learned_range")


class _StepCoefficients(NamedTuple):
    """Float64 coefficients of one table step, as Python floats (see ``DDPMScheduler._step_coefficients``)."""

    x0_sample: float
    x0_output: float
    mean_x0: float
    mean_xt: float
    min_log: float
    max_log: float
    fixed_std: float
    noisy: bool


class DDPMScheduler(TableScheduler):
    """DDPM reverse process over a (possibly respaced) timestep table, with diffusers' config and API.

    Each step samples x_prev ~ N(mu_tilde(x_t, x_0_hat), sigma^2) (DDPM eq. 6-7 with x_0 predicted from the
    model output). For a respaced table the posterior uses the beta of the visited pair,
    1 - bar(alpha)_t / bar(alpha)_prev (improved DDPM sec. 4). Differences from diffusers 0.42.1 are listed in
    ``docs/compatibility.md``: all variance types are finite, no noise is added on the final step, ``learned``
    reads the extra channels as a log variance, and table and ``add_noise`` bugs are fixed.

    Args:
        num_train_timesteps: number of training diffusion steps T.
        beta_start: first beta of the ``linear``/``scaled_linear``/``sigmoid`` schedules.
        beta_end: last beta of those schedules.
        beta_schedule: ``"linear"``, ``"scaled_linear"``, ``"squaredcos_cap_v2"`` or ``"sigmoid"``.
        trained_betas: explicit betas (length T, each in (0, 1)); overrides ``beta_schedule``.
        variance_type: ``"fixed_small"``/``"fixed_small_log"`` (sigma^2 = beta_tilde), ``"fixed_large"``/
            ``"fixed_large_log"`` (sigma^2 = beta), ``"learned"`` (extra C output channels are log sigma^2) or
            ``"learned_range"`` (extra channels v in [-1, 1] interpolate the two logs, improved DDPM eq. 15).
        clip_sample: clip the predicted x_0 to ``[-clip_sample_range, clip_sample_range]``.
        prediction_type: what the model predicts: ``"epsilon"``, ``"sample"`` (x_0) or ``"v_prediction"``.
        thresholding: Imagen dynamic thresholding of x_0 (takes precedence over ``clip_sample``).
        dynamic_thresholding_ratio: quantile of |x_0| used by thresholding, in (0, 1].
        clip_sample_range: clip bound, > 0.
        sample_max_value: upper bound of the thresholding scale, > 0.
        timestep_spacing: ``"leading"``, ``"linspace"``, ``"trailing"`` or ``"quad"`` (see ``timestep_spacing.py``).
        steps_offset: added to ``leading`` tables.
        rescale_betas_zero_snr: rescale the schedule to zero terminal SNR (Lin et al. 2024, Algorithm 1).
    """

    stock_class_name = "DDPMScheduler"
    _STEP_KEYWORDS = frozenset({"generator"})

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | Sequence[float] | None = None,
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        check_choice("variance_type", variance_type, dm.VARIANCE_TYPES)
        self.variance_type = variance_type
        # The step "before t = 0" lands on clean data: bar(alpha) = 1 (DDPM Algorithm 2).
        self._init_schedule(final_alpha_is_one=True)

    def default_num_inference_steps(self) -> int:
        """The full chain, T steps (DDPM Algorithm 2), as diffusers' DDPMPipeline."""
        return self.config.num_train_timesteps

    def _step_coefficients(self) -> list[_StepCoefficients]:
        """Per-table-step coefficients, computed once per table in float64 by the maths core."""
        if "ddpm" not in self._coefficients:
            a_t, a_prev = self._alpha_pairs()
            x0_sample, x0_output = dm.x0_coefficients(a_t, self.config.prediction_type)
            self._check_finite("x_0 prediction", (x0_sample, x0_output))
            mean_x0, mean_xt, _ = dm.q_posterior_coefficients(a_t, a_prev)
            min_log, max_log = dm.posterior_log_variance_bounds(a_t, a_prev)
            if self.variance_type in _LEARNED:
                fixed_std = torch.zeros_like(a_t)
            else:
                fixed_std = torch.exp(0.5 * dm.fixed_log_variance(self.variance_type, min_log, max_log))
            # Algorithm 2 adds no noise on the step that lands on x_0 (z = 0 at t = 1), wherever the table ends.
            noisy = [prev >= 0 for prev in self._prev_table]
            columns = (x0_sample, x0_output, mean_x0, mean_xt, min_log, max_log, fixed_std)
            self._coefficients["ddpm"] = [
                _StepCoefficients(*row, is_noisy) for row, is_noisy in zip(zip(*(c.tolist() for c in columns)), noisy)
            ]
        return self._coefficients["ddpm"]

    def _split_output(self, model_output: torch.Tensor, sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Split a learned-variance model's 2C channels into the mean part and the variance values."""
        if self.variance_type not in _LEARNED:
            return model_output, None
        channels = sample.shape[1]
        if model_output.shape[1] != 2 * channels:
            raise ValueError(
                f"variance_type={self.variance_type!r} needs model_output with 2 * {channels} channels (mean and "
                f"variance), got shape {tuple(model_output.shape)}"
            )
        mean_part, var_values = torch.split(model_output, channels, dim=1)
        return mean_part, var_values

    def _noise_std(self, coefficients: _StepCoefficients, var_values: torch.Tensor | None) -> float | torch.Tensor:
        if self.variance_type == "learned":
            return torch.exp(0.5 * var_values)
        if self.variance_type == "learned_range":
            return torch.exp(0.5 * dm.learned_range_log_variance(var_values, coefficients.min_log, coefficients.max_log))
        return coefficients.fixed_std

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> DDPMSchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One ancestral step from x_t to x_prev, the next entry of ``self.timesteps``.

        Noise is drawn like diffusers' (``randn_tensor`` with the output's shape, dtype, device and the given
        generator(s)), so equal generators give equal samples.

        Args:
            model_output: the network's output at (sample, timestep); 2C channels for learned variances.
            timestep: the current t, an entry of ``self.timesteps``.
            sample: x_t.
            generator: a ``torch.Generator`` or one per sample.
            return_dict: return a ``DDPMSchedulerOutput`` instead of a tuple.

        Returns:
            ``DDPMSchedulerOutput(prev_sample, pred_original_sample)`` or the tuple of the two.
        """
        check_step_inputs(model_output, sample, generator)
        coefficients = self._step_coefficients()[self._step_index(timestep)]
        model_output, var_values = self._split_output(model_output, sample)
        x0 = dm.combine(coefficients.x0_sample, sample, coefficients.x0_output, model_output)
        x0 = self._limit_x0(x0)
        prev_sample = dm.combine(coefficients.mean_x0, x0, coefficients.mean_xt, sample)
        if coefficients.noisy:
            noise = randn_tensor(
                model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
            )
            prev_sample = dm.combine(1.0, prev_sample, self._noise_std(coefficients, var_values), noise)
        if not return_dict:
            return prev_sample, x0
        return DDPMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
