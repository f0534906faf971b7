"""Training losses: L_simple for eps / x0 / v targets, min-SNR weighting, and the improved-DDPM hybrid loss.

All arithmetic runs in float32 or wider whatever the network's dtype (the schedule coefficients come from the
float64 core in `ddpm_hf.diffusion_math`), so bf16/fp16 training only changes the network's own precision.
"""

from __future__ import annotations

import torch

from . import diffusion_math as dm

HYBRID_VLB_WEIGHT = 0.001  # lambda of Nichol & Dhariwal 2021, eq. 16


def training_target(x0: torch.Tensor, noise: torch.Tensor, alpha_prod_t: torch.Tensor,
                    prediction_type: str) -> torch.Tensor:
    """What the network regresses onto: eps (DDPM eq. 14), x_0, or v (Salimans & Ho 2022).

    Args:
        x0: clean images.
        noise: the eps used to make x_t.
        alpha_prod_t: float64 bar(alpha)_t per sample.
        prediction_type: "epsilon", "sample" or "v_prediction".
    """
    dm.check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    return dm.velocity(x0, noise, alpha_prod_t)


def min_snr_weights(alpha_prod_t: torch.Tensor, snr_gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample weights of Min-SNR-gamma (Hang et al. 2023, eq. 7) expressed for each target.

    The paper's weight min(SNR, gamma) applies to the x_0 loss; an eps loss equals SNR times the x_0 loss and a
    v loss (SNR + 1) times, so their weights are divided by those factors. SNR = bar(alpha) / (1 - bar(alpha)).

    Returns:
        A float64 tensor with one weight per sample.
    """
    if not isinstance(snr_gamma, (int, float)) or isinstance(snr_gamma, bool) or not snr_gamma > 0:
        raise ValueError(f"snr_gamma must be a positive number, got {snr_gamma!r}")
    dm.check_prediction_type(prediction_type)
    a = torch.as_tensor(alpha_prod_t, dtype=torch.float64)
    snr = a / (1 - a)
    if prediction_type == "epsilon":
        # min(SNR, gamma) / SNR written so that a zero terminal SNR gives weight 1, not 0/0.
        return (float(snr_gamma) / snr).clamp(max=1.0)
    clipped = snr.clamp(max=float(snr_gamma))
    return clipped if prediction_type == "sample" else clipped / (snr + 1)


def simple_loss(model_output: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error in float32, each sample averaged over its pixels, then (weighted) over the batch."""
    per_sample = (model_output.float() - target.float()).pow(2).flatten(1).mean(1)
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample.dtype)
    return per_sample.mean()


def vlb_term(mean_output: torch.Tensor, var_values: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor,
             timesteps: torch.Tensor, schedule: dm.NoiseSchedule, prediction_type: str) -> torch.Tensor:
    """Per-sample L_t of the variational bound in bits per dimension, for a learned_range network, in float32.

    ``dm.vb_terms_bpd`` (DDPM eq. 5-7, 13; improved DDPM eq. 15). The caller passes a detached ``mean_output`` so
    that this term trains only the variance (improved DDPM, sec. 3.1: stop-gradient on the mean).

    Args:
        mean_output: the network's first C channels (eps / x_0 / v), detached.
        var_values: the network's last C channels, in [-1, 1] (learned_range).
        x0, x_t: clean and noised images.
        timesteps: int64 t per sample.
        schedule: the float64 noise schedule.
        prediction_type: how to read ``mean_output``.

    Returns:
        A float32 tensor with one value per sample.
    """
    return dm.vb_terms_bpd(schedule, x0.float(), x_t.float(), timesteps, mean_output.float(), var_values.float(),
                           prediction_type, "learned_range")


def hybrid_loss(model_output: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, x_t: torch.Tensor,
                timesteps: torch.Tensor, schedule: dm.NoiseSchedule, prediction_type: str,
                vlb_weight: float = HYBRID_VLB_WEIGHT, weights: torch.Tensor | None = None) -> torch.Tensor:
    """L_hybrid = L_simple + lambda * L_vlb for a learned_range network with 2C output channels.

    L_vlb = sum_t L_t = T * E_t[L_t], so lambda * L_vlb is estimated per sample as lambda * T * L_t
    (improved DDPM, eq. 16 and its code's ``num_timesteps / 1000`` factor for lambda = 0.001).

    Args:
        model_output: ``(B, 2C, H, W)``: the mean prediction, then the variance interpolation values.
        x0, noise, x_t: clean images, the eps that noised them, and the noised images.
        timesteps: t per sample.
        schedule: the float64 noise schedule (``dm.NoiseSchedule.from_config(scheduler.config)``).
        prediction_type: target of the first C channels.
        vlb_weight: lambda.
        weights: optional per-sample weights of the L_simple term (min-SNR).

    Returns:
        The scalar float32 loss.
    """
    if not isinstance(schedule, dm.NoiseSchedule):
        raise TypeError(f"hybrid_loss needs schedule: a ddpm_hf.diffusion_math.NoiseSchedule, got "
                        f"{type(schedule).__name__}")
    channels = x0.shape[1]
    if model_output.shape[1] != 2 * channels:
        raise ValueError(
            f"variance_type 'learned_range' needs a network with 2 * {channels} output channels, "
            f"got {model_output.shape[1]}"
        )
    mean_output, var_values = model_output[:, :channels], model_output[:, channels:]
    alphas_cumprod = schedule.alphas_cumprod
    a_t = alphas_cumprod[timesteps.to(alphas_cumprod.device).long()]
    mse = simple_loss(mean_output, training_target(x0, noise, a_t, prediction_type), weights)
    vlb = vlb_term(mean_output.detach(), var_values, x0, x_t, timesteps, schedule, prediction_type)
    return mse + vlb_weight * schedule.num_train_timesteps * vlb.mean()
