"""Training losses: L_simple for eps / x0 / v targets, min-SNR weighting, and the improved-DDPM hybrid loss.

All arithmetic runs in float32 or wider whatever the network's dtype (the schedule coefficients come from the
float64 core in `ddpm_hf.diffusion_math`), so bf16/fp16 training only changes the network's own precision.
"""

from __future__ import annotations

import math

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
             timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Per-sample L_t of the variational bound in bits per dimension (DDPM eq. 5; improved DDPM sec. 2).

    L_t = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0 and the discretized Gaussian decoder NLL
    -log p(x_0 | x_1) (DDPM eq. 13) for t = 0. The caller passes a detached ``mean_output`` so that this term
    trains only the variance (improved DDPM, sec. 3.1: stop-gradient on the mean).

    Args:
        mean_output: the network's first C channels (eps / x_0 / v), detached.
        var_values: the network's last C channels, in [-1, 1] (learned_range).
        x0, x_t: clean and noised images.
        timesteps: int64 t per sample.
        alphas_cumprod: the float64 bar(alpha) table.
        prediction_type: how to read ``mean_output``.

    Returns:
        A float32 tensor with one value per sample.
    """
    table = alphas_cumprod.double()
    t = timesteps.to(table.device).long()
    a_t = table[t]
    a_prev = torch.where(t > 0, table[(t - 1).clamp(min=0)], torch.ones_like(a_t))
    # log beta_tilde is -inf at t = 0; like improved-diffusion's posterior_log_variance_clipped, use t = 1's value.
    min_log, max_log = dm.posterior_log_variance_bounds(a_t, a_prev)
    if table.numel() > 1:
        min_log = torch.where(t > 0, min_log, dm.posterior_log_variance_bounds(table[1], table[0])[0])

    x0_f, x_t_f = x0.float(), x_t.float()
    pred_x0 = dm.predict_x0(mean_output.float(), x_t_f, a_t, prediction_type)
    model_mean = dm.q_posterior_mean(pred_x0, x_t_f, a_t, a_prev)
    model_log_var = dm.learned_range_log_variance(var_values.float(), dm.as_alpha(min_log, x_t_f),
                                                  dm.as_alpha(max_log, x_t_f))
    true_mean = dm.q_posterior_mean(x0_f, x_t_f, a_t, a_prev)
    true_log_var = dm.as_alpha(min_log, true_mean)

    kl = dm.normal_kl(true_mean, true_log_var, model_mean, model_log_var)
    kl = kl.flatten(1).mean(1) / math.log(2.0)
    decoder_nll = -dm.discretized_gaussian_log_likelihood(x0_f, model_mean, 0.5 * model_log_var)
    decoder_nll = decoder_nll.flatten(1).mean(1).float() / math.log(2.0)
    return torch.where(t.to(kl.device) == 0, decoder_nll, kl)


def hybrid_loss(model_output: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, x_t: torch.Tensor,
                timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, prediction_type: str,
                vlb_weight: float = HYBRID_VLB_WEIGHT, weights: torch.Tensor | None = None) -> torch.Tensor:
    """L_hybrid = L_simple + lambda * L_vlb for a learned_range network with 2C output channels.

    L_vlb = sum_t L_t = T * E_t[L_t], so lambda * L_vlb is estimated per sample as lambda * T * L_t
    (improved DDPM, eq. 16 and its code's ``num_timesteps / 1000`` factor for lambda = 0.001).

    Args:
        model_output: ``(B, 2C, H, W)``: the mean prediction, then the variance interpolation values.
        x0, noise, x_t: clean images, the eps that noised them, and the noised images.
        timesteps: t per sample.
        alphas_cumprod: the float64 bar(alpha) table.
        prediction_type: target of the first C channels.
        vlb_weight: lambda.
        weights: optional per-sample weights of the L_simple term (min-SNR).

    Returns:
        The scalar float32 loss.
    """
    channels = x0.shape[1]
    if model_output.shape[1] != 2 * channels:
        raise ValueError(
            f"variance_type 'learned_range' needs a network with 2 * {channels} output channels, "
            f"got {model_output.shape[1]}"
        )
    mean_output, var_values = model_output[:, :channels], model_output[:, channels:]
    a_t = alphas_cumprod.double()[timesteps.to(alphas_cumprod.device).long()]
    mse = simple_loss(mean_output, training_target(x0, noise, a_t, prediction_type), weights)
    vlb = vlb_term(mean_output.detach(), var_values, x0, x_t, timesteps, alphas_cumprod, prediction_type)
    return mse + vlb_weight * alphas_cumprod.numel() * vlb.mean()
