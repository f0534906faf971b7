"""Public scheduler state in diffusers' dtypes (float32 tables, as diffusers builds them); maths in float64."""

import diffusers
import pytest
import torch
from diffusers.training_utils import compute_snr

import ddpm_hf
from ddpm_hf.diffusion_math import NoiseSchedule

SCHEDULES = [
    {"beta_schedule": "linear"},
    {"beta_schedule": "scaled_linear"},
    {"beta_schedule": "squaredcos_cap_v2"},
    {"beta_schedule": "sigmoid"},
    {"trained_betas": [0.0005 * (i + 1) for i in range(200)]},
    {"beta_schedule": "linear", "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"},
    {"beta_schedule": "squaredcos_cap_v2", "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"},
]
CASES = [(name, {"num_train_timesteps": 200, **schedule, **extra})
         for schedule in SCHEDULES
         for name, extra in (("DDPMScheduler", {}), ("DDIMScheduler", {}), ("DDIMScheduler", {"set_alpha_to_one": False}))]


def public_state(scheduler) -> dict:
    return {k: v for k, v in vars(scheduler).items() if not k.startswith("_")}


def assert_same_public_state(ours, theirs, bitwise: bool = True) -> None:
    """Every public attribute diffusers has, ours has too, of the same type, dtype, shape and device."""
    mine = public_state(ours)
    for name, value in public_state(theirs).items():
        assert name in mine, name
        assert type(mine[name]) is type(value), name
        if isinstance(value, torch.Tensor):
            assert (mine[name].dtype, mine[name].shape, mine[name].device) == (value.dtype, value.shape, value.device), name
            if bitwise:
                assert torch.equal(mine[name], value), name
        else:
            assert mine[name] == value, name


@pytest.mark.parametrize("name, config", CASES, ids=[f"{n[:4]}-{c}"[:80] for n, c in CASES])
def test_public_attributes_equal_diffusers(name, config):
    ours = getattr(ddpm_hf, name)(**config)
    try:
        theirs = getattr(diffusers, name)(**config)
    except NotImplementedError:  # diffusers' DDIM has no sigmoid: ours rounds its float64 table to float32
        assert name == "DDIMScheduler" and config["beta_schedule"] == "sigmoid"
        exact = NoiseSchedule.from_config(config)
        assert torch.equal(ours.alphas_cumprod, exact.alphas_cumprod.float())
        assert torch.equal(ours.betas, exact.betas.float()) and ours.final_alpha_cumprod.dtype == torch.float32
        theirs = diffusers.DDIMScheduler(**{**config, "beta_schedule": "linear"})
        assert_same_public_state(ours, theirs, bitwise=False)
        return
    assert_same_public_state(ours, theirs)
    for count in (7, 50):
        ours.set_timesteps(count)
        theirs.set_timesteps(count)
        assert_same_public_state(ours, theirs)


@pytest.mark.parametrize("name, config", CASES[:15], ids=[f"{n[:4]}-{c}"[:80] for n, c in CASES[:15]])
def test_the_maths_uses_the_float64_schedule(name, config):
    ours = getattr(ddpm_hf, name)(**config)
    exact = NoiseSchedule.from_config(config)
    assert ours.noise_schedule.alphas_cumprod.dtype == torch.float64
    assert torch.equal(ours.noise_schedule.alphas_cumprod, exact.alphas_cumprod)
    assert torch.equal(ours.noise_schedule.betas, exact.betas)
    final = 1.0 if config.get("set_alpha_to_one", True) else exact.alphas_cumprod[0].item()
    assert ours.final_alpha_cumprod_float64.dtype == torch.float64 and ours.final_alpha_cumprod_float64.item() == final
    x0 = torch.randn(3, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(3, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 99, 150])
    a = exact.alphas_cumprod[t].reshape(3, 1, 1, 1)
    torch.testing.assert_close(ours.add_noise(x0, eps, t), a.sqrt() * x0 + (1 - a).sqrt() * eps, rtol=1e-15, atol=0)


@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler"])
@pytest.mark.parametrize("schedule", SCHEDULES[:3] + SCHEDULES[4:6], ids=lambda c: str(c)[:40])
def test_compute_snr_works_and_equals_diffusers(name, schedule):
    """diffusers' training helper moves alphas_cumprod to the timesteps' device (no float64 on MPS)."""
    config = {"num_train_timesteps": 200, **schedule}
    timesteps = torch.tensor([0, 1, 57, 198])
    ours = compute_snr(getattr(ddpm_hf, name)(**config), timesteps)
    theirs = compute_snr(getattr(diffusers, name)(**config), timesteps)
    assert ours.dtype == theirs.dtype == torch.float32 and torch.equal(ours, theirs)


def test_diffusers_pipelines_read_the_public_table_like_their_own():
    """Code written for diffusers indexes scheduler.alphas_cumprod with timesteps and mixes it into float32
    latents: same dtype and values as with diffusers' scheduler, so its results do not change."""
    ours, theirs = ddpm_hf.DDIMScheduler(), diffusers.DDIMScheduler()
    latents = torch.randn(2, 4, dtype=torch.float32)
    t = torch.tensor([10, 900])
    mine = ours.alphas_cumprod[t][:, None] ** 0.5 * latents
    reference = theirs.alphas_cumprod[t][:, None] ** 0.5 * latents
    assert mine.dtype == torch.float32 and torch.equal(mine, reference)
