"""DDPMPipeline sampling: equal to diffusers' DDPMPipeline / DDIMPipeline, and the __call__ API around it."""

from __future__ import annotations

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch

import ddpm_hf
from ddpm_hf.pipeline import DDPMPipeline

TINY = dict(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=4, attention_head_dim=None)
# Cheap enough for 1000 steps twice.
MINI = dict(sample_size=4, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(4,),
            down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), norm_num_groups=2, mid_block_type=None)


def _unet(config=TINY, seed=0):
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(**config).eval()


def _our_unet(stock):
    """ddpm_hf's UNet with the stock net's weights."""
    ours = ddpm_hf.UNet2DModel.from_config(stock.config)
    ours.load_state_dict(stock.state_dict())
    return ours.eval()


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _components(stock_unet, scheduler_cls, **config):
    """(unet, scheduler) pairs to run through our pipeline: diffusers' own, and ddpm_hf's."""
    return [(stock_unet, getattr(diffusers, scheduler_cls)(**config)),
            (stock_unet, getattr(ddpm_hf, scheduler_cls)(**config)),
            (_our_unet(stock_unet), getattr(ddpm_hf, scheduler_cls)(**config))]


@pytest.mark.parametrize("steps", [None, 10])
def test_ddpm_equals_diffusers_ddpm_pipeline(steps):
    unet = _unet(MINI)
    kwargs = {} if steps is None else {"num_inference_steps": steps}
    ref = _quiet(diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler()))
    expected = ref(batch_size=2, generator=_gen(3), output_type="np", **kwargs).images
    pairs = _components(unet, "DDPMScheduler")
    # The full 1000-step chain is the expensive case: run it for ddpm_hf's own components only; the mixed
    # combinations are covered by the 10-step case.
    for pair in pairs if steps is not None else pairs[-1:]:
        got = _quiet(DDPMPipeline(*pair))(batch_size=2, generator=_gen(3), output_type="np", **kwargs).images
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_equals_diffusers_ddim_pipeline(eta):
    unet = _unet()
    config = dict(num_train_timesteps=100, clip_sample=False)
    ref = _quiet(diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler(**config)))
    expected = ref(batch_size=2, generator=_gen(5), eta=eta, num_inference_steps=10, output_type="np").images
    for pair in _components(unet, "DDIMScheduler", **config):
        got = _quiet(DDPMPipeline(*pair))(batch_size=2, generator=_gen(5), eta=eta, num_inference_steps=10,
                                         output_type="np").images
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_default_steps_are_train_steps_for_ddpm_and_50_for_ddim():
    pipe = _quiet(DDPMPipeline(_unet(MINI), ddpm_hf.DDPMScheduler(num_train_timesteps=60)))
    seen = []

    def record(p, i, t, kw):
        seen.append(int(t))
        return kw

    pipe(callback_on_step_end=record, output_type="pt")
    assert seen == list(range(59, -1, -1))
    pipe.scheduler = ddpm_hf.DDIMScheduler(num_train_timesteps=1000)
    seen.clear()
    pipe(callback_on_step_end=record, output_type="pt")
    assert len(seen) == 50 and seen[0] == 980


def test_generator_list_gives_per_sample_reproducibility():
    for scheduler, kwargs in ((ddpm_hf.DDPMScheduler(num_train_timesteps=50), {}),
                              (ddpm_hf.DDIMScheduler(num_train_timesteps=50), {"eta": 1.0})):
        pipe = _quiet(DDPMPipeline(_unet(), scheduler))
        both = pipe(batch_size=2, generator=[_gen(1), _gen(2)], num_inference_steps=5, output_type="pt", **kwargs).images
        one = pipe(batch_size=1, generator=[_gen(2)], num_inference_steps=5, output_type="pt", **kwargs).images
        torch.testing.assert_close(both[1:], one, atol=1e-6, rtol=0)
        assert not torch.allclose(both[0], both[1])


def test_latents_replace_the_drawn_noise_and_keep_their_values():
    pipe = _quiet(DDPMPipeline(_unet(), ddpm_hf.DDIMScheduler(num_train_timesteps=50)))
    latents = torch.randn(2, 1, 8, 8, generator=_gen(9))
    kept = latents.clone()
    a = pipe(batch_size=2, latents=latents, num_inference_steps=4, output_type="pt").images
    b = pipe(batch_size=2, generator=_gen(9), num_inference_steps=4, output_type="pt").images
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(latents, kept)


def test_noise_is_drawn_on_the_execution_device_in_the_unet_dtype():
    pipe = _quiet(DDPMPipeline(_unet().to(torch.float64), ddpm_hf.DDIMScheduler(num_train_timesteps=50)))
    seen = []
    out = pipe(num_inference_steps=2, output_type="pt",
               callback_on_step_end=lambda p, i, t, kw: seen.append(kw["latents"]) or kw).images
    assert all(x.dtype == torch.float64 and x.device == pipe._execution_device for x in seen)
    assert out.dtype == torch.float64
    out.add_(1)  # an ordinary tensor, not an inference-mode one


def test_callback_sees_every_step_and_can_replace_latents():
    pipe = _quiet(DDPMPipeline(_unet(), ddpm_hf.DDIMScheduler(num_train_timesteps=50)))
    steps = []

    def callback(p, i, t, kwargs):
        steps.append(i)
        return {"latents": torch.zeros_like(kwargs["latents"])} if i == 2 else kwargs

    out = pipe(num_inference_steps=3, callback_on_step_end=callback, output_type="np").images
    assert steps == [0, 1, 2]
    np.testing.assert_array_equal(out, np.full_like(out, 0.5))


