"""Config keys, defaults and interchange with diffusers; validation of bad config values at construction."""

import inspect
import json

import diffusers
import pytest
import torch

from ddpm_hf import DDIMScheduler, DDPMScheduler

PAIRS = [(DDPMScheduler, diffusers.DDPMScheduler), (DDIMScheduler, diffusers.DDIMScheduler)]


def init_defaults(cls):
    return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}


@pytest.mark.parametrize("cls,ref", PAIRS)
def test_same_config_keys_and_defaults(cls, ref):
    assert init_defaults(cls) == init_defaults(ref)
    assert list(init_defaults(cls)) == list(init_defaults(ref))  # positional order too
    ours, theirs = cls(), ref()
    assert {k: v for k, v in ours.config.items() if not k.startswith("_")} == {
        k: v for k, v in theirs.config.items() if not k.startswith("_")
    }
    assert cls._compatibles == ref._compatibles and len(cls._compatibles) == 15
    assert cls.order == 1 and ours.init_noise_sigma == 1.0 and len(ours) == 1000
    x = torch.randn(1, 1, 2, 2)
    assert ours.scale_model_input(x, 3) is x


@pytest.mark.parametrize("cls,ref", PAIRS)
def test_config_interchange_both_ways(cls, ref, tmp_path):
    cfg = dict(num_train_timesteps=200, beta_schedule="scaled_linear", prediction_type="v_prediction",
               timestep_spacing="trailing", steps_offset=1, clip_sample=False)
    ours = cls(**cfg)
    theirs = ref.from_config(ours.config)
    assert type(theirs) is ref and {k: theirs.config[k] for k in cfg} == cfg
    back = cls.from_config(theirs.config)
    assert type(back) is cls and {k: back.config[k] for k in cfg} == cfg
    assert torch.equal(back.alphas_cumprod, theirs.alphas_cumprod)  # the public table is diffusers' own
    torch.testing.assert_close(back.noise_schedule.alphas_cumprod.float(), theirs.alphas_cumprod, rtol=1e-5, atol=0)

    ours.save_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == ref.__name__
    assert ref.from_pretrained(tmp_path / "ours").config["timestep_spacing"] == "trailing"
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = cls.from_pretrained(tmp_path / "theirs")
    assert type(loaded) is cls and {k: loaded.config[k] for k in cfg} == cfg
    assert torch.equal(loaded.alphas_cumprod, ours.alphas_cumprod)


def test_ddim_from_ddpm_config_and_back():
    ddpm = DDPMScheduler(variance_type="fixed_large", beta_schedule="squaredcos_cap_v2", timestep_spacing="linspace")
    ddim = DDIMScheduler.from_config(ddpm.config)
    reference = diffusers.DDIMScheduler.from_config(diffusers.DDPMScheduler.from_config(ddpm.config).config)
    assert type(ddim) is DDIMScheduler and dict(ddim.config) == dict(reference.config)
    assert ddim.config.beta_schedule == "squaredcos_cap_v2" and ddim.config.timestep_spacing == "linspace"
    assert torch.equal(ddim.alphas_cumprod, ddpm.alphas_cumprod)
    again = DDPMScheduler.from_config(ddim.config)
    assert again.config.beta_schedule == "squaredcos_cap_v2"
    assert diffusers.DDIMScheduler.from_config(ddpm.config).config.timestep_spacing == "linspace"


def test_trained_betas_round_trip(tmp_path):
    betas = [0.001 * (i + 1) for i in range(10)]
    s = DDPMScheduler(num_train_timesteps=10, trained_betas=betas)
    s.save_pretrained(tmp_path)
    loaded = DDPMScheduler.from_pretrained(tmp_path)
    assert torch.equal(loaded.noise_schedule.betas, torch.tensor(betas, dtype=torch.float64))
    assert torch.equal(loaded.betas, torch.tensor(betas, dtype=torch.float32))


def test_schedule_tables_are_never_moved_and_the_maths_table_is_float64():
    s = DDPMScheduler()
    table, exact = s.alphas_cumprod, s.noise_schedule.alphas_cumprod
    assert table.dtype == torch.float32 and exact.dtype == s.noise_schedule.betas.dtype == torch.float64
    x = torch.randn(2, 1, 2, 2, dtype=torch.float16)
    noisy = s.add_noise(x, x, torch.tensor([10, 900]))
    velocity = s.get_velocity(x, x, torch.tensor([10, 900]))
    assert noisy.dtype == velocity.dtype == torch.float16
    assert s.alphas_cumprod is table and table.dtype == torch.float32 and table.device.type == "cpu"
    assert s.noise_schedule.alphas_cumprod is exact and exact.device.type == "cpu"
    # per call in float64: a scalar timestep broadcasts too
    torch.testing.assert_close(s.add_noise(x.float(), x.float(), 5), s.add_noise(x.float(), x.float(), torch.tensor([5, 5])))


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(beta_start=0.03, beta_end=0.02), ValueError, "beta_start"),
        (dict(beta_start=float("nan")), ValueError, "beta_start must be a finite float in \\(0.0, 1.0\\)"),
        (dict(beta_end=-0.1), ValueError, "beta_end"),
        (dict(beta_end="0.02"), TypeError, "beta_end"),
        (dict(beta_schedule="cosine"), ValueError, "beta_schedule must be one of .*'linear'"),
        (dict(prediction_type="eps"), ValueError, "prediction_type must be one of .*'v_prediction'"),
        (dict(timestep_spacing="uniform"), ValueError, "timestep_spacing must be one of .*'trailing'"),
        (dict(num_train_timesteps=0), ValueError, "num_train_timesteps must be an int >= 1"),
        (dict(num_train_timesteps=100.0), TypeError, "num_train_timesteps must be an int"),
        (dict(clip_sample="yes"), TypeError, "clip_sample must be True or False"),
        (dict(thresholding=1), TypeError, "thresholding"),
        (dict(dynamic_thresholding_ratio=1.5), ValueError, "dynamic_thresholding_ratio"),
        (dict(clip_sample_range=0.0), ValueError, "clip_sample_range"),
        (dict(sample_max_value=float("inf")), ValueError, "sample_max_value"),
        (dict(steps_offset=-1), ValueError, "steps_offset must be an int >= 0"),
        (dict(rescale_betas_zero_snr=None), TypeError, "rescale_betas_zero_snr"),
        (dict(trained_betas=[0.1, 0.2]), ValueError, "trained_betas has 2 values"),
        (dict(trained_betas=[0.0] * 1000), ValueError, "trained_betas must all be finite and in the open interval"),
    ],
)
def test_bad_config_values(cls, kwargs, error, match):
    with pytest.raises(error, match=match):
        cls(**kwargs)


def test_bad_scheduler_specific_values():
    with pytest.raises(ValueError, match="variance_type must be one of .*'learned_range'"):
        DDPMScheduler(variance_type="fixed")
    with pytest.raises(TypeError, match="set_alpha_to_one must be True or False"):
        DDIMScheduler(set_alpha_to_one="no")
