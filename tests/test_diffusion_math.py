"""The float64 maths core against diffusers' tables, closed forms from the papers, and torch.distributions."""

import math

import diffusers
import mpmath
import pytest
import scipy.stats
import torch
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr as diffusers_rescale
from hypothesis import given, settings
from hypothesis import strategies as st

from ddpm_hf import diffusion_math as dm

alphas = st.floats(1e-4, 1 - 1e-4)


@pytest.mark.parametrize("T", [1000, 50])
@pytest.mark.parametrize("schedule", dm.BETA_SCHEDULES)
def test_betas_match_diffusers(T, schedule):
    ours = dm.make_betas(T, 1e-4, 0.02, schedule)
    theirs = diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule=schedule).betas
    assert ours.dtype == torch.float64 and ours.shape == (T,)
    torch.testing.assert_close(ours.float(), theirs, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(dm.alphas_cumprod_from_betas(ours).float(),
                               diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule=schedule).alphas_cumprod,
                               rtol=2e-5, atol=0)


def test_rescale_zero_terminal_snr():
    betas = dm.make_betas(1000)
    rescaled = dm.rescale_zero_terminal_snr(betas)
    ac, ac0 = dm.alphas_cumprod_from_betas(rescaled), dm.alphas_cumprod_from_betas(betas)
    assert ac[-1] == 0 and torch.isclose(ac[0], ac0[0], rtol=1e-12)
    torch.testing.assert_close(rescaled.float(), diffusers_rescale(betas.float()), rtol=1e-4, atol=1e-6)


