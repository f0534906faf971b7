"""The DDPM variational bound on -log p(x_0), in bits per dimension.

L = L_T + sum_{t>1} L_{t-1} + L_0 (Ho et al. 2020, eq. 5): L_T = KL(q(x_T | x_0) || N(0, I)), each L_{t-1} the KL
between the true posterior q(x_{t-1} | x_t, x_0) (eq. 6-7) and the model's p(x_{t-1} | x_t), and L_0 the
discretised Gaussian decoder (sec. 3.3, eq. 13). Every term is evaluated on the full training chain of T steps,
one network call per t for the whole batch, and in float64 from the network output on.

The model variance follows improved-diffusion's conventions (Nichol & Dhariwal 2021): the posterior variance at
t = 0 is zero, so "fixed_small" uses the t = 1 value there and "fixed_large" uses it in place of beta_0; a
"learned_range" output v interpolates log beta_t and that clipped log posterior variance (their eq. 15); a
"learned" output is the log variance itself (as ddpm_hf's DDPMScheduler reads it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .diffusion_math import (
    VARIANCE_TYPES,
    NoiseSchedule,
    discretized_gaussian_log_likelihood,
    fixed_log_variance,
    learned_range_log_variance,
    normal_kl,
    posterior_log_variance_bounds,
    predict_x0,
    q_posterior_coefficients,
    q_posterior_mean,
    q_sample,
)

ModelFn = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass
class LikelihoodOutput(BaseOutput):
    """The variational bound per image.

    Args:
        bits_per_dim: ``(N,)`` total bound in bits per dimension (an upper bound on the negative log-likelihood).
        log_likelihood: ``(N,)`` the matching lower bound on log p(x_0) in nats, over the whole image.
        prior_bpd: ``(N,)`` L_T in bits per dimension.
        terms_bpd: ``(N, T)``: column 0 is the decoder term L_0, column t >= 1 the KL term L_t, all in bits/dim.
    """

    bits_per_dim: torch.Tensor
    log_likelihood: torch.Tensor
    prior_bpd: torch.Tensor
    terms_bpd: torch.Tensor


def model_log_variance(alphas_cumprod: torch.Tensor, t: int, variance_type: str, predicted: torch.Tensor | None) -> torch.Tensor:
    """log of the model's reverse-step variance at training step t (float64, scalar or per element)."""
    a_prev = alphas_cumprod[t - 1] if t > 0 else torch.ones((), dtype=torch.float64)
    min_log, max_log = posterior_log_variance_bounds(alphas_cumprod[t], a_prev)
    if t == 0:
        # beta_tilde_0 = 0: use t = 1's value (improved-diffusion's posterior_log_variance_clipped), also in place
        # of beta_0 for the fixed_large types.
        min_log = posterior_log_variance_bounds(alphas_cumprod[1], alphas_cumprod[0])[0]
        if variance_type in ("fixed_large", "fixed_large_log"):
            max_log = min_log
    if variance_type not in ("learned", "learned_range"):
        return torch.as_tensor(fixed_log_variance(variance_type, min_log, max_log))
    if predicted is None:
        raise ValueError(f"variance_type {variance_type!r} needs a unet with out_channels = 2 * in_channels")
    if variance_type == "learned":
        return predicted.double()  # a log variance, as ddpm_hf's DDPMScheduler reads it
    return learned_range_log_variance(predicted.double(), min_log, max_log)


def _mean_bits(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(1) / math.log(2.0)


def prior_bpd(x0: torch.Tensor, alpha_prod_T: torch.Tensor) -> torch.Tensor:
    """L_T = KL(q(x_T | x_0) || N(0, I)) in bits per dimension, per image."""
    x0 = x0.double()
    mean = alpha_prod_T.sqrt() * x0
    logvar = (1 - alpha_prod_T).log().to(x0.device).expand_as(x0)
    zero = torch.zeros_like(x0)
    return _mean_bits(normal_kl(mean, logvar, zero, zero))


def vb_term_bpd(x0: torch.Tensor, x_t: torch.Tensor, model_output: torch.Tensor, alphas_cumprod: torch.Tensor,
                t: int, variance_type: str, prediction_type: str, clip_denoised: bool) -> torch.Tensor:
    """L_t (t >= 1: a Gaussian KL) or L_0 (t = 0: the discretised decoder NLL) in bits per dimension, per image."""
    x0, x_t = x0.double(), x_t.double()
    channels = x0.shape[1]
    output, predicted_var = model_output.double(), None
    if output.shape[1] == 2 * channels:
        output, predicted_var = output[:, :channels], output[:, channels:]
    a_t = alphas_cumprod[t]
    a_prev = alphas_cumprod[t - 1] if t > 0 else torch.ones((), dtype=torch.float64)
    x0_pred = predict_x0(output, x_t, a_t, prediction_type)
    if clip_denoised:
        x0_pred = x0_pred.clamp(-1, 1)
    model_mean = q_posterior_mean(x0_pred, x_t, a_t, a_prev)
    model_logvar = model_log_variance(alphas_cumprod, t, variance_type, predicted_var).to(x0.device).expand_as(x0)
    if t == 0:
        return _mean_bits(-discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar))
    _, _, true_var = q_posterior_coefficients(a_t, a_prev)
    true_mean = q_posterior_mean(x0, x_t, a_t, a_prev)
    true_logvar = true_var.log().to(x0.device).expand_as(x0)
    return _mean_bits(normal_kl(true_mean, true_logvar, model_mean, model_logvar))


def variational_bound(model_fn: ModelFn, x0: torch.Tensor, config: Mapping, *, generator=None,
                      clip_denoised: bool = False, progress: Callable[[Iterable], Iterable] = iter) -> LikelihoodOutput:
    """Evaluate the DDPM bound for a batch of images on the 8-bit grid.

    Noise for x_t is drawn with ``randn_tensor(x0.shape, generator)``, one draw per t in ascending order.

    Args:
        model_fn: ``(x_t, t) -> network output`` (``t`` a Python int on the training chain).
        x0: images in [-1, 1] on the 8-bit grid, in the network's dtype and device.
        config: the scheduler config (betas, ``variance_type``, ``prediction_type``).
        generator: a torch.Generator or one per image.
        clip_denoised: clip the predicted x_0 to [-1, 1] before forming the model mean.
        progress: wraps the timestep iterator.

    Returns:
        A ``LikelihoodOutput``.
    """
    variance_type = config.get("variance_type", "fixed_small")
    if variance_type not in VARIANCE_TYPES:
        raise ValueError(f"variance_type must be one of {VARIANCE_TYPES}, got {variance_type!r}")
    prediction_type = config.get("prediction_type", "epsilon")
    alphas_cumprod = NoiseSchedule.from_config(config).alphas_cumprod
    num_steps = alphas_cumprod.numel()
    if num_steps < 2:
        raise ValueError("the variational bound needs num_train_timesteps >= 2")
    terms = []
    for t in progress(range(num_steps)):
        noise = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = q_sample(x0, noise, alphas_cumprod[t])
        terms.append(vb_term_bpd(x0, x_t, model_fn(x_t, t), alphas_cumprod, t, variance_type,
                                 prediction_type, clip_denoised))
    terms_bpd = torch.stack(terms, dim=1).cpu()
    prior = prior_bpd(x0, alphas_cumprod[-1].to(x0.device)).cpu()
    total = prior + terms_bpd.sum(1)
    dims = x0[0].numel()
    return LikelihoodOutput(bits_per_dim=total, log_likelihood=-total * dims * math.log(2.0), prior_bpd=prior,
                            terms_bpd=terms_bpd)
