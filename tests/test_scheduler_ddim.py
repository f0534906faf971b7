"""DDIMScheduler: the table-driven previous timestep (diffusers issue 12633), inversion, and DDIM(eta=1) = DDPM."""

import math

import diffusers
import pytest
import torch

from ddpm_hf import DDIMScheduler, DDPMScheduler

SHAPE = (2, 1, 4, 4)


def sample(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def ddim_formula(x, eps, a_t, a_prev):
    """DDIM eq. 12 with sigma = 0, no clipping, in float64."""
    x0 = (x.double() - math.sqrt(1 - a_t) * eps.double()) / math.sqrt(a_t)
    return math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps.double()


@pytest.mark.parametrize("spacing,n", [("trailing", 7), ("linspace", 10)])
def test_previous_timestep_comes_from_the_table(spacing, n):
    """Issue 12633: diffusers steps to t - T // N. For 7 trailing steps the table is [999, 856, ...] but diffusers
    lands on 857; ours lands on the table's next entry."""
    ours = DDIMScheduler(timestep_spacing=spacing, clip_sample=False)
    theirs = diffusers.DDIMScheduler(timestep_spacing=spacing, clip_sample=False)
    ours.set_timesteps(n)
    theirs.set_timesteps(n)
    table = ours.timesteps.tolist()
    assert table == theirs.timesteps.tolist()
    t, nxt = table[0], table[1]
    x, eps = sample(0), sample(1)
    ac = ours.noise_schedule.alphas_cumprod
    expect = ddim_formula(x, eps, ac[t].item(), ac[nxt].item())
    got = ours.step(eps, ours.timesteps[0], x).prev_sample
    torch.testing.assert_close(got.double(), expect, rtol=1e-5, atol=1e-5)
    wrong = ddim_formula(x, eps, ac[t].item(), ac[t - 1000 // n].item())
    torch.testing.assert_close(theirs.step(eps, t, x).prev_sample.double(), wrong, rtol=1e-4, atol=1e-4)
    assert t - 1000 // n != nxt and not torch.allclose(got.double(), wrong, atol=1e-3)


def test_last_step_lands_on_final_alpha():
    for alpha_one in (True, False):
        s = DDIMScheduler(set_alpha_to_one=alpha_one, timestep_spacing="trailing", clip_sample=False)
        s.set_timesteps(10)
        x, eps = sample(0), sample(1)
        final = 1.0 if alpha_one else s.noise_schedule.alphas_cumprod[0].item()
        assert s.final_alpha_cumprod_float64.dtype == torch.float64 and s.final_alpha_cumprod_float64.item() == final
        stock = diffusers.DDIMScheduler(set_alpha_to_one=alpha_one).final_alpha_cumprod
        assert s.final_alpha_cumprod.dtype == stock.dtype == torch.float32 and torch.equal(s.final_alpha_cumprod, stock)
        got = s.step(eps, 99, x).prev_sample
        torch.testing.assert_close(got.double(), ddim_formula(x, eps, s.noise_schedule.alphas_cumprod[99].item(), final),
                                   rtol=1e-5, atol=1e-5)


def test_eta_one_over_all_steps_equals_ddpm_fixed_small():
    """DDIM eq. 16 with eta = 1 is the DDPM posterior (sec. 4.1); same generator, same 1000-step trajectory."""
    ddim, ddpm = DDIMScheduler(clip_sample=False), DDPMScheduler(clip_sample=False, variance_type="fixed_small")
    ddim.set_timesteps(1000)
    ddpm.set_timesteps(1000)
    assert torch.equal(ddim.timesteps, ddpm.timesteps)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    x = sample(0)
    for t in ddim.timesteps:  # both step from the same x_t; each step must agree
        eps = torch.tanh(x) * 0.8
        a = ddim.step(eps, t, x, eta=1.0, generator=g1).prev_sample
        x = ddpm.step(eps, t, x, generator=g2).prev_sample
        torch.testing.assert_close(a, x, rtol=1e-5, atol=1e-5)


def test_eta_one_with_clipping_equals_ddpm_with_clipped_model_output():
    ddim, ddpm = DDIMScheduler(), DDPMScheduler()
    ddim.set_timesteps(50)
    ddpm.set_timesteps(50)
    x = sample(0)
    for t in ddim.timesteps[:5]:
        eps = 2.0 * torch.tanh(x)  # large enough that x_0 gets clipped
        a = ddim.step(eps, t, x, eta=1.0, use_clipped_model_output=True, generator=torch.Generator().manual_seed(int(t)))
        b = ddpm.step(eps, t, x, generator=torch.Generator().manual_seed(int(t)))
        assert (a.pred_original_sample.abs() == 1).any()
        torch.testing.assert_close(a.prev_sample, b.prev_sample, rtol=1e-5, atol=1e-5)
        x = b.prev_sample


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_inverse_step_is_undone_by_step(prediction_type):
    """inverse_step(t -> t') then step(t' -> t) with the same eps returns the input (eta = 0, no clipping)."""
    s = DDIMScheduler(prediction_type=prediction_type, clip_sample=False)
    s.set_timesteps(timesteps=[700, 300])
    x, eps = sample(0), sample(1)
    a_300, a_700 = s.noise_schedule.alphas_cumprod[300].item(), s.noise_schedule.alphas_cumprod[700].item()
    # the model output that encodes the same eps at each level
    x0 = (x.double() - math.sqrt(1 - a_300) * eps.double()) / math.sqrt(a_300)

    def output(a, x_t):
        if prediction_type == "epsilon":
            return eps
        if prediction_type == "sample":
            return x0.float()
        return (math.sqrt(a) * eps.double() - math.sqrt(1 - a) * x0).float()

    up = s.inverse_step(output(a_300, x), 300, x, 700)
    torch.testing.assert_close(up.prev_sample.double(), math.sqrt(a_700) * x0 + math.sqrt(1 - a_700) * eps.double(),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(up.pred_original_sample.double(), x0, rtol=1e-4, atol=1e-4)
    down = s.step(output(a_700, up.prev_sample), s.timesteps[0], up.prev_sample).prev_sample
    torch.testing.assert_close(down, x, rtol=1e-4, atol=1e-4)


def test_inverse_step_from_clean_data():
    """timestep = -1 (or None): sample is x_0 at final_alpha_cumprod; eps from the model goes up to next_timestep."""
    x0, eps = sample(0).clamp(-1, 1), sample(1)
    s = DDIMScheduler()
    for timestep in (-1, None, torch.tensor(-1)):
        out = s.inverse_step(eps, timestep, x0, 400, return_dict=False)
        a = s.noise_schedule.alphas_cumprod[400].item()
        torch.testing.assert_close(out[0].double(), math.sqrt(a) * x0.double() + math.sqrt(1 - a) * eps.double(),
                                   rtol=1e-6, atol=1e-6)
        assert torch.equal(out[1], x0)
    not_one = DDIMScheduler(set_alpha_to_one=False, prediction_type="sample")
    a0, a = (not_one.noise_schedule.alphas_cumprod[i].item() for i in (0, 400))
    x_clean = math.sqrt(a0) * x0.double() + math.sqrt(1 - a0) * eps.double()
    up = not_one.inverse_step(x0, -1, x_clean.float(), 400).prev_sample
    torch.testing.assert_close(up.double(), math.sqrt(a) * x0.double() + math.sqrt(1 - a) * eps.double(),
                               rtol=1e-4, atol=1e-4)


def test_inverse_step_rejects_bad_arguments():
    s = DDIMScheduler()
    x = sample()
    with pytest.raises(ValueError, match="greater than timestep"):
        s.inverse_step(x, 500, x, 400)
    with pytest.raises(ValueError, match="next_timestep must be in"):
        s.inverse_step(x, 500, x, 1000)
    with pytest.raises(ValueError, match="timestep must be in"):
        s.inverse_step(x, -2, x, 10)
    with pytest.raises(ValueError, match="prediction_type='sample'"):
        DDIMScheduler(prediction_type="sample").inverse_step(x, -1, x, 10)


def test_step_before_set_timesteps_and_bad_step_arguments():
    s = DDIMScheduler()
    x = sample()
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(x, 999, x)
    s.set_timesteps(10)
    with pytest.raises(ValueError, match="eta must be"):
        s.step(x, 900, x, eta=-0.5)
    with pytest.raises(ValueError, match="eta must be"):
        s.step(x, 900, x, eta=float("nan"))
    with pytest.raises(ValueError, match="generator and variance_noise"):
        s.step(x, 900, x, eta=1.0, generator=torch.Generator(), variance_noise=x)
    with pytest.raises(ValueError, match="not in scheduler.timesteps"):
        s.step(x, 901, x)


def test_variance_noise_is_used_as_given():
    s = DDIMScheduler(clip_sample=False)
    s.set_timesteps(10)
    x, eps, z = sample(0), sample(1), sample(2)
    base = s.step(eps, 900, x, eta=0.0).prev_sample
    noisy = s.step(eps, 900, x, eta=0.5, variance_noise=z).prev_sample
    a_t, a_p = s.noise_schedule.alphas_cumprod[900].item(), s.noise_schedule.alphas_cumprod[800].item()
    sigma = 0.5 * math.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))
    x0 = (x.double() - math.sqrt(1 - a_t) * eps.double()) / math.sqrt(a_t)
    expect = math.sqrt(a_p) * x0 + math.sqrt(1 - a_p - sigma**2) * eps.double() + sigma * z.double()
    torch.testing.assert_close(noisy.double(), expect, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(base, noisy)
