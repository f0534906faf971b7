"""The training objective: draw t and eps, noise x_0 in float32, call the network, return the loss.

The schedule comes from the noise scheduler's config through `ddpm_hf.diffusion_math.NoiseSchedule.from_config`,
the same float64 tables the exported scheduler samples with (``trained_betas`` and ``rescale_betas_zero_snr``
included), never from the scheduler's public float32 tables.

Class-conditional training (classifier-free guidance, Ho & Salimans 2022, sec. 3.2): batches are
`ddpm_hf.class_labels.LabelledSample`; each label is replaced by the null class K (the last embedding, as DiT
does) with probability ``cond_drop_prob``, drawn from the same per-process generator as t and eps, after them,
so a resumed run (whose generator state is checkpointed) drops exactly the labels an uninterrupted one drops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .. import diffusion_math as dm
from .. import losses  # attribute access at call time: fault-injection tests replace losses.simple_loss
from ..class_labels import LabelledSample


@dataclass(frozen=True)
class DiffusionObjective:
    """What one micro-batch's loss depends on besides the network and the data.

    Args:
        schedule: the float64 noise schedule, on the training device.
        prediction_type: the network's target ("epsilon", "sample" or "v_prediction").
        variance_type: the scheduler's variance type; "learned_range" trains the improved-DDPM hybrid loss.
        snr_gamma: Min-SNR-gamma weighting (None or 0: unweighted).
        num_classes: K for class-conditional training (labels 0..K-1, null class K), None for unconditional.
        cond_drop_prob: probability of replacing a label with the null class (class-conditional only).
    """

    schedule: dm.NoiseSchedule
    prediction_type: str
    variance_type: str
    snr_gamma: float | None = None
    num_classes: int | None = None
    cond_drop_prob: float = 0.0

    @classmethod
    def from_scheduler(cls, noise_scheduler: Any, snr_gamma: float | None, device: torch.device | str = "cpu",
                       num_classes: int | None = None, cond_drop_prob: float = 0.0) -> "DiffusionObjective":
        """The objective that matches a DDPM scheduler's config (the scheduler saved with the export).

        Args:
            noise_scheduler: a scheduler whose config has the schedule keys, ``prediction_type`` and
                ``variance_type``.
            snr_gamma: Min-SNR-gamma weighting (None or 0: off).
            device: where the schedule's tables live.
            num_classes: K for class-conditional training, None for unconditional.
            cond_drop_prob: probability of training a label as the null class K.

        Returns:
            The objective.
        """
        config = noise_scheduler.config
        schedule = dm.NoiseSchedule.from_config(config)
        schedule = dm.NoiseSchedule(betas=schedule.betas.to(device), alphas_cumprod=schedule.alphas_cumprod.to(device))
        return cls(schedule, config.prediction_type, config.variance_type, snr_gamma, num_classes, cond_drop_prob)

    def loss(self, model: torch.nn.Module, x0: torch.Tensor | LabelledSample, generator: torch.Generator,
             model_kwargs: dict[str, Any] | None = None) -> torch.Tensor:
        """Draw t ~ U{0..T-1} and eps ~ N(0, I) from ``generator`` (in that order), and return the fp32 loss.

        Args:
            model: the network, called as ``model(x_t, t, **model_kwargs)``; returns an object with ``.sample``.
            x0: clean images in [-1, 1], any float dtype (noising runs in float32 whatever it is); for a
                class-conditional objective a `LabelledSample` batch, whose labels (after the null-class drop,
                drawn third) become ``model_kwargs["class_labels"]``.
            generator: the per-process noise and timestep generator.
            model_kwargs: extra network inputs; None or empty for unconditional training.

        Returns:
            The scalar float32 loss of this micro-batch.
        """
        x0, labels = self._split(x0)
        alphas_cumprod = self.schedule.alphas_cumprod
        x0 = x0.float()
        timesteps = torch.randint(0, alphas_cumprod.numel(), (x0.shape[0],), generator=generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=torch.float32)
        if labels is not None:
            model_kwargs = {**(model_kwargs or {}), "class_labels": self.drop_labels(labels, generator)}
        alpha_prod = alphas_cumprod[timesteps.to(alphas_cumprod.device)]
        x_t = dm.q_sample(x0, noise, alpha_prod)  # DDPM eq. 4, float32 whatever --mixed_precision says
        model_output = model(x_t, timesteps, **(model_kwargs or {})).sample
        weights = losses.min_snr_weights(alpha_prod, self.snr_gamma, self.prediction_type) if self.snr_gamma else None
        if self.variance_type == "learned_range":
            return losses.hybrid_loss(model_output, x0, noise, x_t, timesteps, self.schedule, self.prediction_type,
                                      weights=weights)
        target = losses.training_target(x0, noise, alpha_prod, self.prediction_type)
        return losses.simple_loss(model_output, target, weights)

    def _split(self, batch: torch.Tensor | LabelledSample) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(images, labels)``: labels only for a labelled batch, which only a class-conditional objective takes."""
        labelled = isinstance(batch, LabelledSample)
        if labelled != (self.num_classes is not None):
            raise ValueError("a class-conditional objective (num_classes set) needs LabelledSample batches and an "
                             f"unconditional one image tensors; got {type(batch).__name__} with num_classes="
                             f"{self.num_classes}")
        return (batch.images, batch.class_labels) if labelled else (batch, None)

    def drop_labels(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Replace each label by the null class K with probability ``cond_drop_prob`` (Ho & Salimans 2022,
        Algorithm 1), one uniform draw per label from ``generator``.

        Args:
            labels: ``(batch,)`` int64 labels in [0, K).
            generator: the per-process generator (on the labels' device).

        Returns:
            The labels with the dropped ones set to K.
        """
        if not self.cond_drop_prob:
            return labels
        drop = torch.rand(labels.shape, generator=generator, device=labels.device) < self.cond_drop_prob
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)
