"""Fuzz every DDPMScheduler/DDIMScheduler argument: a ValueError/TypeError naming it, or a sane scheduler.

"Sane" means what a caller relies on: betas in (0, 1], bar(alpha) in [0, 1] and non-increasing, a strictly
descending table inside [0, T), and finite steps. Anything else (IndexError, OverflowError, RuntimeError, NaN
output) fails the test.
"""

import diffusers
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ddpm_hf import DDIMScheduler, DDPMScheduler

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

# Wrong types, negatives, zero, huge values, NaN/inf, empty containers, unknown and near-miss strings.
ANYTHING = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.sampled_from([0, -1, 2**63, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
    st.sampled_from(["linear", "LINEAR", "epsilon", "leading", "fixed_large", "learned_range", "v_prediction"]),
    st.lists(st.floats(0, 1), max_size=3), st.lists(st.integers(-5, 60), max_size=4), st.just([]), st.just({}),
    st.just(np.array([0.5, 0.1])), st.just(torch.tensor([3.5])),
)
CLASSES = {"DDPMScheduler": DDPMScheduler, "DDIMScheduler": DDIMScheduler}


def config_keys(cls):
    return [k for k in cls().config if not k.startswith("_")]


def assert_names(error, *names):
    assert str(error) and any(name in str(error) for name in names), f"{type(error).__name__}: {error}"


def assert_sane(scheduler):
    schedule = scheduler.noise_schedule
    for betas, alphas_cumprod in ((schedule.betas, schedule.alphas_cumprod), (scheduler.betas, scheduler.alphas_cumprod)):
        assert torch.isfinite(betas).all() and (betas > 0).all() and (betas <= 1).all()
        assert (alphas_cumprod >= 0).all() and (alphas_cumprod <= 1).all()
        assert (alphas_cumprod[1:] <= alphas_cumprod[:-1]).all()
    assert scheduler.betas.dtype == scheduler.alphas_cumprod.dtype == torch.float32
    num_train = scheduler.config.num_train_timesteps
    try:
        scheduler.set_timesteps(min(3, num_train))
    except ValueError as error:  # e.g. a steps_offset that pushes the leading table past T
        assert_names(error, "steps_offset")
        return
    table = scheduler.timesteps
    assert len(table) >= 1 and (table >= 0).all() and (table < num_train).all() and (table[1:] < table[:-1]).all()
    x = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    channels = 2 if str(scheduler.config.get("variance_type")).startswith("learned") else 1
    for t in table:
        try:
            out = torch.randn(2, channels, 2, 2, generator=torch.Generator().manual_seed(2)).clamp(-1, 1)
            x = scheduler.step(out, t, x, generator=torch.Generator().manual_seed(1)).prev_sample
        except ValueError as error:  # zero terminal SNR with eps-prediction: refused at the step (issue 3851)
            assert_names(error, "3851")
            return
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("name", CLASSES)
def test_config_arguments(name):
    cls = CLASSES[name]

    # Regressions found by this fuzzing (each failed obscurely or gave NaN before the fix).
    @FUZZ
    @given(key=st.sampled_from(config_keys(cls)), value=ANYTHING)
    @example(key="trained_betas", value=0.5)
    @example(key="trained_betas", value="abc")
    @example(key="num_train_timesteps", value=2**63)
    @example(key="num_train_timesteps", value=763151)  # bar(alpha) underflows: 1/sqrt overflowed float32
    @example(key="beta_start", value=1e-300)  # bar(alpha)_0 == 1: NaN at the last step
    @example(key="clip_sample_range", value=10**30)
    @example(key="clip_sample_range", value=4.7e156)
    def check(key, value):
        try:
            scheduler = cls(**{key: value})
        except (ValueError, TypeError) as error:
            assert_names(error, key, "beta_start", "num_train_timesteps", "schedule")
            return
        assert_sane(scheduler)
        assert_value_takes_effect(cls, scheduler, key, value)

    check()


SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                 "rescale_betas_zero_snr")


