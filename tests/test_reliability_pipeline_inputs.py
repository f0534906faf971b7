"""Bad pipeline inputs get a ValueError/TypeError that names the argument, before any network call."""

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_hf import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

TINY = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=4, attention_head_dim=None)


class CountingUNet(UNet2DModel):
    """Counts forward calls: a rejected input must be rejected before the (expensive) network runs."""

    calls = 0

    def forward(self, *args, **kwargs):
        type(self).calls += 1
        return super().forward(*args, **kwargs)


@pytest.fixture(scope="module", params=["ddpm", "ddim"])
def pipe(request):
    torch.manual_seed(0)
    scheduler_cls = DDPMScheduler if request.param == "ddpm" else DDIMScheduler
    pipeline = DDPMPipeline(unet=CountingUNet(**TINY).eval(), scheduler=scheduler_cls(num_train_timesteps=10))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def image(batch=1):
    return torch.rand(batch, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def rejects(call, error, *words):
    before = CountingUNet.calls
    with pytest.raises(error) as info:
        call()
    for word in words:
        assert word in str(info.value), str(info.value)
    assert CountingUNet.calls == before, "the network ran before the bad input was noticed"


def test_wrong_number_of_generators(pipe):
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    rejects(lambda: pipe(batch_size=2, generator=gens, num_inference_steps=2), ValueError, "generator", "3", "2")
    rejects(lambda: pipe.img2img(image(2), generator=gens, num_inference_steps=2), ValueError, "generator")
    rejects(lambda: pipe.inpaint(image(2), torch.ones(8, 8), generator=gens[:1], num_inference_steps=2,
                                 jump_length=1, jump_n_sample=1), ValueError, "generator")
    rejects(lambda: pipe.log_likelihood(image(2), generator=gens), ValueError, "generator")


@pytest.mark.parametrize(
    "latents, error",
    [
        (torch.zeros(2, 1, 4, 4), ValueError),  # wrong size
        (torch.zeros(3, 1, 8, 8), ValueError),  # wrong batch
        (torch.zeros(2, 3, 8, 8), ValueError),  # wrong channels
        (torch.zeros(1, 8, 8), ValueError),  # missing batch dimension
        (torch.zeros(2, 1, 8, 8, dtype=torch.int64), TypeError),  # not floating point
        (np.zeros((2, 1, 8, 8), np.float32), TypeError),  # not a tensor
    ],
    ids=["size", "batch", "channels", "ndim", "int-dtype", "numpy"],
)
def test_latents_of_wrong_shape_or_dtype(pipe, latents, error):
    rejects(lambda: pipe(batch_size=2, latents=latents, num_inference_steps=2), error, "latents")
    if torch.is_tensor(latents) and latents.ndim == 4 and latents.shape[1:] != (1, 8, 8):
        rejects(lambda: pipe.decode(latents, num_inference_steps=2), error, "latents")


@pytest.mark.parametrize("strength", [0.0, -0.5, 1.0000001, 2, float("nan"), float("inf"), None, "0.5", True])
def test_strength_outside_zero_one(pipe, strength):
    rejects(lambda: pipe.img2img(image(), strength=strength, num_inference_steps=2), ValueError, "strength")


def test_strength_too_small_for_the_step_count(pipe):
    rejects(lambda: pipe.img2img(image(), strength=0.1, num_inference_steps=2), ValueError, "strength",
            "num_inference_steps")


@pytest.mark.parametrize(
    "mask",
    [torch.ones(4, 4), torch.ones(1, 2, 8, 8), torch.ones(3, 1, 8, 8), torch.ones(8, 8, 1, 1, 1),
     np.ones((8, 7), np.float32), Image.new("L", (4, 4))],
    ids=["small", "two-channels", "batch-3-for-2", "5-d", "numpy-8x7", "pil-4x4"],
)
def test_masks_of_wrong_shape(pipe, mask):
    rejects(lambda: pipe.inpaint(image(2), mask, num_inference_steps=2, jump_length=1, jump_n_sample=1),
            ValueError, "mask")


@pytest.mark.parametrize("mask, error", [(torch.full((8, 8), 2.0), ValueError), (torch.full((8, 8), float("nan")),
                                         ValueError), ("mask.png", TypeError)], ids=["above-1", "nan", "string"])
def test_masks_with_wrong_values(pipe, mask, error):
    rejects(lambda: pipe.inpaint(image(), mask, num_inference_steps=2, jump_length=1, jump_n_sample=1), error,
            "mask")


@pytest.mark.parametrize(
    "images, error",
    [(torch.rand(1, 3, 8, 8), ValueError), (torch.rand(1, 1, 16, 16), ValueError), (torch.zeros(0, 1, 8, 8),
     ValueError), (torch.full((1, 1, 8, 8), 1.5), ValueError), (torch.full((1, 1, 8, 8), float("nan")), ValueError),
     (torch.zeros(1, 1, 8, 8, dtype=torch.uint8), TypeError), ([1, 2, 3], TypeError)],
    ids=["channels", "size", "empty", "above-1", "nan", "uint8", "list-of-ints"],
)
def test_images_of_wrong_shape_range_or_type(pipe, images, error):
    rejects(lambda: pipe.img2img(images, num_inference_steps=2), error, "image")
    rejects(lambda: pipe.invert(images, num_inference_steps=2), error, "images")


@pytest.mark.parametrize(
    "kwargs, word",
    [(dict(batch_size=0), "batch_size"), (dict(batch_size=-1), "batch_size"), (dict(batch_size=2.0), "batch_size"),
     (dict(num_inference_steps=0), "num_inference_steps"), (dict(num_inference_steps=11), "num_inference_steps"),
     (dict(num_inference_steps=2, timesteps=[5, 1]), "timesteps"), (dict(output_type="jpeg"), "output_type"),
     (dict(eta=1.5), "eta"), (dict(eta=float("nan")), "eta"),
     (dict(callback_on_step_end_tensor_inputs=["noise"]), "callback_on_step_end_tensor_inputs")],
)
def test_sampling_arguments(pipe, kwargs, word):
    rejects(lambda: pipe(**{"num_inference_steps": 2, **kwargs}), (ValueError, TypeError), word)


def test_inpaint_jumps_longer_than_the_schedule(pipe):
    rejects(lambda: pipe.inpaint(image(), torch.ones(8, 8), num_inference_steps=2, jump_length=3, jump_n_sample=1),
            ValueError, "jump_length")


@pytest.mark.parametrize("images", [torch.rand(4, 8, 8), np.random.rand(8, 8, 3).astype(np.float32)],
                         ids=["CHW with 4 channels", "HWC with 3 channels"])
def test_a_wrong_image_shape_is_reported_as_given(pipe, images):
    with pytest.raises(ValueError, match=rf"got \({', '.join(map(str, images.shape))}\)$"):
        pipe.invert(images, 2)
