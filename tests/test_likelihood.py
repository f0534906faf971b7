"""The DDPM variational bound (`ddpm_hf.likelihood`) against the paper's equations written out in float64.

For every variance type (fixed small/large, learned, learned_range), every prediction type and with and without
clipping, each term is recomputed here from Ho et al. 2020 eq. 5-7 and 13 and Nichol & Dhariwal 2021 eq. 15:
plain Python/torch arithmetic on a trained_betas schedule, mpmath for the decoder's bin masses, and the x_t the
network was actually shown (so the reference does not depend on how the noise was drawn).
"""

import math

import pytest
import torch
from test_diffusion_math import _mp_log_bin_mass

from ddpm_hf.diffusion_math import PREDICTION_TYPES
from ddpm_hf.likelihood import variational_bound

BETAS = [0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5]
T = len(BETAS)
ABAR = [math.prod(1 - b for b in BETAS[: t + 1]) for t in range(T)]  # DDPM eq. 4
VARIANCE_TYPES = ["fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range"]


def _images(seed=0, n=3):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, 256, (n, 1, 4, 4), generator=g).double() / 127.5 - 1
    x0[0, 0, 0, :2] = torch.tensor([-1.0, 1.0])  # both edge bins
    return x0


def _posterior(t):
    """(coef_x0, coef_xt, beta_tilde) of q(x_{t-1} | x_t, x_0), DDPM eq. 6-7, with bar(alpha)_{-1} = 1."""
    a, a_prev, beta = ABAR[t], (ABAR[t - 1] if t else 1.0), BETAS[t]
    return math.sqrt(a_prev) * beta / (1 - a), math.sqrt(1 - beta) * (1 - a_prev) / (1 - a), (1 - a_prev) / (1 - a) * beta


def _model(x0, prediction_type, variance_type, calls, wobble=0.15):
    """A network that knows x0: the exact target of ``prediction_type`` plus a smooth error, and a variance output."""

    def model_fn(x_t, t, shift=0.0):
        calls.append((t, shift))
        a = ABAR[t]
        eps = (x_t - math.sqrt(a) * x0) / math.sqrt(1 - a)
        exact = {"epsilon": eps, "sample": x0, "v_prediction": math.sqrt(a) * eps - math.sqrt(1 - a) * x0}
        mean = exact[prediction_type] + wobble * torch.sin(3 * x_t + t) + shift
        if variance_type == "learned":  # a log variance between log beta_tilde_1 and log beta_t
            return torch.cat([mean, math.log(_posterior(max(t, 1))[2]) + 0.5 * (1 + torch.tanh(x_t)) * 0.7], 1)
        if variance_type == "learned_range":
            return torch.cat([mean, torch.tanh(2 * x_t - 0.3)], 1)
        return mean

    return model_fn


def _log_variance(t, variance_type, var_out):
    tilde = _posterior(t)[2] if t else _posterior(1)[2]  # improved DDPM: beta_tilde_0 = 0 is replaced by t = 1's
    if variance_type.startswith("fixed_small"):
        return torch.full_like(var_out, math.log(tilde))
    if variance_type.startswith("fixed_large"):  # beta_t, and beta_tilde_1 at t = 0 (improved-diffusion)
        return torch.full_like(var_out, math.log(BETAS[t] if t else tilde))
    if variance_type == "learned":
        return var_out
    frac = (var_out + 1) / 2  # improved DDPM eq. 15
    return frac * math.log(BETAS[t]) + (1 - frac) * math.log(tilde)


def _reference_term(x0, x_t, output, t, prediction_type, variance_type, clip):
    """L_t in bits/dim per image: Gaussian KL for t > 0 (eq. 5-7), discretised decoder for t = 0 (eq. 13)."""
    a = ABAR[t]
    mean_out, var_out = output[:, :1], (output[:, 1:] if output.shape[1] == 2 else torch.zeros_like(x0))
    if prediction_type == "epsilon":  # DDPM eq. 15
        x0_hat = (x_t - math.sqrt(1 - a) * mean_out) / math.sqrt(a)
    elif prediction_type == "sample":
        x0_hat = mean_out
    else:  # Salimans & Ho 2022: x_0 = sqrt(a) x_t - sqrt(1 - a) v
        x0_hat = math.sqrt(a) * x_t - math.sqrt(1 - a) * mean_out
    if clip:
        x0_hat = x0_hat.clamp(-1, 1)
    c0, ct, tilde = _posterior(t)
    model_mean, true_mean = c0 * x0_hat + ct * x_t, c0 * x0 + ct * x_t
    log_var = _log_variance(t, variance_type, var_out)
    if t == 0:
        std = torch.exp(0.5 * log_var)
        nll = [-_mp_log_bin_mass(x, m, s) for x, m, s in zip(x0.flatten().tolist(), model_mean.flatten().tolist(),
                                                             std.flatten().tolist())]
        nats = torch.tensor(nll, dtype=torch.float64).reshape(x0.shape)
    else:  # KL(N(m1, s1) || N(m2, s2)) = (log(s2 / s1) + s1 / s2 + (m1 - m2)^2 / s2 - 1) / 2
        s1, s2 = tilde, torch.exp(log_var)
        nats = 0.5 * (torch.log(s2 / s1) + s1 / s2 + (true_mean - model_mean) ** 2 / s2 - 1)
    return nats.flatten(1).mean(1) / math.log(2)


