"""RePaint inpainting against the paper: the jump schedule of Lugmayr et al. 2022 (Algorithm 1 with sec. 4.2's
jumps) as ``diffusers.RePaintScheduler.set_timesteps`` builds it, and Algorithm 1 written out independently here
for a network that couples neighbouring pixels (so known pixels left un-noised change the unknown ones)."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.unets.unet_2d import UNet2DOutput

import ddpm_hf
from ddpm_hf.editing import repaint_moves
from ddpm_hf.pipeline import DDPMPipeline

SIZE = 6


def reference_walk(steps: int, jump_length: int, jump_n_sample: int, train_steps: int = 1000) -> list[tuple[str, int]]:
    """The reference walk as ("denoise", level) / ("renoise", level reached) pairs.

    ``RePaintScheduler.set_timesteps`` lists levels (times ``T // N``) as the authors' ``get_schedule_jump`` does;
    the authors' loop appends -1 (the finished image) and reads each consecutive pair (a, b): b = a - 1 is a
    reverse step with the network at level a, b = a + 1 one forward step.
    """
    oracle = diffusers.RePaintScheduler(num_train_timesteps=train_steps)
    oracle.set_timesteps(steps, jump_length=jump_length, jump_n_sample=jump_n_sample)
    levels = (oracle.timesteps // (train_steps // steps)).tolist() + [-1]
    walk = []
    for a, b in zip(levels, levels[1:]):
        assert abs(a - b) == 1
        walk.append(("denoise", a) if b < a else ("renoise", b))
    return walk


def our_walk(steps: int, jump_length: int, jump_n_sample: int) -> list[tuple[str, int]]:
    """``repaint_moves`` in the same terms: table position p is level ``steps - 1 - p``."""
    return [("denoise", steps - 1 - p) if q == p + 1 else ("renoise", steps - 1 - q)
            for p, q in repaint_moves(steps, jump_length, jump_n_sample)]


@pytest.mark.parametrize("steps, jump_length, jump_n_sample", [
    (250, 10, 10), (20, 5, 3), (25, 10, 2), (10, 1, 4), (12, 5, 1), (7, 7, 3), (30, 4, 5), (9, 2, 2)])
def test_walk_is_the_reference_jump_schedule(steps, jump_length, jump_n_sample):
    walk = our_walk(steps, jump_length, jump_n_sample)
    assert walk == reference_walk(steps, jump_length, jump_n_sample)
    moves = repaint_moves(steps, jump_length, jump_n_sample)
    assert moves[-1] == (steps - 1, steps)
    assert all(p != steps for p, _ in moves)  # Algorithm 1: the finished image is never re-noised


def test_default_walk_costs_the_reference_2410_network_calls():
    assert sum(1 for p, q in repaint_moves(250, 10, 10) if q > p) == 2410


def test_walk_arguments_are_checked():
    for bad in ((0, 1, 1), (4, 5, 1), (4, 1, 0), (4, 1.5, 1), (True, 1, 1)):
        with pytest.raises(ValueError):
            repaint_moves(*bad)


class BlurEps(ModelMixin, ConfigMixin):
    """eps = a 3x3 blur of x_t scaled by t: each pixel's prediction depends on its neighbours (float64)."""

    @register_to_config
    def __init__(self, sample_size: int = SIZE, in_channels: int = 1, num_train_timesteps: int = 1000):
        super().__init__()
        kernel = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]], dtype=torch.float64) / 16
        self.register_buffer("kernel", kernel.reshape(1, 1, 3, 3))
        self.anchor = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))  # gives the model its dtype
        self.calls: list[int] = []

    def forward(self, sample, timestep, return_dict=True):
        t = torch.as_tensor(timestep, dtype=torch.float64)
        self.calls.append(int(t))
        blur = torch.nn.functional.conv2d(sample.double(), self.kernel, padding=1)
        eps = (0.2 + 0.7 * t / self.config.num_train_timesteps) * blur
        return UNet2DOutput(sample=eps) if return_dict else (eps,)


