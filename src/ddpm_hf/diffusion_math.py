"""The float64 diffusion-maths core shared by the schedulers, the pipeline, the losses and evaluation.

Everything here is a pure function of the schedule tables: no scheduler state, no mutation. Tables are
built once in float64; per-call coefficients are gathered in float64 and cast to the sample's dtype and
device (the pattern of improved-diffusion's ``gaussian_diffusion.py``), so a float32 or bfloat16 sample
never sees a schedule that was rounded before the arithmetic that matters.

`NoiseSchedule` is the one place a schedule is built from a config; `vb_terms_bpd` the one bound term L_t.
Equation numbers refer to Ho et al. 2020, "Denoising Diffusion Probabilistic Models" (DDPM), Song et al. 2021,
"Denoising Diffusion Implicit Models" (DDIM), and Nichol & Dhariwal 2021, "Improved DDPM".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")

Alpha = torch.Tensor | float


def _cosine_alpha_bar(t: float) -> float:
    # Nichol & Dhariwal 2021, eq. 17 with s = 0.008.
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def make_betas(
    num_train_timesteps: int,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    beta_schedule: str = "linear",
    trained_betas: Sequence[float] | None = None,
) -> torch.Tensor:
    """Return the float64 beta schedule of length ``num_train_timesteps``.

    Args:
        num_train_timesteps: number of diffusion steps T.
        beta_start, beta_end: first and last beta of the linear-family schedules.
        beta_schedule: one of ``BETA_SCHEDULES``; ``squaredcos_cap_v2`` is the improved-DDPM cosine
            schedule with betas capped at 0.999.
        trained_betas: explicit betas; overrides ``beta_schedule`` when given.

    Returns:
        A float64 tensor of shape ``(num_train_timesteps,)``.
    """
    if not isinstance(num_train_timesteps, int) or isinstance(num_train_timesteps, bool) or num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be a positive int, got {num_train_timesteps!r}")
    if beta_schedule not in BETA_SCHEDULES:
        raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}")
    if trained_betas is not None:
        message = f"trained_betas must be a 1-d sequence of floats in (0, 1), got {trained_betas!r:.80}"
        if isinstance(trained_betas, (str, bytes, Mapping)):
            raise ValueError(message)
        try:
            betas = torch.as_tensor(trained_betas.detach().cpu() if torch.is_tensor(trained_betas)
                                    else list(trained_betas), dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(message) from err
        if betas.ndim != 1:
            raise ValueError(message)
        if betas.numel() != num_train_timesteps:
            raise ValueError(
                f"trained_betas has {betas.numel()} values but num_train_timesteps is {num_train_timesteps}"
            )
        if not torch.isfinite(betas).all() or (betas <= 0).any() or (betas >= 1).any():
            raise ValueError("trained_betas must all be finite and in the open interval (0, 1)")
        return betas
    if beta_schedule != "squaredcos_cap_v2":
        for name, value in (("beta_start", beta_start), ("beta_end", beta_end)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < 1:
                raise ValueError(f"{name} must be a float in (0, 1), got {value!r}")
        if beta_start > beta_end:
            raise ValueError(f"beta_start ({beta_start}) must not exceed beta_end ({beta_end})")
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    if beta_schedule == "scaled_linear":
        # Latent-diffusion schedule: linear in sqrt(beta).
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        steps = [i / num_train_timesteps for i in range(num_train_timesteps + 1)]
        return torch.tensor(
            [min(1 - _cosine_alpha_bar(b) / _cosine_alpha_bar(a), 0.999) for a, b in zip(steps[:-1], steps[1:])],
            dtype=torch.float64,
        )
    # GeoDiff sigmoid schedule (Xu et al. 2022).
    x = torch.linspace(-6, 6, num_train_timesteps, dtype=torch.float64)
    return torch.sigmoid(x) * (beta_end - beta_start) + beta_start


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alphas_cumprod) so the last step has zero SNR (Lin et al. 2024, Algorithm 1)."""
    sqrt_ac = torch.cumprod(1.0 - betas.double(), dim=0).sqrt()
    first, last = sqrt_ac[0].clone(), sqrt_ac[-1].clone()
    sqrt_ac = (sqrt_ac - last) * first / (first - last)
    alphas_cumprod = sqrt_ac**2
    alphas = torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return 1.0 - alphas