def _run(x0, prediction_type, variance_type, clip, model_kwargs=None, seed=1):
    calls, seen = [], []
    model = _model(x0, prediction_type, variance_type, calls)

    def recording(x_t, t, **kwargs):
        output = model(x_t, t, **kwargs)
        seen.append((t, x_t.clone(), output.clone()))
        return output

    config = {"num_train_timesteps": T, "trained_betas": BETAS, "prediction_type": prediction_type,
              "variance_type": variance_type}
    out = variational_bound(recording, x0, config, generator=torch.Generator().manual_seed(seed),
                            clip_denoised=clip, model_kwargs=model_kwargs)
    return out, seen, calls


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("variance_type", VARIANCE_TYPES)
def test_bound_matches_the_paper_in_float64(variance_type, prediction_type, clip):
    x0 = _images()
    out, seen, _ = _run(x0, prediction_type, variance_type, clip)
    assert [t for t, _, _ in seen] == list(range(T))
    expect = torch.stack([_reference_term(x0, x_t, o, t, prediction_type, variance_type, clip)
                          for t, x_t, o in seen], 1)
    torch.testing.assert_close(out.terms_bpd, expect, rtol=1e-10, atol=1e-12)
    # L_T = KL(N(sqrt(abar_T) x0, 1 - abar_T) || N(0, 1)) and the totals.
    a = ABAR[-1]
    prior = (0.5 * (-math.log(1 - a) + (1 - a) + a * x0**2 - 1)).flatten(1).mean(1) / math.log(2)
    torch.testing.assert_close(out.prior_bpd, prior, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(out.bits_per_dim, prior + expect.sum(1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.log_likelihood, -(prior + expect.sum(1)) * 16 * math.log(2), rtol=1e-10, atol=1e-9)


def test_clipping_changes_the_bound_where_x0_hat_leaves_the_data_range():
    x0 = _images(3)
    unclipped, seen, _ = _run(x0, "sample", "fixed_small", False)
    clipped, _, _ = _run(x0, "sample", "fixed_small", True)
    assert any((o.abs() > 1).any() for _, _, o in seen)
    assert not torch.allclose(unclipped.terms_bpd, clipped.terms_bpd)


def test_model_kwargs_reach_every_network_call():
    """The conditioning conduit (issue 10): a kwarg the output depends on changes the bound as the paper says."""
    x0 = _images(5)
    plain, _, plain_calls = _run(x0, "epsilon", "learned_range", False)
    shifted, seen, calls = _run(x0, "epsilon", "learned_range", False, model_kwargs={"shift": 0.05})
    assert plain_calls == [(t, 0.0) for t in range(T)] and calls == [(t, 0.05) for t in range(T)]
    expect = torch.stack([_reference_term(x0, x_t, o, t, "epsilon", "learned_range", False)
                          for t, x_t, o in seen], 1)
    torch.testing.assert_close(shifted.terms_bpd, expect, rtol=1e-10, atol=1e-12)
    assert (shifted.terms_bpd[:, 1:] != plain.terms_bpd[:, 1:]).all()


def test_bad_configs_are_named():
    x0 = _images()
    with pytest.raises(ValueError, match="variance_type"):
        variational_bound(lambda x, t: x, x0, {"variance_type": "fixed"})
    with pytest.raises(ValueError, match="learned_range.*2 \\* in_channels"):
        variational_bound(lambda x, t: x, x0, {"num_train_timesteps": T, "trained_betas": BETAS,
                                               "variance_type": "learned_range"})
    with pytest.raises(ValueError, match="num_train_timesteps >= 2"):
        variational_bound(lambda x, t: x, x0, {"num_train_timesteps": 1})
    with pytest.raises(ValueError, match="trained_betas"):
        variational_bound(lambda x, t: x, x0, {"num_train_timesteps": 3, "trained_betas": BETAS})