def test_trained_betas_and_name_checks():
    assert torch.equal(dm.make_betas(3, trained_betas=[0.1, 0.2, 0.3]), torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64))
    with pytest.raises(ValueError, match="beta_schedule must be one of"):
        dm.make_betas(3, beta_schedule="nope", trained_betas=[0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="must not exceed"):
        dm.make_betas(10, 0.5, 0.1)


def _closed_form_alphas_cumprod(schedule, T, start=1e-4, end=0.02):
    """bar(alpha)_t from the papers' definitions in float64, independent of make_betas / torch.cumprod.

    linear (DDPM sec. 4): beta_i = start + i (end - start) / (T - 1), bar(alpha)_t = exp(sum_{i<=t} log1p(-beta_i));
    cosine (improved DDPM eq. 17): bar(alpha)_t = f(t + 1) / f(0) wherever the 0.999 cap on beta is inactive.
    """
    if schedule == "linear":
        logs = [math.log1p(-(start + i * (end - start) / (T - 1))) for i in range(T)]
        return torch.tensor([math.exp(math.fsum(logs[: t + 1])) for t in range(T)], dtype=torch.float64)
    f = [math.cos((i / T + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(T + 1)]
    return torch.tensor([f[t + 1] / f[0] for t in range(T)], dtype=torch.float64)


@pytest.mark.parametrize("T", [1000, 50])
@pytest.mark.parametrize("schedule", dm.BETA_SCHEDULES)
@pytest.mark.parametrize("zero_snr", [False, True])
def test_noise_schedule_matches_diffusers_tables(T, schedule, zero_snr):
    theirs = diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule=schedule, rescale_betas_zero_snr=zero_snr)
    ours = dm.NoiseSchedule.from_config(theirs.config)
    assert ours.betas.dtype == ours.alphas_cumprod.dtype == torch.float64
    assert ours.betas.shape == ours.alphas_cumprod.shape == (T,) and ours.num_train_timesteps == T
    # diffusers builds in float32: betas agree to float32 rounding; its float32 cumprod drifts by ~1e-7 absolute.
    if not zero_snr:
        torch.testing.assert_close(ours.betas, theirs.betas.double(), rtol=1e-6, atol=0)
    torch.testing.assert_close(ours.alphas_cumprod, theirs.alphas_cumprod.double(), rtol=2e-5, atol=1e-6)
    # diffusers' own rescale (Lin et al. 2024, Algorithm 1) run on our float64 betas: equal to float64 rounding.
    plain = dm.NoiseSchedule.from_config({**theirs.config, "rescale_betas_zero_snr": False})
    if zero_snr:
        torch.testing.assert_close(ours.betas, diffusers_rescale(plain.betas.clone()), rtol=1e-12, atol=1e-15)
        assert ours.alphas_cumprod[-1] == 0
    if schedule in ("linear", "squaredcos_cap_v2"):
        closed = _closed_form_alphas_cumprod(schedule, T)
        uncapped = plain.betas < 0.999
        torch.testing.assert_close(plain.alphas_cumprod[uncapped], closed[uncapped], rtol=1e-12, atol=0)


def test_noise_schedule_trained_betas_zero_snr_and_defaults():
    betas = [0.01, 0.05, 0.2, 0.5]
    plain = dm.NoiseSchedule.from_config({"num_train_timesteps": 4, "trained_betas": betas, "beta_schedule": "sigmoid"})
    assert plain.betas.tolist() == betas  # trained_betas override beta_schedule, exactly
    expect = [math.prod(1 - b for b in betas[: t + 1]) for t in range(4)]
    torch.testing.assert_close(plain.alphas_cumprod, torch.tensor(expect, dtype=torch.float64), rtol=1e-15, atol=0)
    rescaled = dm.NoiseSchedule.from_config({"num_train_timesteps": 4, "trained_betas": betas,
                                             "rescale_betas_zero_snr": True})
    # Lin et al. 2024, Algorithm 1 by hand: sqrt(bar(alpha)) shifted to end at 0 and scaled to keep its first value.
    root = [math.sqrt(a) for a in expect]
    shifted = [(r - root[-1]) * root[0] / (root[0] - root[-1]) for r in root]
    torch.testing.assert_close(rescaled.alphas_cumprod, torch.tensor([r * r for r in shifted], dtype=torch.float64),
                               rtol=1e-12, atol=1e-300)
    # Missing keys take diffusers' defaults; extra keys (a DDIM config) are ignored.
    default = dm.NoiseSchedule.from_config(diffusers.DDIMScheduler().config)
    assert torch.equal(default.betas, dm.NoiseSchedule.from_config({}).betas)
    torch.testing.assert_close(default.betas, diffusers.DDPMScheduler().betas.double(), rtol=1e-6, atol=0)
    # bar(alpha)_{t-1} with bar(alpha)_{-1} = 1, and the clipped log posterior variance (DDPM eq. 7 at t = 1).
    t = torch.tensor([0, 1, 3])
    assert plain.alpha_prod_prev(t).tolist() == [1.0, expect[0], expect[2]]
    min_log, max_log = plain.log_variance_bounds(t)
    tilde = [(1 - expect[0]) / (1 - expect[1]) * betas[1], (1 - expect[2]) / (1 - expect[3]) * betas[3]]
    torch.testing.assert_close(min_log, torch.tensor([tilde[0], tilde[0], tilde[1]], dtype=torch.float64).log())
    torch.testing.assert_close(max_log, torch.tensor([betas[0], betas[1], betas[3]], dtype=torch.float64).log())


@pytest.mark.parametrize("key, value", [("num_train_timesteps", 0), ("beta_schedule", "cosine"),
                                        ("beta_start", 1.5), ("trained_betas", [0.1, 0.2]),
                                        ("rescale_betas_zero_snr", "yes"), ("trained_betas", "abc"),
                                        ("trained_betas", [[0.1, 0.2, 0.3]]), ("trained_betas", [0.1, None, 0.2]),
                                        ("trained_betas", 5), ("trained_betas", [0.1, float("nan"), 0.2])])
def test_noise_schedule_names_the_bad_key(key, value):
    with pytest.raises(ValueError, match=key):
        dm.NoiseSchedule.from_config({"num_train_timesteps": 3, key: value})
    with pytest.raises(ValueError, match="num_train_timesteps >= 2"):
        dm.NoiseSchedule.from_config({"num_train_timesteps": 1}).log_variance_bounds(0)


@settings(max_examples=50, deadline=None)
@given(a=alphas, prediction_type=st.sampled_from(dm.PREDICTION_TYPES))
def test_prediction_conversions_invert_the_forward_process(a, prediction_type):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64)
    x_t = dm.q_sample(x0, eps, a)
    torch.testing.assert_close(x_t, math.sqrt(a) * x0 + math.sqrt(1 - a) * eps)  # DDPM eq. 4
    target = {"epsilon": eps, "sample": x0, "v_prediction": dm.velocity(x0, eps, a)}[prediction_type]
    torch.testing.assert_close(dm.predict_x0(target, x_t, a, prediction_type), x0)
    torch.testing.assert_close(dm.predict_eps(target, x_t, a, prediction_type), eps)
    torch.testing.assert_close(dm.eps_from_x0(x0, x_t, a), eps)


@settings(max_examples=50, deadline=None)
@given(a_prev=alphas, ratio=st.floats(0.05, 0.999))
def test_posterior_is_the_gaussian_conditional(a_prev, ratio):
    """q(x_prev | x_t, x_0) by Bayes' rule for x_prev ~ N(sqrt(a_prev) x0, 1 - a_prev), x_t ~ N(sqrt(r) x_prev, 1 - r)."""
    a_t = a_prev * ratio
    coef_x0, coef_xt, var = dm.q_posterior_coefficients(a_t, a_prev)
    precision = 1 / (1 - a_prev) + ratio / (1 - ratio)
    assert math.isclose(var.item(), 1 / precision, rel_tol=1e-9)
    assert math.isclose(coef_x0.item(), math.sqrt(a_prev) / (1 - a_prev) / precision, rel_tol=1e-9)
    assert math.isclose(coef_xt.item(), math.sqrt(ratio) / (1 - ratio) / precision, rel_tol=1e-9)
    assert math.isclose(dm.step_beta(a_t, a_prev).item(), 1 - ratio, rel_tol=1e-12)
    # DDIM eq. 16 with eta = 1 is this standard deviation, and eq. 12 then gives this mean (DDIM sec. 4.1).
    sigma = dm.ddim_sigma(a_t, a_prev, 1.0)
    assert math.isclose(sigma.item() ** 2, var.item(), rel_tol=1e-9)
    x0, eps = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    x_t = dm.q_sample(x0, eps, a_t)
    torch.testing.assert_close(dm.ddim_step(x0, eps, a_prev, sigma), dm.q_posterior_mean(x0, x_t, a_t, a_prev))


def test_variance_bounds_and_learned_range():
    min_log, max_log = dm.posterior_log_variance_bounds(torch.tensor([0.5, 0.3]), torch.tensor([0.6, 1.0]))
    _, _, var = dm.q_posterior_coefficients(torch.tensor(0.5), torch.tensor(0.6))
    torch.testing.assert_close(min_log[0], var.log())
    assert min_log[1] == math.log(1e-20) and torch.isfinite(min_log).all()
    torch.testing.assert_close(max_log, torch.tensor([math.log(1 - 0.5 / 0.6), math.log(0.7)], dtype=torch.float64))
    assert dm.fixed_log_variance("fixed_small_log", min_log, max_log) is min_log
    assert dm.fixed_log_variance("fixed_large", min_log, max_log) is max_log
    v = torch.tensor([-1.0, 1.0, 0.0])
    torch.testing.assert_close(dm.learned_range_log_variance(v, -4.0, -2.0), torch.tensor([-4.0, -2.0, -3.0]))
    with pytest.raises(ValueError, match="variance_type"):
        dm.fixed_log_variance("learned", min_log, max_log)


def test_combine_shortcuts_agree_with_the_plain_formula():
    a, b = torch.randn(4), torch.randn(4)
    for c_a, c_b in ((0.0, 1.0), (0.0, 2.5), (1.5, 0.0), (1.0, -2.0), (0.3, 0.7), (torch.tensor(0.3), torch.tensor(0.7))):
        torch.testing.assert_close(dm.combine(c_a, a, c_b, b), c_a * a + c_b * b)


def test_dynamic_threshold_matches_diffusers():
    x = 3 * torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    theirs = diffusers.DDPMScheduler(thresholding=True, sample_max_value=2.0)._threshold_sample(x)
    torch.testing.assert_close(dm.dynamic_threshold(x, 0.995, 2.0), theirs)


def test_likelihood_terms():
    m1, m2 = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    l1, l2 = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    expect = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * l1).exp()),
                                               torch.distributions.Normal(m2, (0.5 * l2).exp()))
    torch.testing.assert_close(dm.normal_kl(m1, l1, m2, l2), expect)


