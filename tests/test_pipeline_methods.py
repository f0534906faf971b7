"""invert / decode / interpolate / img2img / inpaint / log_likelihood, checked on Gaussian data with the exact eps.

For data x_0 ~ N(mu, s^2) per pixel, E[eps | x_t] = sqrt(1 - a) (x_t - sqrt(a) mu) / (a s^2 + 1 - a), so the
denoiser is known in closed form: DDIM's ODE error comes from discretisation alone, and every term of the
variational bound can be computed independently here (numpy/scipy, float64).
"""

from __future__ import annotations

import math

import diffusers
import numpy as np
import pytest
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.unets.unet_2d import UNet2DOutput
from scipy.special import ndtr

import ddpm_hf
from ddpm_hf.editing import slerp
from ddpm_hf.pipeline import DDPMPipeline

MEAN, STD, T = 0.1, 0.4, 100


class GaussianEps(ModelMixin, ConfigMixin):
    """The exact noise prediction for data x_0 ~ N(mean, std^2) under the linear schedule, in float64."""

    @register_to_config
    def __init__(self, sample_size: int = 4, in_channels: int = 1, mean: float = MEAN, std: float = STD,
                 num_train_timesteps: int = T, beta_start: float = 1e-4, beta_end: float = 0.02):
        super().__init__()
        betas = np.linspace(beta_start, beta_end, num_train_timesteps)
        self.register_buffer("alphas_cumprod", torch.tensor(np.cumprod(1 - betas)))
        self.anchor = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))  # gives the model a dtype/device

    def forward(self, sample, timestep, return_dict=True):
        a = self.alphas_cumprod[torch.as_tensor(timestep, device=sample.device).long()]
        a = a.reshape(-1, 1, 1, 1) if a.ndim else a
        eps = (1 - a).sqrt() * (sample - a.sqrt() * self.config.mean) / (a * self.config.std**2 + 1 - a)
        eps = eps.to(sample.dtype)
        return UNet2DOutput(sample=eps) if return_dict else (eps,)


