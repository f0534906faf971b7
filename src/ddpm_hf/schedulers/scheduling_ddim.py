"""DDIM sampling and inversion (Song et al. 2021) as a drop-in for ``diffusers.DDIMScheduler``."""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Sequence

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from .. import diffusion_math as dm
from ..validation import check_bool
from .scheduling_common import TableScheduler, check_step_inputs

__all__ = ["DDIMScheduler", "DDIMSchedulerOutput"]


class _StepCoefficients(NamedTuple):
    """Float64 coefficients of one table step for one eta, as Python floats."""

    x0_sample: float
    x0_output: float
    eps_sample: float
    eps_output: float
    eps_from_x0_sample: float
    eps_from_x0_x0: float
    direction_x0: float
    direction_eps: float
    sigma: float


def _check_eta(eta: float) -> float:
    # eta > 1 makes sigma^2 exceed 1 - bar(alpha)_prev, so eq. 12's direction term sqrt(1 - a_prev - sigma^2) is
    # imaginary (diffusers returns NaN there); huge values overflow float32.
    if not isinstance(eta, numbers.Real) or isinstance(eta, bool) or not (math.isfinite(eta) and 0 <= eta <= 1):
        raise ValueError(f"eta must be a finite float in [0, 1] (0 = DDIM, 1 = DDPM-like), got {eta!r}")
    return float(eta)


