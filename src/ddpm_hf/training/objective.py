"""The training objective: draw t and eps, noise x_0 in float32, call the network, return the loss.

The schedule comes from the noise scheduler's config through `ddpm_hf.diffusion_math.NoiseSchedule.from_config`,
the same float64 tables the exported scheduler samples with (``trained_betas`` and ``rescale_betas_zero_snr``
included), never from the scheduler's public float32 tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .. import diffusion_math as dm
from .. import losses  # attribute access at call time: fault-injection tests replace losses.simple_loss


@dataclass(frozen=True)
class DiffusionObjective:
    """What one micro-batch's loss depends on besides the network and the data.

    Args:
        schedule: the float64 noise schedule, on the training device.
        prediction_type: the network's target ("epsilon", "sample" or "v_prediction").
        variance_type: the scheduler's variance type; "learned_range" trains the improved-DDPM hybrid loss.
        snr_gamma: Min-SNR-gamma weighting (None or 0: unweighted).
    """

    schedule: dm.NoiseSchedule
    prediction_type: str
    variance_type: str
    snr_gamma: float | None = None

    @classmethod
    def from_scheduler(cls, noise_scheduler: Any, snr_gamma: float | None,
                       device: torch.device | str = "cpu") -> "DiffusionObjective":
        """The objective that matches a DDPM scheduler's config (the scheduler saved with the export).

        Args:
            noise_scheduler: a scheduler whose config has the schedule keys, ``prediction_type`` and
                ``variance_type``.
            snr_gamma: Min-SNR-gamma weighting (None or 0: off).
            device: where the schedule's tables live.

        Returns:
            The objective.
        """
        config = noise_scheduler.config
        schedule = dm.NoiseSchedule.from_config(config)
        schedule = dm.NoiseSchedule(betas=schedule.betas.to(device), alphas_cumprod=schedule.alphas_cumprod.to(device))
        return cls(schedule, config.prediction_type, config.variance_type, snr_gamma)

    def loss(self, model: torch.nn.Module, x0: torch.Tensor, generator: torch.Generator,
             model_kwargs: dict[str, Any] | None = None) -> torch.Tensor:
        """Draw t ~ U{0..T-1} and eps ~ N(0, I) from ``generator`` (in that order), and return the fp32 loss.

        Args:
            model: the network, called as ``model(x_t, t, **model_kwargs)``; returns an object with ``.sample``.
            x0: clean images in [-1, 1], any float dtype (noising runs in float32 whatever it is).
            generator: the per-process noise and timestep generator.
            model_kwargs: extra network inputs (e.g. ``class_labels``); None or empty for unconditional training.

        Returns:
            The scalar float32 loss of this micro-batch.
        """
        alphas_cumprod = self.schedule.alphas_cumprod
        x0 = x0.float()
        timesteps = torch.randint(0, alphas_cumprod.numel(), (x0.shape[0],), generator=generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=torch.float32)
        alpha_prod = alphas_cumprod[timesteps.to(alphas_cumprod.device)]
        x_t = dm.q_sample(x0, noise, alpha_prod)  # DDPM eq. 4, float32 whatever --mixed_precision says
        model_output = model(x_t, timesteps, **(model_kwargs or {})).sample
        weights = losses.min_snr_weights(alpha_prod, self.snr_gamma, self.prediction_type) if self.snr_gamma else None
        if self.variance_type == "learned_range":
            return losses.hybrid_loss(model_output, x0, noise, x_t, timesteps, self.schedule, self.prediction_type,
                                      weights=weights)
        target = losses.training_target(x0, noise, alpha_prod, self.prediction_type)
        return losses.simple_loss(model_output, target, weights)
