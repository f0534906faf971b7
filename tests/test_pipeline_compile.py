"""``DDPMPipeline.compile_unet``: the warm-up compiles the one graph the sampling loop then reuses (no recompile
in the first sampling call), and the compiled pipeline draws the eager pipeline's images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch._dynamo.testing import CompileCounter

import ddpm_hf

TINY = dict(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=4, attention_head_dim=None)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _pipe(scheduler_cls=ddpm_hf.DDPMScheduler) -> ddpm_hf.DDPMPipeline:
    torch.manual_seed(0)
    pipe = ddpm_hf.DDPMPipeline(ddpm_hf.UNet2DModel(**TINY).eval(), scheduler_cls(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(pipe: ddpm_hf.DDPMPipeline, steps: int, seed: int = 3) -> np.ndarray:
    return pipe(batch_size=4, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                output_type="np").images


@pytest.mark.parametrize("scheduler_cls", [ddpm_hf.DDPMScheduler, ddpm_hf.DDIMScheduler])
def test_sampling_after_compile_unet_reuses_the_warm_up_graph(scheduler_cls):
    eager = _images(_pipe(scheduler_cls), steps=4)
    pipe, counter = _pipe(scheduler_cls), CompileCounter()
    seconds = pipe.compile_unet(4, backend=counter)
    assert seconds > 0 and counter.frame_count == 1
    first, second = _images(pipe, steps=4), _images(pipe, steps=3, seed=5)
    assert counter.frame_count == 1, "a sampling call recompiled the unet after compile_unet's warm-up"
    np.testing.assert_allclose(first, eager, atol=1e-6)
    assert second.shape == first.shape


@pytest.mark.slow
def test_inductor_with_weight_freezing_draws_the_eager_images():
    eager = _images(_pipe(), steps=3)
    pipe = _pipe()
    try:
        assert pipe.compile_unet(4, freezing=True) > 0
        compiled = _images(pipe, steps=3)
    finally:
        torch._inductor.config.freezing = False  # a global: other tests compile without it
    np.testing.assert_allclose(compiled, eager, atol=2e-4)