def alphas_cumprod_from_betas(betas: torch.Tensor) -> torch.Tensor:
    """bar(alpha)_t = prod_{s<=t} (1 - beta_s) (DDPM eq. 4), in float64."""
    return torch.cumprod(1.0 - betas.double(), dim=0)


# diffusers' scheduler-config defaults for the keys that define the noise schedule (DDPMScheduler/DDIMScheduler).
SCHEDULE_CONFIG_DEFAULTS: dict[str, Any] = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
                                            "beta_schedule": "linear", "trained_betas": None,
                                            "rescale_betas_zero_snr": False}


@dataclass(frozen=True)
class NoiseSchedule:
    """The float64 training-chain schedule: beta_t and bar(alpha)_t = prod_{s<=t} (1 - beta_s) (DDPM eq. 4).

    The one way ddpm_hf builds a schedule (schedulers, likelihood, losses, training step). Besides the tables it
    offers the per-t quantities the variational bound needs: ``alpha_prod_prev`` (bar(alpha)_{t-1}, 1 at t = 0)
    and ``log_variance_bounds`` (the clipped log beta_tilde and log beta of DDPM sec. 3.2).

    Args:
        betas: ``(T,)`` float64 beta_t.
        alphas_cumprod: ``(T,)`` float64 bar(alpha)_t.
    """

    betas: torch.Tensor
    alphas_cumprod: torch.Tensor

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "NoiseSchedule":
        """Build from a diffusers scheduler config (extra keys are ignored, missing ones take diffusers' defaults).

        Args:
            config: a mapping with any of ``SCHEDULE_CONFIG_DEFAULTS``' keys (e.g. ``scheduler.config``).

        Returns:
            The schedule; ``rescale_betas_zero_snr`` applies Lin et al. 2024's rescale after ``trained_betas`` or
            the named ``beta_schedule``.

        Raises:
            ValueError: naming the key whose value is invalid.
        """
        cfg = {key: config.get(key, default) for key, default in SCHEDULE_CONFIG_DEFAULTS.items()}
        rescale = cfg["rescale_betas_zero_snr"]
        if not isinstance(rescale, bool):
            raise ValueError(f"rescale_betas_zero_snr must be True or False, got {rescale!r}")
        betas = make_betas(cfg["num_train_timesteps"], cfg["beta_start"], cfg["beta_end"], cfg["beta_schedule"],
                           cfg["trained_betas"])
        if rescale:
            betas = rescale_zero_terminal_snr(betas)
        return cls(betas=betas, alphas_cumprod=alphas_cumprod_from_betas(betas))

    @property
    def num_train_timesteps(self) -> int:
        """T, the length of the tables."""
        return self.betas.numel()

    def alpha_prod_prev(self, t: torch.Tensor | int) -> torch.Tensor:
        """bar(alpha)_{t-1} per entry of ``t``, with bar(alpha)_{-1} = 1 (float64, ``t``'s shape)."""
        t = torch.as_tensor(t, device=self.alphas_cumprod.device).long()
        prev = self.alphas_cumprod[(t - 1).clamp(min=0)]
        return torch.where(t > 0, prev, torch.ones_like(prev))

    def log_variance_bounds(self, t: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(min_log, max_log)``: log beta_tilde_t clipped at t = 0, and log beta_t (float64, ``t``'s shape).

        beta_tilde_0 = 0, so t = 0 takes t = 1's value, as improved-diffusion's ``posterior_log_variance_clipped``
        (Nichol & Dhariwal 2021, sec. 2.1); this is the t = 0 decoder variance of "fixed_small" and the lower end
        of "learned_range" (their eq. 15). Needs T >= 2.
        """
        if self.num_train_timesteps < 2:
            raise ValueError("the clipped posterior log-variance needs num_train_timesteps >= 2")
        t = torch.as_tensor(t, device=self.alphas_cumprod.device).long()
        min_log, max_log = posterior_log_variance_bounds(self.alphas_cumprod[t], self.alpha_prod_prev(t))
        at_one = posterior_log_variance_bounds(self.alphas_cumprod[1], self.alphas_cumprod[0])[0]
        return torch.where(t > 0, min_log, at_one), max_log


def gather(table: torch.Tensor, timesteps: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
    """Pick ``table[t]`` per sample and shape it to broadcast against ``like``, in ``like``'s dtype/device.

    ``timesteps`` may be a Python int, a 0-d tensor, or a 1-d tensor with one entry per sample.
    """
    t = torch.as_tensor(timesteps, device=table.device).long()
    values = table[t]
    values = values.reshape(values.shape + (1,) * (like.ndim - values.ndim))
    return values.to(device=like.device, dtype=like.dtype)


def as_alpha(alpha_prod: Alpha, like: torch.Tensor) -> torch.Tensor:
    """Cast a float64 ``bar(alpha)`` (scalar, 0-d or per-sample) to broadcast against ``like``."""
    a = torch.as_tensor(alpha_prod, dtype=torch.float64)
    a = a.reshape(a.shape + (1,) * (like.ndim - a.ndim)) if a.ndim else a
    return a.to(device=like.device, dtype=like.dtype)


# ---- forward process --------------------------------------------------------------------------------------------


def q_sample(x0: torch.Tensor, noise: torch.Tensor, alpha_prod_t: Alpha) -> torch.Tensor:
    """x_t = sqrt(bar(alpha)_t) x_0 + sqrt(1 - bar(alpha)_t) eps (DDPM eq. 4)."""
    a = torch.as_tensor(alpha_prod_t, dtype=torch.float64)
    return as_alpha(a.sqrt(), x0) * x0 + as_alpha((1 - a).sqrt(), x0) * noise


def velocity(x0: torch.Tensor, noise: torch.Tensor, alpha_prod_t: Alpha) -> torch.Tensor:
    """v = sqrt(bar(alpha)_t) eps - sqrt(1 - bar(alpha)_t) x_0 (Salimans & Ho 2022, sec. 4)."""
    a = torch.as_tensor(alpha_prod_t, dtype=torch.float64)
    return as_alpha(a.sqrt(), x0) * noise - as_alpha((1 - a).sqrt(), x0) * x0


# ---- parameterisation conversions -------------------------------------------------------------------------------


def check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def _is_float(c: Alpha, value: float) -> bool:
    return isinstance(c, float) and c == value


def _scale(c: Alpha, x: torch.Tensor) -> torch.Tensor:
    return x if _is_float(c, 1.0) else x * c


def combine(c_a: Alpha, a: torch.Tensor, c_b: Alpha, b: torch.Tensor) -> torch.Tensor:
    """``c_a * a + c_b * b``: how every formula below is applied once its coefficients are known.

    Coefficients are Python floats (precomputed per timestep table by the schedulers: no device sync, and the
    kernel casts them to the tensor's dtype) or tensors already shaped to broadcast. Float 0 and 1 skip work.
    """
    if _is_float(c_a, 0.0):
        return _scale(c_b, b)
    if _is_float(c_b, 0.0):
        return _scale(c_a, a)
    if isinstance(c_b, float):
        return torch.add(_scale(c_a, a), b, alpha=c_b)
    return torch.add(_scale(c_a, a), _scale(c_b, b))


def x0_coefficients(alpha_prod_t: Alpha, prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c_sample, c_output)`` with x_0 = c_sample * x_t + c_output * model_output, in float64.

    eps: x_0 = (x_t - sqrt(1 - a) eps) / sqrt(a) (DDPM eq. 4 solved for x_0, as in eq. 15);
    sample: x_0 is the output; v: x_0 = sqrt(a) x_t - sqrt(1 - a) v (Salimans & Ho 2022, sec. 4).
    """
    check_prediction_type(prediction_type)
    a = torch.as_tensor(alpha_prod_t, dtype=torch.float64)
    if prediction_type == "epsilon":
        return 1 / a.sqrt(), -(1 - a).sqrt() / a.sqrt()
    if prediction_type == "sample":
        return torch.zeros_like(a), torch.ones_like(a)
    return a.sqrt(), -(1 - a).sqrt()


def eps_coefficients(alpha_prod_t: Alpha, prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c_sample, c_output)`` with eps = c_sample * x_t + c_output * model_output, in float64.

    eps: the output; sample: eps = (x_t - sqrt(a) x_0) / sqrt(1 - a); v: eps = sqrt(a) v + sqrt(1 - a) x_t.
    """
    check_prediction_type(prediction_type)
    a = torch.as_tensor(alpha_prod_t, dtype=torch.float64)
    if prediction_type == "epsilon":
        return torch.zeros_like(a), torch.ones_like(a)
    if prediction_type == "sample":
        return 1 / (1 - a).sqrt(), -a.sqrt() / (1 - a).sqrt()
    return (1 - a).sqrt(), a.sqrt()


def _apply(coefficients: tuple[torch.Tensor, torch.Tensor], sample: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    c_sample, c_other = coefficients
    return combine(as_alpha(c_sample, sample), sample, as_alpha(c_other, sample), other)


def predict_x0(model_output: torch.Tensor, sample: torch.Tensor, alpha_prod_t: Alpha, prediction_type: str) -> torch.Tensor:
    """x_0 from the network's output: eps (DDPM eq. 15), x_0 itself, or v."""
    if prediction_type == "sample":
        return model_output
    return _apply(x0_coefficients(alpha_prod_t, prediction_type), sample, model_output)


def predict_eps(model_output: torch.Tensor, sample: torch.Tensor, alpha_prod_t: Alpha, prediction_type: str) -> torch.Tensor:
    """eps from the network's output: eps itself, from x_0 (inverting eq. 4), or from v."""
    if prediction_type == "epsilon":
        return model_output
    return _apply(eps_coefficients(alpha_prod_t, prediction_type), sample, model_output)


def eps_from_x0(x0: torch.Tensor, sample: torch.Tensor, alpha_prod_t: Alpha) -> torch.Tensor:
    """eps implied by x_t and a (possibly clipped) x_0: (x_t - sqrt(bar(alpha)) x_0) / sqrt(1 - bar(alpha))."""
    return _apply(eps_coefficients(alpha_prod_t, "sample"), sample, x0)


# ---- reverse process --------------------------------------------------------------------------------------------


def step_beta(alpha_prod_t: Alpha, alpha_prod_prev: Alpha) -> torch.Tensor:
    """beta of the visited pair (t, prev): 1 - bar(alpha)_t / bar(alpha)_prev.

    For a respaced sampler this is the beta of the jump, not the training beta at t (improved DDPM, sec. 4).
    """
    a_t = torch.as_tensor(alpha_prod_t, dtype=torch.float64)
    a_prev = torch.as_tensor(alpha_prod_prev, dtype=torch.float64)
    return 1.0 - a_t / a_prev


def q_posterior_coefficients(alpha_prod_t: Alpha, alpha_prod_prev: Alpha) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean coefficients and variance of q(x_prev | x_t, x_0) (DDPM eq. 6-7), in float64.

    Returns:
        ``(coef_x0, coef_xt, variance)`` with mean = coef_x0 * x_0 + coef_xt * x_t and
        variance = beta_tilde = (1 - bar(alpha)_prev) / (1 - bar(alpha)_t) * beta_t.
    """
    a_t = torch.as_tensor(alpha_prod_t, dtype=torch.float64)
    a_prev = torch.as_tensor(alpha_prod_prev, dtype=torch.float64)
    beta = 1.0 - a_t / a_prev
    coef_x0 = a_prev.sqrt() * beta / (1 - a_t)
    coef_xt = (1 - beta).sqrt() * (1 - a_prev) / (1 - a_t)
    variance = (1 - a_prev) / (1 - a_t) * beta
    return coef_x0, coef_xt, variance


def q_posterior_mean(x0: torch.Tensor, sample: torch.Tensor, alpha_prod_t: Alpha, alpha_prod_prev: Alpha) -> torch.Tensor:
    """mu_tilde(x_t, x_0) of DDPM eq. 7, in the sample's dtype."""
    coef_x0, coef_xt, _ = q_posterior_coefficients(alpha_prod_t, alpha_prod_prev)
    return as_alpha(coef_x0, sample) * x0 + as_alpha(coef_xt, sample) * sample


def ddim_sigma(alpha_prod_t: Alpha, alpha_prod_prev: Alpha, eta: float) -> torch.Tensor:
    """sigma_t(eta) of DDIM eq. 16; eta = 1 gives the DDPM posterior standard deviation."""
    _, _, variance = q_posterior_coefficients(alpha_prod_t, alpha_prod_prev)
    return eta * variance.clamp(min=0).sqrt()


def ddim_coefficients(alpha_prod_prev: Alpha, sigma: Alpha) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c_x0, c_eps)`` of DDIM eq. 12: x_prev = sqrt(a_prev) x_0 + sqrt(1 - a_prev - sigma^2) eps + sigma z.

    Also the DDIM inversion step (eq. 12 read from t to a later t with sigma = 0).
    """
    a_prev = torch.as_tensor(alpha_prod_prev, dtype=torch.float64)
    s = torch.as_tensor(sigma, dtype=torch.float64)
    return a_prev.sqrt(), (1 - a_prev - s**2).clamp(min=0).sqrt()


def ddim_step(x0: torch.Tensor, eps: torch.Tensor, alpha_prod_prev: Alpha, sigma: Alpha) -> torch.Tensor:
    """The deterministic part of DDIM eq. 12: sqrt(a_prev) x_0 + sqrt(1 - a_prev - sigma^2) eps."""
    return _apply(ddim_coefficients(alpha_prod_prev, sigma), x0, eps)


VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")

# Floor for the posterior variance before its log: beta_tilde is exactly 0 on a step to bar(alpha) = 1.
POSTERIOR_VARIANCE_FLOOR = 1e-20


def posterior_log_variance_bounds(alpha_prod_t: Alpha, alpha_prod_prev: Alpha) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log beta_tilde, log beta)`` of the visited pair: the two fixed choices of DDPM sec. 3.2, in float64.

    sigma^2 = beta_tilde (eq. 7, "fixed_small") is the lower and sigma^2 = beta ("fixed_large") the upper bound on
    the reverse-process variance; improved DDPM interpolates between their logs. beta_tilde is floored at
    ``POSTERIOR_VARIANCE_FLOOR`` so the log stays finite.
    """
    _, _, variance = q_posterior_coefficients(alpha_prod_t, alpha_prod_prev)
    return variance.clamp(min=POSTERIOR_VARIANCE_FLOOR).log(), step_beta(alpha_prod_t, alpha_prod_prev).log()


def fixed_log_variance(variance_type: str, min_log: Alpha, max_log: Alpha) -> Alpha:
    """The log variance of a fixed variance type: beta_tilde for ``fixed_small*``, beta for ``fixed_large*``.

    The ``_log`` variants are the same distribution (improved-diffusion keeps them for log-likelihood code).
    """
    if variance_type in ("fixed_small", "fixed_small_log"):
        return min_log
    if variance_type in ("fixed_large", "fixed_large_log"):
        return max_log
    raise ValueError(f"variance_type must be one of {VARIANCE_TYPES[:4]} here, got {variance_type!r}")


def learned_range_log_variance(model_var_values: torch.Tensor, min_log: Alpha, max_log: Alpha) -> torch.Tensor:
    """log Sigma = f log beta + (1 - f) log beta_tilde with f = (v + 1) / 2 (improved DDPM eq. 15)."""
    frac = (model_var_values + 1) * 0.5
    return frac * max_log + (1 - frac) * min_log


def model_log_variance(variance_type: str, var_values: torch.Tensor | None, min_log: torch.Tensor,
                       max_log: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """log Sigma_theta(x_t, t) in ``like``'s dtype, from ``NoiseSchedule.log_variance_bounds(t)``.

    fixed_small*: log beta_tilde_t; fixed_large*: log beta_t, except log beta_tilde_1 at t = 0 (improved-diffusion's
    table ``append(posterior_variance[1], betas[1:])``); learned: the output is the log variance (as ddpm_hf's
    DDPMScheduler reads it); learned_range: improved DDPM eq. 15 between log beta_tilde_t and log beta_t.
    """
    if variance_type not in ("learned", "learned_range"):
        max_log = torch.where(t > 0, max_log, min_log)
        return as_alpha(fixed_log_variance(variance_type, min_log, max_log), like)
    if var_values is None:
        raise ValueError(f"variance_type {variance_type!r} needs a network with 2 * in_channels output channels")
    if variance_type == "learned":
        return var_values
    return learned_range_log_variance(var_values, as_alpha(min_log, like), as_alpha(max_log, like))


def dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Imagen's dynamic thresholding (Saharia et al. 2022, sec. 2.3), per sample, in float32 or wider."""
    dtype = x0.dtype
    flat = x0.reshape(x0.shape[0], -1)
    if dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    return (flat.clamp(-s, s) / s).reshape(x0.shape).to(dtype)


# ---- likelihood terms (DDPM sec. 3.3, improved-DDPM sec. 2) ------------------------------------------------------


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0 without cancellation (Maechler 2012: expm1 near 0, log1p further out)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def log_normal_interval_mass(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """log(Phi(high) - Phi(low)) for low < high, accurate in both tails (float64 to beyond 40 sigma).

    log(Phi(b) - Phi(a)) = log Phi(b) + log(1 - exp(log Phi(a) - log Phi(b))), with log Phi = ``log_ndtr``.
    An interval above 0 is mirrored first (Phi(b) - Phi(a) = Phi(-a) - Phi(-b)), so the formula always works on
    the lower tail, where log_ndtr keeps its relative accuracy; a CDF difference would round to 0 past ~8 sigma.
    """
    upper = (low + high) > 0
    low, high = torch.where(upper, -high, low), torch.where(upper, -low, high)
    log_high = torch.special.log_ndtr(high)
    # A difference that rounds to 0 (bins narrower than float64 resolves) would give log(0) and NaN gradients.
    gap = (torch.special.log_ndtr(low) - log_high).clamp(max=-1e-300)
    return log_high + _log1mexp(gap)


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log p(x) of data in [-1, 1] quantised to 256 bins under N(mean, exp(log_scale)^2) (DDPM eq. 13).

    Each bin is [x - 1/255, x + 1/255]; the edge bins extend to -inf (x = -1: log Phi(upper)) and +inf
    (x = +1: log(1 - Phi(lower)) = log Phi(-lower)). Computed in float64 and in log space throughout, so a bin
    tens of standard deviations from the mean keeps its true (very negative) log mass.
    """
    x, mean, log_scale = x.double(), mean.double(), log_scale.double()
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    upper = inv_std * (centered + 1.0 / 255.0)
    lower = inv_std * (centered - 1.0 / 255.0)
    log_interior = log_normal_interval_mass(lower, upper)
    log_left_edge = torch.special.log_ndtr(upper)
    log_right_edge = torch.special.log_ndtr(-lower)
    return torch.where(x < -0.999, log_left_edge, torch.where(x > 0.999, log_right_edge, log_interior))


def bits_per_dim(nats: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per-sample mean over all but the first dimension, cast to ``dtype``, in bits (nats / log 2)."""
    return nats.flatten(1).mean(1).to(dtype) / math.log(2.0)


def vb_terms_bpd(schedule: NoiseSchedule, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int,
                 mean_output: torch.Tensor, var_values: torch.Tensor | None, prediction_type: str,
                 variance_type: str, clip_denoised: bool = False) -> torch.Tensor:
    """One term L_t of the variational bound per sample, in bits per dimension (DDPM eq. 5).

    t > 0: KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)) between the true posterior (DDPM eq. 6-7) and the
    model's Gaussian, whose mean is eq. 7's mu_tilde at the predicted x_0 (eq. 15 for an eps network) and whose
    variance is ``model_log_variance``; t = 0: the discretised decoder's -log p_theta(x_0 | x_1) (eq. 13). The
    counterpart of improved-diffusion's ``_vb_terms_bpd``, shared by the hybrid loss and the likelihood.

    Args:
        schedule: the float64 noise schedule.
        x0, x_t: clean images on the 8-bit grid in [-1, 1] and their noised versions; the arithmetic runs in
            ``x_t``'s dtype (float64 coefficients cast to it), the decoder in float64.
        t: the training step, an int or one per sample.
        mean_output: the network's first C channels (eps / x_0 / v); the hybrid loss passes it detached.
        var_values: the network's last C channels (``learned*`` variance types), else None.
        prediction_type, variance_type: how to read the two outputs.
        clip_denoised: clip the predicted x_0 to [-1, 1] before forming the mean.

    Returns:
        ``(B,)`` bits per dimension in ``x_t``'s dtype.
    """
    t = torch.as_tensor(t, device=schedule.alphas_cumprod.device).long()
    a_t, a_prev = schedule.alphas_cumprod[t], schedule.alpha_prod_prev(t)
    min_log, max_log = schedule.log_variance_bounds(t)
    x0_hat = predict_x0(mean_output, x_t, a_t, prediction_type)
    if clip_denoised:
        x0_hat = x0_hat.clamp(-1, 1)
    model_mean = q_posterior_mean(x0_hat, x_t, a_t, a_prev)
    model_log_var = model_log_variance(variance_type, var_values, min_log, max_log, t, x_t)
    true_mean = q_posterior_mean(x0, x_t, a_t, a_prev)
    kl = normal_kl(true_mean, as_alpha(min_log, x_t), model_mean, model_log_var)
    decoder_nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)
    return torch.where(t.to(x_t.device) == 0, bits_per_dim(decoder_nll, x_t.dtype), bits_per_dim(kl, x_t.dtype))