class DDIMScheduler(TableScheduler):
    """DDIM (eq. 12) over a timestep table, with diffusers' config and API, plus ``inverse_step`` for inversion.

    The step from t goes to the next entry of ``self.timesteps`` (diffusers uses t - T // N, wrong for
    ``linspace``/``trailing`` tables and step counts that do not divide T: issue 12633). Past the last entry it
    lands on ``final_alpha_cumprod``. Differences from diffusers 0.42.1 are listed in ``docs/compatibility.md``.

    Args:
        num_train_timesteps: number of training diffusion steps T.
        beta_start: first beta of the ``linear``/``scaled_linear``/``sigmoid`` schedules.
        beta_end: last beta of those schedules.
        beta_schedule: ``"linear"``, ``"scaled_linear"``, ``"squaredcos_cap_v2"`` or ``"sigmoid"``.
        trained_betas: explicit betas (length T, each in (0, 1)); overrides ``beta_schedule``.
        clip_sample: clip the predicted x_0 to ``[-clip_sample_range, clip_sample_range]``.
        set_alpha_to_one: the final step lands on bar(alpha) = 1 (clean data); if False, on bar(alpha)_0.
        steps_offset: added to ``leading`` tables.
        prediction_type: what the model predicts: ``"epsilon"``, ``"sample"`` (x_0) or ``"v_prediction"``.
        thresholding: Imagen dynamic thresholding of x_0 (takes precedence over ``clip_sample``).
        dynamic_thresholding_ratio: quantile of |x_0| used by thresholding, in (0, 1].
        clip_sample_range: clip bound, > 0.
        sample_max_value: upper bound of the thresholding scale, > 0.
        timestep_spacing: ``"leading"``, ``"linspace"``, ``"trailing"`` or ``"quad"`` (DDIM App. D.2).
        rescale_betas_zero_snr: rescale the schedule to zero terminal SNR (Lin et al. 2024, Algorithm 1).
    """

    stock_class_name = "DDIMScheduler"
    _STEP_KEYWORDS = frozenset({"eta", "use_clipped_model_output", "generator"})

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | Sequence[float] | None = None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
    ):
        check_bool("set_alpha_to_one", set_alpha_to_one)
        self._init_schedule(final_alpha_is_one=set_alpha_to_one)

    def default_num_inference_steps(self) -> int:
        """50 steps (diffusers' DDIMPipeline default; DDIM Table 1 reports S = 10 to 1000), at most T."""
        return min(50, self.config.num_train_timesteps)

    def _step_coefficients(self, eta: float) -> list[_StepCoefficients]:
        """Per-table-step coefficients for ``eta``, computed once per (table, eta) in float64 by the maths core."""
        if eta not in self._coefficients:
            prediction_type = self.config.prediction_type
            a_t, a_prev = self._alpha_pairs()
            x0 = dm.x0_coefficients(a_t, prediction_type)
            eps = dm.eps_coefficients(a_t, prediction_type)
            self._check_finite("x_0 or eps prediction", x0 + eps)
            eps_from_x0 = dm.eps_coefficients(a_t, "sample")
            sigma = dm.ddim_sigma(a_t, a_prev, eta)
            direction = dm.ddim_coefficients(a_prev, sigma)
            columns = (*x0, *eps, *eps_from_x0, *direction, sigma)
            self._coefficients[eta] = [_StepCoefficients(*row) for row in zip(*(c.tolist() for c in columns))]
        return self._coefficients[eta]

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: torch.Generator | list[torch.Generator] | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> DDIMSchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One DDIM step (eq. 12) from x_t to x at the next entry of ``self.timesteps``.

        Args:
            model_output: the network's output at (sample, timestep).
            timestep: the current t, an entry of ``self.timesteps``.
            sample: x_t.
            eta: sigma = eta * sqrt(beta_tilde) (eq. 16): 0 is deterministic DDIM, 1 matches DDPM's posterior noise.
            use_clipped_model_output: recompute eps from the clipped/thresholded x_0 (eps_from_x0).
            generator: a ``torch.Generator`` or one per sample, for the noise when eta > 0 (drawn like diffusers').
            variance_noise: explicit noise for eta > 0 instead of drawing it; excludes ``generator``.
            return_dict: return a ``DDIMSchedulerOutput`` instead of a tuple.

        Returns:
            ``DDIMSchedulerOutput(prev_sample, pred_original_sample)`` or the tuple of the two.
        """
        if self.num_inference_steps is None:
            raise ValueError("num_inference_steps is None: call set_timesteps(num_inference_steps) before step()")
        eta = _check_eta(eta)
        check_step_inputs(model_output, sample, generator, variance_noise)
        if variance_noise is not None and generator is not None:
            raise ValueError("pass at most one of generator and variance_noise, not both")
        c = self._step_coefficients(eta)[self._step_index(timestep)]
        x0 = self._limit_x0(dm.combine(c.x0_sample, sample, c.x0_output, model_output))
        if use_clipped_model_output:
            eps = dm.combine(c.eps_from_x0_sample, sample, c.eps_from_x0_x0, x0)
        else:
            eps = dm.combine(c.eps_sample, sample, c.eps_output, model_output)
        prev_sample = dm.combine(c.direction_x0, x0, c.direction_eps, eps)
        if eta > 0:
            # Drawn on every step, also where sigma = 0, so the generator advances exactly as in diffusers.
            if variance_noise is None:
                variance_noise = randn_tensor(
                    model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
                )
            prev_sample = dm.combine(1.0, prev_sample, c.sigma, variance_noise)
        if not return_dict:
            return prev_sample, x0
        return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    def _inversion_alpha(self, name: str, timestep: int | torch.Tensor | None, allow_clean: bool) -> tuple[int, torch.Tensor]:
        t = -1 if timestep is None else int(timestep)
        low = -1 if allow_clean else 0
        if not low <= t < self.config.num_train_timesteps:
            raise ValueError(f"{name} must be in [{low}, num_train_timesteps={self.config.num_train_timesteps}), got {t}")
        return t, (self._final_alpha_cumprod if t < 0 else self._noise_schedule.alphas_cumprod[t])

    def inverse_step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor | None,
        sample: torch.Tensor,
        next_timestep: int | torch.Tensor,
        return_dict: bool = True,
    ) -> DDIMSchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One deterministic DDIM inversion step: x at ``timestep`` -> x at the later ``next_timestep``.

        Semantics: ``sample`` is x at noise level bar(alpha)_timestep, or, for ``timestep`` = -1 or None, the
        clean input at ``final_alpha_cumprod`` (1.0 with ``set_alpha_to_one``, else bar(alpha)_0). x_0 and eps
        are read from ``model_output`` at that level with the config's ``prediction_type`` (so the caller decides
        at which t it evaluated the model), and the result is DDIM eq. 12 with eta = 0 read upwards:
        x_next = sqrt(bar(alpha)_next) x_0 + sqrt(1 - bar(alpha)_next) eps. x_0 is neither clipped nor
        thresholded, so that a ``step`` from ``next_timestep`` back to ``timestep`` with the same eps returns
        ``sample`` exactly. Any ``next_timestep`` in (timestep, T) is allowed; it need not be in ``self.timesteps``.

        Args:
            model_output: the network's output for ``sample`` (eps, x_0 or v per ``prediction_type``).
            timestep: the level of ``sample``; -1 or None for clean data.
            sample: x at ``timestep``.
            next_timestep: the level to move to, greater than ``timestep``.
            return_dict: return a ``DDIMSchedulerOutput`` instead of a tuple.

        Returns:
            ``DDIMSchedulerOutput`` whose ``prev_sample`` is x at ``next_timestep`` and ``pred_original_sample``
            the x_0 used, or the tuple of the two.
        """
        t, alpha_t = self._inversion_alpha("timestep", timestep, allow_clean=True)
        t_next, alpha_next = self._inversion_alpha("next_timestep", next_timestep, allow_clean=False)
        if t_next <= t:
            raise ValueError(f"next_timestep must be greater than timestep, got {t_next} <= {t}")
        prediction_type = self.config.prediction_type
        if prediction_type == "sample" and alpha_t == 1:
            raise ValueError(
                "prediction_type='sample' gives no noise direction for clean data at bar(alpha) = 1: call "
                "inverse_step from timestep >= 0, or use set_alpha_to_one=False"
            )
        x0 = dm.predict_x0(model_output, sample, alpha_t, prediction_type)
        eps = dm.predict_eps(model_output, sample, alpha_t, prediction_type)
        next_sample = dm.ddim_step(x0, eps, alpha_next, 0.0)
        if not return_dict:
            return next_sample, x0
        return DDIMSchedulerOutput(prev_sample=next_sample, pred_original_sample=x0)
