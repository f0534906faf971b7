"""The training step's objective: the schedule it noises with, and the conduit for network inputs.

The schedule must be the noise scheduler's own (its config through `NoiseSchedule.from_config`), with
``trained_betas`` and ``rescale_betas_zero_snr`` honoured; the oracle is diffusers' DDPMScheduler for the same
config. (Before, the step rebuilt bar(alpha) from ``make_betas`` and dropped both keys.)
"""

import diffusers
import numpy as np
import pytest
import torch

from ddpm_hf import DDPMScheduler
from ddpm_hf.training.objective import DiffusionObjective

T = 50


class Spy(torch.nn.Module):
    """Records what the step feeds the network and predicts zeros."""

    def forward(self, x_t, t, class_labels=None):
        self.x_t, self.t, self.class_labels = x_t, t, class_labels
        return type("Output", (), {"sample": torch.zeros_like(x_t)})


def replayed_draws(seed, batch, shape):
    """The draws the objective documents: t ~ U{0..T-1}, then eps ~ N(0, I), from one generator."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.randint(0, T, (batch,), generator=generator)
    return t, torch.randn(shape, generator=generator)


@pytest.mark.parametrize("config", [
    {"trained_betas": np.linspace(1e-3, 0.2, T).tolist()},
    {"beta_schedule": "squaredcos_cap_v2", "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"},
    {"beta_schedule": "scaled_linear", "beta_end": 0.05, "rescale_betas_zero_snr": True,
     "prediction_type": "v_prediction"},
    {"beta_schedule": "linear"},
], ids=["trained_betas", "cosine_zero_snr", "scaled_linear_zero_snr", "linear"])
def test_the_step_noises_with_the_schedulers_own_schedule(config):
    scheduler = DDPMScheduler(num_train_timesteps=T, **config)
    oracle = diffusers.DDPMScheduler(num_train_timesteps=T, **config).alphas_cumprod.double()
    objective = DiffusionObjective.from_scheduler(scheduler, snr_gamma=None)
    assert objective.schedule.alphas_cumprod.dtype == torch.float64
    torch.testing.assert_close(objective.schedule.alphas_cumprod, oracle, atol=2e-7, rtol=1e-6)

    x0 = torch.rand(64, 1, 4, 4) * 2 - 1
    spy = Spy()
    loss = objective.loss(spy, x0, torch.Generator().manual_seed(3))
    t, eps = replayed_draws(3, 64, x0.shape)
    assert torch.equal(spy.t, t)
    a = oracle[t].view(-1, 1, 1, 1)
    expected = a.sqrt() * x0.double() + (1 - a).sqrt() * eps.double()  # DDPM eq. 4
    torch.testing.assert_close(spy.x_t.double(), expected, atol=5e-5, rtol=0)  # the oracle is float32
    assert spy.x_t.dtype == torch.float32
    # zero predictions: the loss is the mean square of the target (eps, or v = sqrt(a) eps - sqrt(1-a) x0)
    target = eps.double() if config.get("prediction_type", "epsilon") == "epsilon" else (
        a.sqrt() * eps.double() - (1 - a).sqrt() * x0.double())
    assert loss.item() == pytest.approx(target.pow(2).mean().item(), rel=1e-5)


def test_network_inputs_pass_through_model_kwargs():
    scheduler = DDPMScheduler(num_train_timesteps=T)
    objective = DiffusionObjective.from_scheduler(scheduler, snr_gamma=5.0)
    x0, spy = torch.zeros(4, 1, 4, 4), Spy()
    labels = torch.tensor([3, 1, 4, 1])
    objective.loss(spy, x0, torch.Generator().manual_seed(0), model_kwargs={"class_labels": labels})
    assert spy.class_labels is labels
    objective.loss(spy, x0, torch.Generator().manual_seed(0))  # unconditional: nothing extra
    assert spy.class_labels is None


def test_the_objective_follows_the_scheduler_config():
    scheduler = DDPMScheduler(num_train_timesteps=T, prediction_type="sample", variance_type="learned_range")
    objective = DiffusionObjective.from_scheduler(scheduler, snr_gamma=None)
    assert (objective.prediction_type, objective.variance_type) == ("sample", "learned_range")