def _mp_log_bin_mass(x: float, mean: float, std: float) -> float:
    """log of a bin's mass under N(mean, std^2) in 50-digit arithmetic (DDPM eq. 13's bins of half-width 1/255).

    Arbitrary-precision floats do not underflow, so the lower tail is a plain CDF difference; above the mean the
    same mass is taken as a difference of survival functions, which 50 digits resolve where 1 - tiny would not.
    """
    with mpmath.workdps(50):
        x, mean, std = mpmath.mpf(x), mpmath.mpf(mean), mpmath.mpf(std)
        low, high = (x - mpmath.mpf(1) / 255 - mean) / std, (x + mpmath.mpf(1) / 255 - mean) / std
        if x < -0.999:
            low = -mpmath.inf
        if x > 0.999:
            high = mpmath.inf
        if low + high <= 0:
            return float(mpmath.log(mpmath.ncdf(high) - mpmath.ncdf(low)))
        return float(mpmath.log(mpmath.ncdf(-low) - mpmath.ncdf(-high)))


def _ours(x, mean, std):
    x, mean = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(mean, dtype=torch.float64)
    return dm.discretized_gaussian_log_likelihood(x, mean, torch.full_like(x, math.log(std)))


@pytest.mark.parametrize("std", [0.003, 0.01, 0.3])
def test_discretized_gaussian_log_likelihood_from_0_to_40_sigma_both_tails(std):
    """Interior and edge bins, the mean 0..40 std below and above the bin: within float64 rounding of mpmath."""
    bins = [-1.0, -1 + 2 / 255, -0.5, 0.2, 1 - 2 / 255, 1.0]
    cases = [(x, x + sign * k * std) for x in bins for k in range(41) for sign in (1, -1)]
    xs, means = zip(*cases)
    expect = torch.tensor([_mp_log_bin_mass(x, m, std) for x, m in cases], dtype=torch.float64)
    assert expect.min() < -700  # the old CDF difference clamped at 1e-300 floored everything at -690.8
    torch.testing.assert_close(_ours(xs, means, std), expect, rtol=1e-12, atol=1e-12)
    # The edge bins against scipy too: log Phi(upper) at x = -1, log(1 - Phi(lower)) at x = +1.
    k = torch.arange(41, dtype=torch.float64)
    left = scipy.stats.norm.logcdf(((-1 + 1 / 255) - (-1 + k * std)).numpy() / std)
    right = scipy.stats.norm.logsf(((1 - 1 / 255) - (1 - k * std)).numpy() / std)
    torch.testing.assert_close(_ours(torch.full_like(k, -1.0), -1 + k * std, std), torch.from_numpy(left),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_ours(torch.ones_like(k), 1 - k * std, std), torch.from_numpy(right),
                               rtol=1e-12, atol=1e-12)