def _case(train_steps=100):
    scheduler = ddpm_hf.DDPMScheduler(num_train_timesteps=train_steps, clip_sample=False)
    pipe = DDPMPipeline(BlurEps(num_train_timesteps=train_steps), scheduler)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(3)
    images = (torch.rand(2, 1, SIZE, SIZE, generator=gen) * 0.8 + 0.1).double()  # exact in float32 and float64
    mask = torch.zeros(SIZE, SIZE, dtype=torch.float64)
    mask[:, :3] = 1  # left half known; the blur reaches across the border
    return pipe, images, mask


def algorithm_1(net, images, mask, steps, jump_length, jump_n_sample, seed, known_renoised=True):
    """RePaint's Algorithm 1 over the reference walk, written out here.

    The reverse step p(x_{t-1} | x_t) is DDPM's (eq. 11 with sigma^2 = beta-tilde, in float64); the known pixels at level t-1 are
    q(x_{t-1} | x_0) (line 5); a forward step multiplies by sqrt(1 - beta) and adds sqrt(beta) noise (line 9),
    beta being the respaced step's 1 - abar_to / abar_from. Noise is drawn as the pipeline draws it: the start
    noise, then one draw per move, then the reverse step's own draw (when t > 0, as diffusers' schedulers draw). ``known_renoised=False`` is the bug the
    test must catch: known pixels pasted as x_0 instead of their noised version.
    """
    T = net.config.num_train_timesteps
    stride = T // steps
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, T))
    abar_at = lambda level: 1.0 if level < 0 else float(abar[level * stride])  # noqa: E731
    gen = torch.Generator().manual_seed(seed)
    x0 = images * 2 - 1
    x = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    level = steps - 1
    for kind, target in reference_walk(steps, jump_length, jump_n_sample, T):
        noise = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
        if kind == "renoise":
            beta = 1 - abar_at(target) / abar_at(level)
            x = np.sqrt(1 - beta) * x + np.sqrt(beta) * noise
        else:
            t = level * stride
            a_t, a = abar_at(level), abar_at(target - 1)
            beta = 1 - a_t / a
            x0_hat = (x - np.sqrt(1 - a_t) * net(x, t).sample) / np.sqrt(a_t)
            mean = np.sqrt(a) * beta / (1 - a_t) * x0_hat + np.sqrt(1 - beta) * (1 - a) / (1 - a_t) * x
            z = torch.randn(x0.shape, generator=gen, dtype=torch.float64) if t > 0 else 0.0
            x = mean + np.sqrt((1 - a) / (1 - a_t) * beta) * z
            known = np.sqrt(a) * x0 + np.sqrt(1 - a) * noise if known_renoised else x0
            x = mask * known + (1 - mask) * x
            target -= 1
        level = target
    assert level == -1
    return torch.where(mask.bool(), images, (x / 2 + 0.5).clamp(0, 1))


@pytest.mark.parametrize("steps, jump_length, jump_n_sample", [(20, 5, 3), (10, 3, 2)])
def test_inpaint_is_algorithm_1_for_a_network_that_couples_pixels(steps, jump_length, jump_n_sample):
    pipe, images, mask = _case()
    got = pipe.inpaint(images, mask, num_inference_steps=steps, jump_length=jump_length,
                       jump_n_sample=jump_n_sample, generator=torch.Generator().manual_seed(11), output_type="pt").images
    expected = algorithm_1(pipe.unet, images, mask, steps, jump_length, jump_n_sample, seed=11)
    torch.testing.assert_close(got, expected.float(), atol=1e-6, rtol=0)  # the pipeline returns float32 images
    # The comparison can see the bug: known pixels that are never noised move the unknown ones by far more.
    unnoised = algorithm_1(pipe.unet, images, mask, steps, jump_length, jump_n_sample, seed=11, known_renoised=False)
    assert (unnoised - expected)[..., 3:].abs().max() > 1e-3


def test_inpaint_calls_the_network_at_the_reference_timesteps():
    pipe, images, mask = _case(train_steps=1000)
    pipe.inpaint(images[:1], mask, generator=torch.Generator().manual_seed(0), output_type="pt")
    reference = [4 * level for kind, level in reference_walk(250, 10, 10) if kind == "denoise"]
    assert pipe.unet.calls == reference and len(reference) == 2410
