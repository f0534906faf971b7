"""The DDPM variational bound on -log p(x_0), in bits per dimension.

L = L_T + sum_{t>1} L_{t-1} + L_0 (Ho et al. 2020, eq. 5): L_T = KL(q(x_T | x_0) || N(0, I)), each L_{t-1} the KL
between the true posterior q(x_{t-1} | x_t, x_0) (eq. 6-7) and the model's p(x_{t-1} | x_t), and L_0 the
discretised Gaussian decoder (sec. 3.3, eq. 13). Every term is evaluated on the full training chain of T steps,
one network call per t for the whole batch, and in float64 from the network output on; each L_t is
`diffusion_math.vb_terms_bpd`, the term the hybrid training loss uses too.

The model variance follows improved-diffusion's conventions (Nichol & Dhariwal 2021): the posterior variance at
t = 0 is zero, so "fixed_small" uses the t = 1 value there and "fixed_large" uses it in place of beta_0; a
"learned_range" output v interpolates log beta_t and that clipped log posterior variance (their eq. 15); a
"learned" output is the log variance itself (as ddpm_hf's DDPMScheduler reads it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .diffusion_math import VARIANCE_TYPES, NoiseSchedule, bits_per_dim, normal_kl, q_sample, vb_terms_bpd

# ``model_fn(x_t, t, **model_kwargs) -> output``, t a Python int on the training chain (the conduit of issue 10).
ModelFn = Callable[..., torch.Tensor]


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


def prior_bpd(x0: torch.Tensor, alpha_prod_T: torch.Tensor) -> torch.Tensor:
    """L_T = KL(q(x_T | x_0) || N(0, I)) in bits per dimension, per image (float64)."""
    x0 = x0.double()
    mean = alpha_prod_T.sqrt() * x0
    logvar = (1 - alpha_prod_T).log().to(x0.device).expand_as(x0)
    zero = torch.zeros_like(x0)
    return bits_per_dim(normal_kl(mean, logvar, zero, zero), torch.float64)


def split_output(model_output: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(mean channels, variance channels or None)`` of a network with C or 2C output channels, in float64."""
    output = model_output.double()
    if output.shape[1] == 2 * channels:
        return output[:, :channels], output[:, channels:]
    return output, None


def variational_bound(model_fn: ModelFn, x0: torch.Tensor, config: Mapping, *, generator=None,
                      clip_denoised: bool = False, progress: Callable[[Iterable], Iterable] = iter,
                      model_kwargs: dict[str, Any] | None = None) -> LikelihoodOutput:
    """Evaluate the DDPM bound for a batch of images on the 8-bit grid.

    Noise for x_t is drawn with ``randn_tensor(x0.shape, generator)``, one draw per t in ascending order.

    Args:
        model_fn: ``(x_t, t, **model_kwargs) -> network output`` (``t`` a Python int on the training chain).
        x0: images in [-1, 1] on the 8-bit grid, in the network's dtype and device.
        config: the scheduler config (betas, ``variance_type``, ``prediction_type``).
        generator: a torch.Generator or one per image.
        clip_denoised: clip the predicted x_0 to [-1, 1] before forming the model mean.
        progress: wraps the timestep iterator.
        model_kwargs: extra network inputs (e.g. ``{"class_labels": labels}``), passed to every ``model_fn`` call.

    Returns:
        A ``LikelihoodOutput``.
    """
    variance_type = config.get("variance_type", "fixed_small")
    if variance_type not in VARIANCE_TYPES:
        raise ValueError(f"variance_type must be one of {VARIANCE_TYPES}, got {variance_type!r}")
    prediction_type = config.get("prediction_type", "epsilon")
    schedule = NoiseSchedule.from_config(config)
    if schedule.num_train_timesteps < 2:
        raise ValueError("the variational bound needs num_train_timesteps >= 2")
    model_kwargs = model_kwargs or {}
    x0_64 = x0.double()
    terms = []
    for t in progress(range(schedule.num_train_timesteps)):
        noise = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = q_sample(x0, noise, schedule.alphas_cumprod[t])
        mean_output, var_values = split_output(model_fn(x_t, t, **model_kwargs), x0.shape[1])
        terms.append(vb_terms_bpd(schedule, x0_64, x_t.double(), t, mean_output, var_values, prediction_type,
                                  variance_type, clip_denoised))
    terms_bpd = torch.stack(terms, dim=1).cpu()
    prior = prior_bpd(x0, schedule.alphas_cumprod[-1].to(x0.device)).cpu()
    total = prior + terms_bpd.sum(1)
    dims = x0[0].numel()
    return LikelihoodOutput(bits_per_dim=total, log_likelihood=-total * dims * math.log(2.0), prior_bpd=prior,
                            terms_bpd=terms_bpd)
