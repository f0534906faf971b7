"""Losses: targets, min-SNR weights, and the improved-DDPM hybrid loss against independent formulas."""

import math

import pytest
import torch
from test_diffusion_math import _mp_log_bin_mass

from ddpm_hf import diffusion_math as dm
from ddpm_hf.losses import hybrid_loss, min_snr_weights, simple_loss, training_target, vlb_term

T = 50
SCHEDULE = dm.NoiseSchedule.from_config({"num_train_timesteps": T, "beta_end": 0.2})
ALPHAS = SCHEDULE.alphas_cumprod


def _batch(seed=0, channels=1):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(4, channels, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(4, channels, 4, 4, generator=g)
    t = torch.tensor([0, 1, 17, T - 1])
    return x0, noise, t


def test_targets_match_definitions():
    x0, noise, t = _batch()
    a = ALPHAS[t]
    assert torch.equal(training_target(x0, noise, a, "epsilon"), noise)
    assert torch.equal(training_target(x0, noise, a, "sample"), x0)
    a4 = a.view(-1, 1, 1, 1).float()
    v = a4.sqrt() * noise - (1 - a4).sqrt() * x0  # Salimans & Ho 2022, sec. 4
    torch.testing.assert_close(training_target(x0, noise, a, "v_prediction"), v, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="prediction_type"):
        training_target(x0, noise, a, "noise")


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_min_snr_weights_make_every_target_the_paper_weighted_x0_loss(prediction_type):
    # Hang et al. 2023: loss = min(SNR, gamma) * ||x0_hat - x0||^2 whatever the network predicts.
    x0, noise, t = _batch(1)
    a = ALPHAS[t]
    gamma = 5.0
    snr = a / (1 - a)
    target = training_target(x0, noise, a, prediction_type).double()
    output = target + 0.1 * torch.randn(target.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x_t = dm.q_sample(x0.double(), noise.double(), a)
    x0_hat = dm.predict_x0(output, x_t, a, prediction_type)
    paper = torch.minimum(snr, torch.tensor(gamma, dtype=torch.float64)) * (x0_hat - x0.double()).pow(2).flatten(1).mean(1)
    ours = min_snr_weights(a, gamma, prediction_type) * (output - target).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(ours, paper, rtol=1e-5, atol=1e-8)  # targets are float32


def test_min_snr_eps_weight_is_finite_at_zero_snr_and_rejects_bad_gamma():
    w = min_snr_weights(torch.tensor([0.0, 0.5], dtype=torch.float64), 5.0, "epsilon")
    assert torch.isfinite(w).all() and w[0] == 1
    for bad in (0, -1.0, float("nan"), "5", True):
        with pytest.raises(ValueError, match="snr_gamma"):
            min_snr_weights(torch.tensor([0.5]), bad, "epsilon")


def test_simple_loss_is_float32_for_bf16_outputs_and_weighted_per_sample():
    out = torch.randn(3, 1, 4, 4).bfloat16()
    target = torch.zeros(3, 1, 4, 4)
    loss = simple_loss(out, target)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, out.float().pow(2).mean())
    w = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)
    expected = (out.float().pow(2).flatten(1).mean(1) * w.float()).mean()
    torch.testing.assert_close(simple_loss(out, target, w), expected)