def test_custom_timesteps_are_visited():
    pipe = _quiet(DDPMPipeline(_unet(), ddpm_hf.DDPMScheduler(num_train_timesteps=50)))
    seen = []
    pipe(timesteps=[40, 22, 7, 0], output_type="pt", callback_on_step_end=lambda p, i, t, kw: seen.append(int(t)) or kw)
    assert seen == [40, 22, 7, 0]
    a = pipe(timesteps=[40, 22, 7, 0], generator=_gen(0), output_type="np").images
    stock = _quiet(DDPMPipeline(pipe.unet, diffusers.DDPMScheduler(num_train_timesteps=50)))
    b = stock(timesteps=[40, 22, 7, 0], generator=_gen(0), output_type="np").images
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_output_types_and_tuple_return():
    pipe = _quiet(DDPMPipeline(_unet(), ddpm_hf.DDIMScheduler(num_train_timesteps=50)))
    pil = pipe(batch_size=2, num_inference_steps=2, generator=_gen(0)).images
    assert len(pil) == 2 and all(isinstance(im, PIL.Image.Image) and im.size == (8, 8) for im in pil)
    arr = pipe(batch_size=2, num_inference_steps=2, generator=_gen(0), output_type="np").images
    assert arr.shape == (2, 8, 8, 1) and arr.min() >= 0 and arr.max() <= 1
    (pt,) = pipe(batch_size=2, num_inference_steps=2, generator=_gen(0), output_type="pt", return_dict=False)
    assert pt.shape == (2, 1, 8, 8)
    np.testing.assert_allclose(pt.permute(0, 2, 3, 1).numpy(), arr)


def test_progress_bar_follows_config_and_hooks_are_freed(capsys, monkeypatch):
    pipe = DDPMPipeline(_unet(), ddpm_hf.DDIMScheduler(num_train_timesteps=50))
    freed = []
    monkeypatch.setattr(pipe, "maybe_free_model_hooks", lambda: freed.append(True))
    pipe.set_progress_bar_config(disable=False)
    pipe(num_inference_steps=3, output_type="pt")
    assert "3/3" in capsys.readouterr().err
    pipe.set_progress_bar_config(disable=True)
    pipe(num_inference_steps=3, output_type="pt")
    assert capsys.readouterr().err == ""
    assert freed == [True, True]


@pytest.mark.parametrize("kwargs, match", [
    ({"batch_size": 0}, "batch_size"),
    ({"batch_size": 2, "generator": [torch.Generator()]}, "generator"),
    ({"output_type": "jpg"}, "output_type"),
    ({"eta": 1.5}, "eta"),
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"num_inference_steps": 3, "timesteps": [3, 1]}, "timesteps"),
    ({"latents": torch.zeros(1, 1, 4, 4)}, "latents"),
    ({"callback_on_step_end_tensor_inputs": ["noise"]}, "callback_on_step_end_tensor_inputs"),
])
def test_bad_call_arguments_raise_value_error(kwargs, match):
    pipe = _quiet(DDPMPipeline(_unet(), ddpm_hf.DDIMScheduler(num_train_timesteps=50)))
    with pytest.raises(ValueError, match=match):
        pipe(**kwargs)


def test_ddim_only_arguments_are_refused_for_ddpm():
    pipe = _quiet(DDPMPipeline(_unet(), ddpm_hf.DDPMScheduler(num_train_timesteps=50)))
    with pytest.raises(ValueError, match="eta"):
        pipe(eta=0.5, num_inference_steps=2)
    with pytest.raises(ValueError, match="use_clipped_model_output"):
        pipe(use_clipped_model_output=True, num_inference_steps=2)
    with pytest.raises(TypeError, match="latents"):
        pipe(latents=torch.zeros(1, 1, 8, 8, dtype=torch.int64), num_inference_steps=2)


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
def test_diffusers_schedulers_sample_as_their_documented_loop(name):
    """Other diffusers schedulers through the registry's adapter: the loop diffusers documents for them
    (start noise times init_noise_sigma, scale_model_input before the network, step with the generator where
    step takes one), written out here."""
    unet = _unet()
    config = dict(num_train_timesteps=100)
    pipe = _quiet(DDPMPipeline(unet, getattr(diffusers, name)(**config)))
    got = pipe(batch_size=2, generator=_gen(7), num_inference_steps=6, output_type="pt").images
    oracle = getattr(diffusers, name)(**config)
    oracle.set_timesteps(6)
    gen = _gen(7)
    x = torch.randn((2, 1, 8, 8), generator=gen) * oracle.init_noise_sigma
    takes_generator = name != "UniPCMultistepScheduler"
    for t in oracle.timesteps:
        eps = unet(oracle.scale_model_input(x, t), t).sample
        x = oracle.step(eps, t, x, **({"generator": gen} if takes_generator else {})).prev_sample
    torch.testing.assert_close(got, (x / 2 + 0.5).clamp(0, 1), atol=1e-5, rtol=0)
    if name == "EulerDiscreteScheduler":
        assert oracle.init_noise_sigma > 1  # so the test sees a missing scale
