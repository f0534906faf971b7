"""``stock_divergences()`` against an independent check of stock sampling, for every value of every config key.

The decision (``ddpm_hf.schedulers.stock_equivalence``) probes single steps at a few step counts. The check here
runs whole sampling chains of a toy network through diffusers' own class and through ours, from the same start
and generators, for EVERY step count N = 1 .. T and every keyword variant of ``step``: stock samples the config
identically iff every chain agrees (or both fail, i.e. neither samples). Both are in float64 with stock's float32
tables replaced by the exact float64 schedule (``NoiseSchedule.from_config``), so that float32 rounding, which
every config shares, is not mistaken for a divergence; stock's own float32 table is compared separately.
"""

import math

import diffusers
import pytest
import torch

import ddpm_hf
from ddpm_hf.diffusion_math import NoiseSchedule

T = 30  # small enough for every N; diffusers' trailing table has N + 1 entries at N = 13 and 26 here
SHAPE = (2, 1, 3, 3)


def toy_model(x: torch.Tensor, t, learned: bool) -> torch.Tensor:
    tt = float(t) / T
    out = torch.tanh(x) * (0.7 + 0.2 * math.cos(3 * tt)) + 0.1 * torch.sin(2 * x + tt)
    return torch.cat([out, torch.tanh(0.5 * x - tt)], dim=1) if learned else out


def exact_tables(config: dict, stock) -> None:
    """Give ``stock`` the float64 schedule of ``config`` under its own attribute names."""
    schedule = NoiseSchedule.from_config(config)
    final = 1.0 if config.get("set_alpha_to_one", True) else schedule.alphas_cumprod[0].item()
    exact = dict(betas=schedule.betas, alphas=1 - schedule.betas, alphas_cumprod=schedule.alphas_cumprod,
                 final_alpha_cumprod=torch.tensor(final, dtype=torch.float64), one=torch.ones((), dtype=torch.float64))
    for name in [n for n in exact if hasattr(stock, n)]:
        setattr(stock, name, exact[name])


def chain(scheduler, count: int, kwargs: dict, learned: bool):
    """The final sample of a whole sampling loop, or None if the scheduler refuses or gives NaN/inf."""
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    generator = torch.Generator().manual_seed(2)
    try:
        scheduler.set_timesteps(count)
        for t in scheduler.timesteps:
            x = scheduler.step(toy_model(x, t, learned), t, x, generator=generator, **kwargs).prev_sample
    except Exception:  # noqa: BLE001 - any failure means "does not sample"
        return None
    return x if torch.isfinite(x).all() else None


def stock_samples_identically(name: str, config: dict) -> bool:
    ours = getattr(ddpm_hf, name)(num_train_timesteps=T, **config)
    try:
        stock = getattr(diffusers, name).from_config(ours.config)
    except Exception:  # noqa: BLE001 - stock refuses the saved config
        return False
    full = dict(ours.config)
    if (stock.alphas_cumprod.double() - NoiseSchedule.from_config(full).alphas_cumprod).abs().max() > 1e-5:
        return False
    exact_tables(full, stock)
    learned = full.get("variance_type") in ("learned", "learned_range")
    variants = [{}] if name == "DDPMScheduler" else [
        {"eta": eta, "use_clipped_model_output": clipped} for eta in (0.0, 1.0) for clipped in (False, True)]
    for count in range(1, T + 1):
        for kwargs in variants:
            mine, theirs = chain(ours, count, kwargs, learned), chain(stock, count, kwargs, learned)
            if mine is None and theirs is None:
                continue
            if mine is None or theirs is None or ((mine - theirs).abs() / theirs.abs().clamp(min=1)).max() > 1e-5:
                return False
    return True