def assert_value_takes_effect(cls, scheduler, key, value):
    """An accepted value is recorded in the config (so it is saved), builds diffusers' own tables where it is a
    schedule key diffusers can build, and survives a save/load round trip with the same steps."""
    recorded = scheduler.config[key]
    assert np.array_equal(np.asarray(recorded), np.asarray(value)), (key, value, recorded)
    if key == "num_train_timesteps":
        assert len(scheduler) == scheduler.noise_schedule.betas.numel() == value
    if key in SCHEDULE_KEYS and scheduler.config.num_train_timesteps <= 10**4:
        try:
            stock = getattr(diffusers, cls.__name__)(**{key: value})
        except NotImplementedError:  # diffusers' DDIM has no sigmoid
            stock = None
        if stock is not None:
            assert torch.equal(scheduler.alphas_cumprod, stock.alphas_cumprod), (key, value)
    again = cls.from_config(scheduler.config)
    if again.config.num_train_timesteps >= 3:
        for s in (scheduler, again):
            s.set_timesteps(3) if not (key == "steps_offset" and value > 0) else s.set_timesteps(timesteps=[2, 1, 0])
        x = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0))
        out = torch.randn(2, 2 if str(scheduler.config.get("variance_type")).startswith("learned") else 1, 2, 2)
        steps = [s.step(out, s.timesteps[1], x, generator=torch.Generator().manual_seed(1)).prev_sample
                 for s in (scheduler, again)]
        assert torch.equal(*steps)


@pytest.mark.parametrize("name", CLASSES)
def test_set_timesteps_arguments(name):
    cls = CLASSES[name]

    @FUZZ
    @given(which=st.sampled_from(["num_inference_steps", "timesteps", "both"]), value=ANYTHING,
           spacing=st.sampled_from(["leading", "trailing", "linspace"]))
    def check(which, value, spacing):
        scheduler = cls(num_train_timesteps=50, timestep_spacing=spacing)
        kwargs = {"num_inference_steps": value, "timesteps": value} if which == "both" else {which: value}
        try:
            scheduler.set_timesteps(**kwargs)
        except (ValueError, TypeError) as error:
            assert_names(error, "num_inference_steps", "timesteps")
            return
        table = scheduler.timesteps
        assert len(table) >= 1 and (table >= 0).all() and (table < 50).all() and (table[1:] < table[:-1]).all()
        if which == "timesteps":  # the custom list itself
            assert table.tolist() == [int(t) for t in np.asarray(value).tolist()]
        else:  # N entries of the spacing's table (diffusers' own where it is valid)
            reference = diffusers.DDPMScheduler(num_train_timesteps=50, timestep_spacing=spacing)
            reference.set_timesteps(int(value))
            assert len(table) == value and table.tolist() == reference.timesteps.tolist()[:value]

    check()


@pytest.mark.parametrize("name", CLASSES)
def test_step_arguments(name):
    cls = CLASSES[name]
    arguments = ["timestep", "model_output", "sample", "generator"] + (
        ["eta", "variance_noise"] if cls is DDIMScheduler else [])

    @FUZZ
    @given(argument=st.sampled_from(arguments), value=st.one_of(ANYTHING, st.just(torch.zeros(3, 1, 2, 2)),
                                                                 st.just(torch.zeros(2, 1, 2, 2, dtype=torch.int64))))
    @example(argument="generator", value=[])
    @example(argument="generator", value=7)
    @example(argument="timestep", value=[21])
    @example(argument="timestep", value=20.5)
    @example(argument="model_output", value=1.0)
    @example(argument="sample", value=None)
    @example(argument="eta", value=1e300)  # DDIM: overflowed float32 before eta was limited to [0, 1]
    def check(argument, value):
        scheduler = cls(num_train_timesteps=50)
        scheduler.set_timesteps(5)
        x = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0))
        kwargs = dict(model_output=torch.randn_like(x), timestep=scheduler.timesteps[1], sample=x,
                      generator=torch.Generator().manual_seed(3))
        if argument == "variance_noise":
            kwargs["eta"] = 0.5
            del kwargs["generator"]
        canonical = dict(kwargs)
        kwargs[argument] = value
        try:
            out = scheduler.step(**kwargs).prev_sample
        except (ValueError, TypeError) as error:
            assert_names(error, argument)
            return
        assert out.shape == x.shape and torch.isfinite(out).all()
        assert_argument_takes_effect(scheduler, argument, value, canonical, out)

    check()


def assert_argument_takes_effect(scheduler, argument, value, canonical, out):
    """The accepted value acts as its plain equivalent: the same table entry, the same eta, the same noise."""
    if argument == "generator":  # None: noise from the global generator, so only its presence is checked
        return
    if argument == "timestep":
        value = int(value)
    elif argument == "eta":
        value = float(value)
        noiseless = scheduler.step(**{**canonical, "eta": 0.0}).prev_sample
        assert torch.equal(out, noiseless) == (value == 0)
    elif isinstance(value, torch.Tensor):
        value = value.to(torch.float32).clone()
    reference = scheduler.step(**{**canonical, argument: value}).prev_sample
    if argument in ("timestep", "eta", "variance_noise") or scheduler.config.get("variance_type") is None:
        torch.testing.assert_close(out, reference, rtol=0, atol=0)
