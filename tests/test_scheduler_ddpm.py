"""DDPMScheduler: where and why it departs from diffusers 0.42.1 (docs/compatibility.md), and its own contract."""

import math

import diffusers
import pytest
import torch

from ddpm_hf import DDPMScheduler

SHAPE = (2, 1, 4, 4)


def sample(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def test_fixed_large_log_is_finite_and_equals_fixed_large():
    """diffusers issue 14569: fixed_large_log takes the sqrt of log(beta) and returns NaN; sigma^2 = beta here."""
    x, eps = sample(0), 0.5 * sample(1)
    theirs = diffusers.DDPMScheduler(variance_type="fixed_large_log")
    theirs.set_timesteps(10)
    t = theirs.timesteps[0]
    assert torch.isnan(theirs.step(eps, t, x, generator=torch.Generator().manual_seed(0)).prev_sample).all()
    results = []
    for variance_type in ("fixed_large_log", "fixed_large"):
        ours = DDPMScheduler(variance_type=variance_type)
        ours.set_timesteps(10)
        results.append(ours.step(eps, t, x, generator=torch.Generator().manual_seed(0)).prev_sample)
    assert torch.isfinite(results[0]).all()
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


def test_respaced_step_uses_beta_of_the_visited_pair():
    """The posterior of a 10-step table uses beta = 1 - a_t / a_prev, not the training beta_t (improved DDPM sec. 4)."""
    s = DDPMScheduler(variance_type="fixed_large", clip_sample=False)
    s.set_timesteps(10)
    t, prev = 500, 400
    x, eps = sample(0), sample(1)
    mean = s.step(eps, t, x, generator=torch.Generator().manual_seed(0)).prev_sample
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    a_t, a_p = s.noise_schedule.alphas_cumprod[t].item(), s.noise_schedule.alphas_cumprod[prev].item()
    beta = 1 - a_t / a_p
    x0 = (x.double() - math.sqrt(1 - a_t) * eps.double()) / math.sqrt(a_t)
    expect = math.sqrt(a_p) * beta / (1 - a_t) * x0 + math.sqrt(1 - beta) * (1 - a_p) / (1 - a_t) * x.double()
    torch.testing.assert_close(mean.double(), expect + math.sqrt(beta) * noise.double(), rtol=1e-5, atol=1e-5)
    assert beta > 10 * s.noise_schedule.betas[t].item()


@pytest.mark.parametrize("variance_type", ["fixed_large", "learned_range"])
@pytest.mark.parametrize("kwargs", [dict(timestep_spacing="trailing"), dict(steps_offset=1)])
def test_no_noise_on_the_final_step(variance_type, kwargs):
    """Algorithm 2 sets z = 0 on the step that lands on x_0. diffusers adds noise whenever t > 0, so a table ending
    at t = 99 (trailing) or t = 1 (steps_offset=1) returns a noisy image with fixed_large."""
    ours = DDPMScheduler(variance_type=variance_type, **kwargs)
    theirs = diffusers.DDPMScheduler(variance_type=variance_type, **kwargs)
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    t = ours.timesteps[-1]
    assert int(t) > 0
    x = sample(0)
    out = torch.cat([0.3 * x, torch.ones_like(x)], 1) if variance_type == "learned_range" else 0.3 * x
    a = ours.step(out, t, x, generator=torch.Generator().manual_seed(0))
    b = theirs.step(out, t, x, generator=torch.Generator().manual_seed(0))
    # Landing on bar(alpha) = 1 the posterior mean is x_0 itself: the final image is the (clipped) prediction.
    torch.testing.assert_close(a.prev_sample, a.pred_original_sample, rtol=0, atol=1e-6)
    assert (b.prev_sample - b.pred_original_sample).abs().max() > 1e-3
    # A second sample with another generator is identical: no randomness on the last step.
    again = ours.step(out, t, x, generator=torch.Generator().manual_seed(1)).prev_sample
    assert torch.equal(a.prev_sample, again)


def test_learned_is_a_log_variance():
    """improved DDPM's "learned": the extra channels are log sigma^2 (diffusers reads them as sigma^2, NaN if < 0)."""
    s = DDPMScheduler(variance_type="learned", clip_sample=False)
    s.set_timesteps(10)
    x = sample(0)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    prev = {
        log_var: s.step(torch.cat([0.2 * x, torch.full_like(x, log_var)], 1), 500, x,
                        generator=torch.Generator().manual_seed(0)).prev_sample
        for log_var in (-3.0, -1.0)
    }
    torch.testing.assert_close(prev[-1.0] - prev[-3.0], (math.exp(-0.5) - math.exp(-1.5)) * noise, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variance_type", ["learned", "learned_range"])
def test_learned_variance_needs_two_c_channels(variance_type):
    s = DDPMScheduler(variance_type=variance_type)
    s.set_timesteps(10)
    with pytest.raises(ValueError, match="2 \\* 1 channels"):
        s.step(sample(), s.timesteps[0], sample())


def test_step_without_set_timesteps_walks_the_full_chain_like_diffusers():
    ours, theirs = DDPMScheduler(), diffusers.DDPMScheduler()
    assert ours.timesteps.tolist() == theirs.timesteps.tolist() == list(range(999, -1, -1))
    x, eps = sample(0), 0.1 * sample(1)
    a = ours.step(eps, 999, x, generator=torch.Generator().manual_seed(0)).prev_sample
    b = theirs.step(eps, 999, x, generator=torch.Generator().manual_seed(0)).prev_sample
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert int(ours.previous_timestep(999)) == 998 and int(ours.previous_timestep(0)) == -1


def test_step_rejects_a_timestep_outside_the_table():
    s = DDPMScheduler()
    s.set_timesteps(10)
    with pytest.raises(ValueError, match="not in scheduler.timesteps"):
        s.step(sample(), 901, sample())
    with pytest.raises(ValueError, match="single int"):
        s.step(sample(), torch.tensor([900, 800]), sample())


def test_timestep_from_another_tensor_and_python_int_agree():
    """The fast index lookup (a view of self.timesteps) and the value lookup give the same step."""
    s = DDPMScheduler()
    s.set_timesteps(10)
    x, eps = sample(0), sample(1)
    view = s.timesteps[3]
    results = [
        s.step(eps, t, x, generator=torch.Generator().manual_seed(0)).prev_sample
        for t in (view, int(view), torch.tensor(int(view)), view.reshape(1), view.clone())
    ]
    for r in results[1:]:
        assert torch.equal(results[0], r)
    assert int(s.previous_timestep(view)) == int(s.timesteps[4])


def test_zero_terminal_snr_with_epsilon_refuses_instead_of_returning_inf():
    """diffusers issue 3851: bar(alpha)_{T-1} = 0 makes eps-prediction's x_0 infinite at t = T - 1."""
    theirs = diffusers.DDPMScheduler(rescale_betas_zero_snr=True, timestep_spacing="trailing", clip_sample=False)
    theirs.set_timesteps(10)
    x = sample()
    assert not torch.isfinite(theirs.step(0.5 * x, 999, x).pred_original_sample).all()
    ours = DDPMScheduler(rescale_betas_zero_snr=True, timestep_spacing="trailing", clip_sample=False)
    ours.set_timesteps(10)
    with pytest.raises(ValueError, match="3851"):
        ours.step(0.5 * x, 999, x)
    leading = DDPMScheduler(rescale_betas_zero_snr=True, clip_sample=False)
    leading.set_timesteps(10)
    assert torch.isfinite(leading.step(0.5 * x, 900, x).prev_sample).all()
    v = DDPMScheduler(rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction")
    v.set_timesteps(10)
    assert torch.isfinite(v.step(0.5 * x, 999, x).prev_sample).all()