TRAINED = [0.001 + 0.002 * i for i in range(T)]
COMMON = (
    [{"beta_schedule": s} for s in ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")]
    + [{"beta_start": 0.001, "beta_end": 0.05}, {"beta_schedule": "scaled_linear", "beta_start": 0.0005}]
    + [{"trained_betas": TRAINED}]
    + [{"timestep_spacing": s} for s in ("leading", "linspace", "trailing", "quad")]
    + [{"prediction_type": p} for p in ("sample", "v_prediction")]
    + [{"steps_offset": 1}, {"steps_offset": 2}]
    + [{"rescale_betas_zero_snr": True}, {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction"},
       {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}]
    + [{"clip_sample": False}, {"clip_sample_range": 2.0}]
    + [{"thresholding": True}, {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 2.0},
       {"thresholding": True, "prediction_type": "sample"}]
)
CASES = (
    [("DDPMScheduler", c) for c in COMMON]
    + [("DDPMScheduler", {"variance_type": v}) for v in
       ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")]
    + [("DDPMScheduler", {"steps_offset": 1, "variance_type": "fixed_large"}),
       ("DDPMScheduler", {"timestep_spacing": "trailing", "variance_type": "fixed_large"})]
    + [("DDIMScheduler", c) for c in COMMON]
    + [("DDIMScheduler", {"set_alpha_to_one": False}), ("DDIMScheduler", {"set_alpha_to_one": False, "steps_offset": 1})]
)


@pytest.mark.parametrize("name, config", CASES, ids=[f"{n[:4]}-{c}" for n, c in CASES])
def test_decision_equals_what_stock_sampling_does(name, config):
    reasons = getattr(ddpm_hf, name)(num_train_timesteps=T, **config).stock_divergences()
    assert (not reasons) == stock_samples_identically(name, config), reasons


# The cases the old hand-written list named, at diffusers' default T = 1000 (the list's decisions must hold),
# plus DDIM + sigmoid, which the list missed (stock raises NotImplementedError on load).
HAND_LIST = [
    ("DDIMScheduler", {"timestep_spacing": "quad"}, "quad is not supported"),
    ("DDIMScheduler", {"timestep_spacing": "trailing"}, "N = 61"),
    ("DDIMScheduler", {"timestep_spacing": "linspace"}, "eta=0.0"),
    ("DDPMScheduler", {"timestep_spacing": "trailing"}, "N = 61"),
    ("DDPMScheduler", {"variance_type": "fixed_large_log"}, "NaN"),
    ("DDPMScheduler", {"variance_type": "learned"}, "NaN"),
    ("DDPMScheduler", {"steps_offset": 1, "variance_type": "fixed_large"}, "t=1"),
    ("DDIMScheduler", {"beta_schedule": "sigmoid"}, "NotImplementedError: sigmoid"),
]


@pytest.mark.parametrize("name, config, words", HAND_LIST)
def test_the_old_hand_list_cases_and_ddim_sigmoid_at_t_1000(name, config, words):
    reasons = getattr(ddpm_hf, name)(**config).stock_divergences()
    assert any(words in r for r in reasons), reasons
    assert getattr(ddpm_hf, name)().stock_divergences() == []


def test_fixed_small_with_steps_offset_is_stock_equivalent():
    """The hand list refused leading + steps_offset for every DDPM variance. Stock adds noise on the final step
    from t = 1, but with fixed_small its variance is beta_tilde = 0 there, clamped to 1e-20: std 1e-10."""
    stock = diffusers.DDPMScheduler(steps_offset=1)
    stock.set_timesteps(10)
    x = torch.zeros(1, 1, 2, 2)
    noisy = stock.step(x, 1, x, generator=torch.Generator().manual_seed(0)).prev_sample
    assert 0 < noisy.abs().max() < 1e-9
    assert ddpm_hf.DDPMScheduler(steps_offset=1).stock_divergences() == []


def test_decisions_are_cached_per_config_and_leave_the_scheduler_alone():
    s = ddpm_hf.DDIMScheduler(num_train_timesteps=T, timestep_spacing="linspace")
    s.set_timesteps(4)
    first = s.stock_divergences()
    assert s.timesteps.tolist() == [29, 19, 10, 0] and s.num_inference_steps == 4
    again = ddpm_hf.DDIMScheduler(num_train_timesteps=T, timestep_spacing="linspace").stock_divergences()
    assert first == again and first is not again  # callers get their own list
    from ddpm_hf.schedulers.stock_equivalence import _decide

    hits = _decide.cache_info().hits
    s.stock_divergences()
    assert _decide.cache_info().hits == hits + 1