def test_discretized_gaussian_bins_are_the_gaussian_masses_and_sum_to_one():
    # DDPM eq. 13: each of the 256 bins has its Gaussian mass (any CDF with consistent edges would sum to one).
    bins = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, log_scale in ((0.1, -2.0), (-0.9, -4.0), (0.0, 0.5)):
        ll = dm.discretized_gaussian_log_likelihood(bins, torch.full_like(bins, mean), torch.full_like(bins, log_scale))
        expect = [_mp_log_bin_mass(x, mean, math.exp(log_scale)) for x in bins.tolist()]
        torch.testing.assert_close(ll, torch.tensor(expect, dtype=torch.float64), rtol=1e-12, atol=1e-12)
        assert math.isclose(ll.exp().sum().item(), 1.0, rel_tol=1e-9)


def test_decoder_nll_of_an_image_with_two_pixels_15_levels_off():
    """A 16x16 image decoded at DDPM's t = 0 std (sqrt of beta_tilde_1, linear schedule), two pixels 15 levels off.

    Every other pixel sits at the centre of its bin: mass erf(h / (std sqrt 2)) with h = 1/255. The two off pixels
    lie ~15.4-16.5 std out, where the old CDF difference rounded to 0 (9.08 bits/dim instead of 2.67).
    """
    std = math.exp(0.5 * dm.NoiseSchedule.from_config({}).log_variance_bounds(0)[0].item())
    x = torch.linspace(-0.8, 0.8, 256, dtype=torch.float64).mul(127.5).round().div(127.5).reshape(16, 16)
    mean = x.clone()
    mean[3, 4] += 30 / 255
    mean[9, 1] -= 30 / 255
    bits = -_ours(x, mean, std).mean().item() / math.log(2)
    with mpmath.workdps(50):
        centred = float(mpmath.log(mpmath.erf(mpmath.mpf(1) / 255 / (std * mpmath.sqrt(2)))))
    off = [_mp_log_bin_mass(x[i, j].item(), mean[i, j].item(), std) for i, j in ((3, 4), (9, 1))]
    expect = -(254 * centred + sum(off)) / 256 / math.log(2)
    assert math.isclose(bits, expect, rel_tol=1e-12) and 2.6 < bits < 2.7


def test_decoder_log_likelihood_gradient_is_finite_and_informative_in_the_tails():
    # 30 std off: the log mass still falls as the mean moves away and rises as the scale grows (the clamp gave 0).
    x = torch.tensor([0.2, 1.0, -1.0], dtype=torch.float64)
    mean = (x + torch.tensor([0.3, -0.3, 0.3], dtype=torch.float64)).requires_grad_()
    log_scale = torch.full_like(x, math.log(0.01)).requires_grad_()
    dm.discretized_gaussian_log_likelihood(x, mean, log_scale).sum().backward()
    assert torch.isfinite(mean.grad).all() and torch.isfinite(log_scale.grad).all()
    assert (mean.grad * torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64) < 0).all() and (log_scale.grad > 0).all()


def test_gather_and_as_alpha_shape_and_dtype():
    table = torch.arange(10, dtype=torch.float64)
    like = torch.zeros(3, 2, 4, 4, dtype=torch.float16)
    g = dm.gather(table, torch.tensor([1, 2, 3]), like)
    assert g.shape == (3, 1, 1, 1) and g.dtype == torch.float16 and g.flatten().tolist() == [1, 2, 3]
    assert dm.as_alpha(0.5, like).shape == () and dm.as_alpha(torch.ones(3), like).shape == (3, 1, 1, 1)
