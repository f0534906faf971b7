"""Fuzz DDPMPipeline's sampling and editing arguments: a ValueError/TypeError naming the argument, or images.

T = 10 keeps any accepted step count cheap on the tiny net.
"""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ddpm_hf import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

FUZZ = settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
ANYTHING = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 12), st.sampled_from([0, -1, 2**63]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=5), st.sampled_from(["np", "pt", "pil", "latent"]),
    st.lists(st.integers(-2, 12), max_size=3), st.just([]), st.just({}),
    st.sampled_from([torch.zeros(2, 1, 8, 8), torch.zeros(1, 1, 4, 4), torch.zeros(2, 1, 8, 8, dtype=torch.long),
                     np.zeros((2, 8, 8, 1), np.float32), [torch.Generator()] * 3, torch.Generator()]),
)
TINY = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=4, attention_head_dim=None)


@pytest.fixture(scope="module", params=["ddpm", "ddim"])
def pipe(request):
    torch.manual_seed(0)
    scheduler = (DDPMScheduler if request.param == "ddpm" else DDIMScheduler)(num_train_timesteps=10)
    pipeline = DDPMPipeline(unet=UNet2DModel(**TINY).eval(), scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def check_images(images, batch):
    array = images.numpy() if torch.is_tensor(images) else np.asarray(images if not isinstance(images, list)
                                                                      else [np.asarray(i) for i in images])
    assert len(array) == batch and np.isfinite(array.astype(np.float64)).all()


def test_call_arguments(pipe):
    @FUZZ
    @given(argument=st.sampled_from(["batch_size", "generator", "num_inference_steps", "timesteps", "eta",
                                     "latents", "output_type", "use_clipped_model_output"]), value=ANYTHING)
    def check(argument, value):
        kwargs = {"batch_size": 2, "num_inference_steps": 2, "output_type": "np", argument: value}
        if argument == "timesteps":
            kwargs["num_inference_steps"] = None
        try:
            images = pipe(**kwargs).images
        except (ValueError, TypeError) as error:
            assert argument in str(error), f"{type(error).__name__}: {error}"
            return
        check_images(images, kwargs["batch_size"])

    check()


def test_editing_arguments(pipe):
    @FUZZ
    @given(method=st.sampled_from(["img2img", "inpaint"]),
           argument=st.sampled_from(["strength", "num_inference_steps", "jump_length", "jump_n_sample", "image",
                                     "mask", "generator"]), value=ANYTHING)
    def check(method, argument, value):
        kwargs = {"image": torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)),
                  "num_inference_steps": 4, "output_type": "np"}
        if method == "img2img":
            kwargs["strength"] = 0.5
        else:
            kwargs.update(mask=torch.ones(8, 8), jump_length=2, jump_n_sample=2)
        if argument not in kwargs and argument != "generator":
            return  # this method has no such argument
        kwargs[argument] = value
        try:
            images = getattr(pipe, method)(**kwargs).images
        except (ValueError, TypeError) as error:
            assert argument in str(error), f"{type(error).__name__}: {error}"
            return
        check_images(images, 2)

    check()