def _pipe(scheduler_cls="DDPMScheduler", **config):
    scheduler = getattr(ddpm_hf, scheduler_cls)(num_train_timesteps=T, clip_sample=False, **config)
    pipe = DDPMPipeline(GaussianEps(), scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _gaussian_images(n, seed=0):
    x = MEAN + STD * torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return ((x.clamp(-1, 1) + 1) / 2)  # in [0, 1], as the pipeline takes images


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ---- inversion and interpolation ---------------------------------------------------------------------------------


def test_inversion_reconstruction_error_falls_as_steps_grow():
    pipe = _pipe()
    images = _gaussian_images(16)
    errors = []
    for steps in (2, 5, 20, 100):
        latents = pipe.invert(images, num_inference_steps=steps)
        assert latents.shape == (16, 1, 4, 4) and latents.dtype == torch.float64
        recon = pipe.decode(latents, num_inference_steps=steps, output_type="pt").images
        errors.append(((recon - images) ** 2).mean().item())
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-4 and errors[0] > 10 * errors[-1], errors


def test_inversion_accepts_pil_and_numpy_and_checks_inputs():
    pipe = _pipe()
    images = _gaussian_images(2).float()
    as_np = images.permute(0, 2, 3, 1).numpy()
    torch.testing.assert_close(pipe.invert(as_np, 5), pipe.invert(images, 5))
    pil = pipe.decode(pipe.invert(images, 5), 5).images
    assert pipe.invert(pil, 5).shape == (2, 1, 4, 4)
    with pytest.raises(ValueError, match=r"images values must be finite and in \[0, 1\]"):
        pipe.invert(images * 2 - 1)
    with pytest.raises(ValueError, match="images must have shape"):
        pipe.invert(torch.rand(2, 3, 4, 4))
    with pytest.raises(TypeError, match="images"):
        pipe.invert("a picture")
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipe.invert(images, 0)
    with pytest.raises(ValueError, match="latents"):
        pipe.decode(torch.zeros(1, 1, 8, 8))


def test_slerp_endpoints_norm_and_angle():
    a, b = torch.randn(2, 1, 4, 4, generator=_gen(0), dtype=torch.float64)
    b = b * a.norm() / b.norm()
    out = slerp(a, b, torch.tensor([0.0, 0.5, 1.0]))
    torch.testing.assert_close(out[0], a)
    torch.testing.assert_close(out[2], b)
    torch.testing.assert_close(out[1].norm(), a.norm())
    cos = lambda u, v: (u.flatten() @ v.flatten()) / (u.norm() * v.norm())  # noqa: E731
    torch.testing.assert_close(torch.arccos(cos(a, out[1])), torch.arccos(cos(a, b)) / 2)
    torch.testing.assert_close(slerp(a, a, torch.tensor([0.3]))[0], a)  # parallel: no division by sin(0)


def test_interpolate_decodes_slerped_latents_and_reconstructs_image_endpoints():
    pipe = _pipe()
    a, b = torch.randn(2, 1, 1, 4, 4, generator=_gen(1), dtype=torch.float64)
    out = pipe.interpolate(a, b[0], num_points=4, num_inference_steps=10, output_type="pt").images
    assert out.shape == (4, 1, 4, 4)
    ends = pipe.decode(torch.cat([a, b]), num_inference_steps=10, output_type="pt").images
    torch.testing.assert_close(out[[0, 3]], ends)
    images = _gaussian_images(2, seed=3)
    out = pipe.interpolate(images[:1], images[1:], num_points=3, num_inference_steps=100, input_type="images",
                           output_type="pt").images
    assert ((out[[0, 2]] - images) ** 2).mean() < 1e-4
    with pytest.raises(ValueError, match="num_points"):
        pipe.interpolate(a, b, num_points=1)
    with pytest.raises(ValueError, match="input_type"):
        pipe.interpolate(a, b, input_type="pictures")
    with pytest.raises(ValueError, match="a must have shape"):
        pipe.interpolate(torch.zeros(2, 1, 4, 4), b)
    with pytest.raises(ValueError, match="one image for a and one for b"):
        pipe.interpolate(images, images[:1], input_type="images", num_inference_steps=2)


# ---- SDEdit -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strength", [0.3, 1.0])
def test_img2img_equals_a_loop_over_diffusers_ddim(strength):
    pipe = _pipe("DDIMScheduler")
    images = _gaussian_images(3)
    got = pipe.img2img(images, strength=strength, num_inference_steps=10, generator=_gen(4), output_type="pt").images
    oracle = diffusers.DDIMScheduler(num_train_timesteps=T, clip_sample=False)
    oracle.set_timesteps(10)
    timesteps = oracle.timesteps[10 - int(10 * strength):]
    x0 = images * 2 - 1
    noise = torch.randn(x0.shape, generator=_gen(4), dtype=torch.float64)
    x = oracle.add_noise(x0, noise, timesteps[:1].repeat(3))
    for t in timesteps:
        x = oracle.step(pipe.unet(x, t).sample, t, x).prev_sample
    torch.testing.assert_close(got, (x / 2 + 0.5).clamp(0, 1), atol=1e-6, rtol=0)


def test_img2img_runs_strength_times_steps_and_checks_strength():
    pipe = _pipe()
    calls = []
    pipe.unet.register_forward_hook(lambda *args: calls.append(1))
    images = _gaussian_images(2)
    out = pipe.img2img(images, strength=0.25, num_inference_steps=20, generator=_gen(0), output_type="pt").images
    assert len(calls) == 5 and out.shape == images.shape
    for bad in (0.0, 1.5, -1, "high", True):
        with pytest.raises(ValueError, match="strength"):
            pipe.img2img(images, strength=bad)
    with pytest.raises(ValueError, match="strength"):
        pipe.img2img(images, strength=0.01, num_inference_steps=10)
    with pytest.raises(ValueError, match="generator"):
        pipe.img2img(images, generator=[_gen(0)])


# ---- RePaint ------------------------------------------------------------------------------------------------------


# The walk against the reference schedule and Algorithm 1 with a pixel-coupling network: tests/test_pipeline_repaint.py


def test_inpaint_keeps_known_pixels_exactly_and_fills_the_rest_from_the_prior():
    pipe = _pipe()
    images = _gaussian_images(256).float()
    mask = torch.zeros(4, 4)
    mask[:, :2] = 1
    out = pipe.inpaint(images, mask, num_inference_steps=T, jump_length=10, jump_n_sample=2, generator=_gen(0),
                       output_type="np").images
    expected = images.permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(out[:, :, :2], expected[:, :, :2])
    # Pixels are independent, so the filled ones follow the prior N(MEAN, STD^2) (a little narrower after the
    # [0, 1] clamp and the finite chain: plain sampling of this model gives std 0.385).
    filled = out[:, :, 2:] * 2 - 1
    assert abs(filled.mean() - MEAN) < 0.03 and abs(filled.std() - STD) < 0.04
    assert not np.allclose(out[:, :, 2:], expected[:, :, 2:])


def test_inpaint_checks_its_inputs():
    pipe = _pipe()
    images = _gaussian_images(2)
    with pytest.raises(ValueError, match="mask must have shape"):
        pipe.inpaint(images, torch.ones(3, 3))
    with pytest.raises(ValueError, match="mask must have shape"):
        pipe.inpaint(images, torch.ones(3, 1, 4, 4))
    with pytest.raises(ValueError, match="mask values"):
        pipe.inpaint(images, torch.full((4, 4), 2.0))
    with pytest.raises(ValueError, match="jump_length"):
        pipe.inpaint(images, torch.ones(4, 4), num_inference_steps=5, jump_length=6)
    with pytest.raises(ValueError, match="generator"):
        pipe.inpaint(images, torch.ones(4, 4), generator=[_gen(0)] * 3)


# ---- the variational bound ------------------------------------------------------------------------------------------


def _reference_terms(x0, noises, variance_type):
    """Every bound term in bits/dim for the exact Gaussian model, written out from DDPM eq. 4-7, 13 (numpy)."""
    ac = np.cumprod(1 - np.linspace(1e-4, 0.02, T))
    var_q1 = (1 - ac[0]) / (1 - ac[1]) * (1 - ac[1] / ac[0])
    terms = []
    for t in range(T):
        a, ap = ac[t], (ac[t - 1] if t else 1.0)
        beta = 1 - a / ap
        xt = math.sqrt(a) * x0 + math.sqrt(1 - a) * noises[t]
        eps = math.sqrt(1 - a) * (xt - math.sqrt(a) * MEAN) / (a * STD**2 + 1 - a)
        x0_hat = (xt - math.sqrt(1 - a) * eps) / math.sqrt(a)
        c0, ct = math.sqrt(ap) * beta / (1 - a), math.sqrt(1 - beta) * (1 - ap) / (1 - a)
        mu_model = c0 * x0_hat + ct * xt
        var_q = (1 - ap) / (1 - a) * beta
        var_model = var_q1 if t == 0 else (var_q if variance_type == "fixed_small" else beta)
        if t == 0:
            sd = math.sqrt(var_model)
            upper = np.where(x0 > 0.999, 1.0, ndtr((x0 + 1 / 255 - mu_model) / sd))
            lower = np.where(x0 < -0.999, 0.0, ndtr((x0 - 1 / 255 - mu_model) / sd))
            nats = -np.log(upper - lower)
        else:
            mu_q = c0 * x0 + ct * xt
            nats = 0.5 * (np.log(var_model / var_q) + var_q / var_model - 1 + (mu_q - mu_model) ** 2 / var_model)
        terms.append(nats.reshape(len(x0), -1).mean(1) / math.log(2))
    prior = 0.5 * (-np.log(1 - ac[-1]) + (1 - ac[-1]) + ac[-1] * x0**2 - 1)
    return np.stack(terms, 1), prior.reshape(len(x0), -1).mean(1) / math.log(2)


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_log_likelihood_matches_the_terms_written_out(variance_type):
    pipe = _pipe(variance_type=variance_type)
    images = torch.round(_gaussian_images(3) * 255) / 255
    out = pipe.log_likelihood(images, generator=_gen(7))
    replay = _gen(7)
    noises = [torch.randn((3, 1, 4, 4), generator=replay, dtype=torch.float64).numpy() for _ in range(T)]
    terms, prior = _reference_terms((images * 2 - 1).numpy(), noises, variance_type)
    np.testing.assert_allclose(out.terms_bpd.numpy(), terms, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(out.prior_bpd.numpy(), prior, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(out.bits_per_dim.numpy(), prior + terms.sum(1), rtol=1e-9)
    np.testing.assert_allclose(out.log_likelihood.numpy(), -(prior + terms.sum(1)) * 16 * math.log(2), rtol=1e-9)


def test_log_likelihood_kl_terms_average_to_their_closed_form_expectation():
    """E over x_t of each KL has a closed form here: x_0 - x0_hat is affine in the Gaussian noise."""
    pipe = _pipe()
    x0_value = 0.3
    images = torch.full((4096, 1, 1, 1), (x0_value + 1) / 2, dtype=torch.float64)
    pipe.unet.register_to_config(sample_size=1)
    out = pipe.log_likelihood(images, generator=_gen(0))
    ac = np.cumprod(1 - np.linspace(1e-4, 0.02, T))
    x0 = round((x0_value + 1) / 2 * 255) / 255 * 2 - 1
    for t in (1, 10, 50, 99):
        a, ap = ac[t], ac[t - 1]
        beta, d = 1 - a / ap, a * STD**2 + 1 - a
        g = math.sqrt(a) * STD**2 / d
        expected_sq = ((1 - a) / d) ** 2 * (x0 - MEAN) ** 2 + g**2 * (1 - a)
        c0, var_q = math.sqrt(ap) * beta / (1 - a), (1 - ap) / (1 - a) * beta
        expected = c0**2 * expected_sq / (2 * var_q) / math.log(2)
        samples = out.terms_bpd[:, t].numpy()
        assert abs(samples.mean() - expected) < 4 * samples.std() / math.sqrt(len(samples)), (t, samples.mean(), expected)


def test_log_likelihood_quantises_to_8_bits_and_checks_inputs():
    pipe = _pipe()
    images = _gaussian_images(2)
    a = pipe.log_likelihood(images, generator=_gen(1)).bits_per_dim
    b = pipe.log_likelihood(torch.round(images * 255) / 255, generator=_gen(1)).bits_per_dim
    torch.testing.assert_close(a, b)
    assert a.shape == (2,) and a.dtype == torch.float64 and torch.isfinite(a).all()
    with pytest.raises(ValueError, match=r"images values"):
        pipe.log_likelihood(images + 1)
    with pytest.raises(ValueError, match="generator"):
        pipe.log_likelihood(images, generator=[_gen(0)])