def _independent_vlb(mean_out, var_out, x0, x_t, t, prediction_type="epsilon"):
    """Per-sample L_t from torch.distributions and explicit eq. 6-7 / improved-DDPM eq. 15, in float64."""
    out = []
    for i in range(x0.shape[0]):
        ti = int(t[i])
        a_t = float(ALPHAS[ti])
        a_prev = float(ALPHAS[ti - 1]) if ti > 0 else 1.0
        beta = 1 - a_t / a_prev
        post_var = (1 - a_prev) / (1 - a_t) * beta
        a1, a0 = float(ALPHAS[1]), float(ALPHAS[0])
        var_t1 = (1 - a0) / (1 - a1) * (1 - a1 / a0)
        log_post = math.log(post_var) if post_var > 0 else math.log(var_t1)
        frac = (var_out[i].double() + 1) / 2
        model_logvar = frac * math.log(beta) + (1 - frac) * log_post
        out_i, xt_i = mean_out[i].double(), x_t[i].double()
        if prediction_type == "epsilon":  # DDPM eq. 15
            x0_hat = (xt_i - math.sqrt(1 - a_t) * out_i) / math.sqrt(a_t)
        elif prediction_type == "sample":
            x0_hat = out_i
        else:  # v = sqrt(a) eps - sqrt(1 - a) x0 (Salimans & Ho 2022), with x_t = sqrt(a) x0 + sqrt(1 - a) eps
            x0_hat = math.sqrt(a_t) * xt_i - math.sqrt(1 - a_t) * out_i

        def post_mean(x_start):
            return (math.sqrt(a_prev) * beta / (1 - a_t)) * x_start + (
                math.sqrt(1 - beta) * (1 - a_prev) / (1 - a_t)) * x_t[i].double()

        model_mean = post_mean(x0_hat)
        if ti == 0:
            std = (0.5 * model_logvar).exp()
            nll = [-_mp_log_bin_mass(x, m, s) for x, m, s in zip(x0[i].flatten().tolist(),
                                                                 model_mean.flatten().tolist(), std.flatten().tolist())]
            out.append(torch.tensor(nll, dtype=torch.float64).mean() / math.log(2))
        else:
            q = torch.distributions.Normal(post_mean(x0[i].double()), math.exp(0.5 * log_post))
            p = torch.distributions.Normal(model_mean, (0.5 * model_logvar).exp())
            out.append(torch.distributions.kl_divergence(q, p).mean() / math.log(2))
    return torch.stack(out)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_vlb_term_matches_independent_computation(prediction_type):
    x0, noise, t = _batch(3)
    x0 = (x0 * 127.5).round() / 127.5  # on the 256-level grid the decoder likelihood assumes
    x_t = dm.q_sample(x0, noise, ALPHAS[t])
    g = torch.Generator().manual_seed(4)
    target = training_target(x0, noise, ALPHAS[t], prediction_type)
    mean_out = target + 0.3 * torch.randn(noise.shape, generator=g)
    var_out = torch.rand(noise.shape, generator=g) * 2 - 1
    ours = vlb_term(mean_out, var_out, x0, x_t, t, SCHEDULE, prediction_type)
    ref = _independent_vlb(mean_out, var_out, x0, x_t, t, prediction_type)
    torch.testing.assert_close(ours.double(), ref, rtol=2e-4, atol=1e-5)


def test_hybrid_loss_stops_the_vlb_gradient_at_the_mean():
    x0, noise, t = _batch(5, channels=2)
    x_t = dm.q_sample(x0, noise, ALPHAS[t])
    g = torch.Generator().manual_seed(6)
    output = torch.cat([noise + 0.2 * torch.randn(noise.shape, generator=g),
                        torch.rand(noise.shape, generator=g) * 2 - 1], 1).requires_grad_()
    hybrid_loss(output, x0, noise, x_t, t, SCHEDULE, "epsilon").backward()
    mean_only = output.detach()[:, :2].clone().requires_grad_()
    simple_loss(mean_only, noise).backward()
    # The mean channels get exactly the L_simple gradient; the variance channels get the (nonzero) VLB one.
    torch.testing.assert_close(output.grad[:, :2], mean_only.grad)
    assert output.grad[:, 2:].abs().sum() > 0
    loss = hybrid_loss(output.detach(), x0, noise, x_t, t, SCHEDULE, "epsilon")
    expected = simple_loss(output.detach()[:, :2], noise) + 0.001 * T * vlb_term(
        output.detach()[:, :2], output.detach()[:, 2:], x0, x_t, t, SCHEDULE, "epsilon").mean()
    torch.testing.assert_close(loss, expected)


def test_hybrid_loss_names_the_channel_problem():
    x0, noise, t = _batch()
    with pytest.raises(ValueError, match="learned_range.*2 \\* 1 output channels"):
        hybrid_loss(torch.zeros(4, 1, 4, 4), x0, noise, x0, t, SCHEDULE, "epsilon")
    with pytest.raises(TypeError, match="NoiseSchedule, got Tensor"):
        hybrid_loss(torch.zeros(4, 2, 4, 4), x0, noise, x0, t, ALPHAS, "epsilon")
