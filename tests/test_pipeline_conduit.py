"""The conditioning conduit: every pipeline method passes ``model_kwargs`` to every network call.

The network below needs a ``shift`` keyword (it raises without one) and adds it to its noise prediction. A twin
network has the same shift built into its config and takes no keyword. Each method, given
``model_kwargs={"shift": s}``, must return exactly what the twin returns without it: so every call received the
keyword and its value was used; a different shift changes the result.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.unets.unet_2d import UNet2DOutput

import ddpm_hf
from ddpm_hf.pipeline import DDPMPipeline

T, SHIFT = 20, 0.05


class ShiftedEps(ModelMixin, ConfigMixin):
    """eps = 0.3 * x_t + shift; ``shift`` from ``model_kwargs`` unless ``built_in_shift`` is set."""

    @register_to_config
    def __init__(self, sample_size: int = 4, in_channels: int = 1, built_in_shift: float | None = None):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))
        self.calls = 0

    def forward(self, sample, timestep, shift=None, return_dict=True):
        built_in = self.config.built_in_shift
        if (shift is None) == (built_in is None):
            raise TypeError("ShiftedEps needs exactly one of a shift keyword and a built-in shift")
        self.calls += 1
        eps = 0.3 * sample + (built_in if shift is None else shift)
        return UNet2DOutput(sample=eps) if return_dict else (eps,)


def _pipe(built_in_shift=None):
    scheduler = ddpm_hf.DDPMScheduler(num_train_timesteps=T, clip_sample=False)
    pipe = DDPMPipeline(ShiftedEps(built_in_shift=built_in_shift).double(), scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _gen():
    return torch.Generator().manual_seed(0)


IMAGES = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.8 + 0.1
LATENTS = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
MASK = torch.tensor([[1.0, 1, 0, 0]] * 4)
CALLS = {
    "__call__": lambda pipe, kw: pipe(batch_size=2, generator=_gen(), num_inference_steps=5, output_type="pt",
                                      model_kwargs=kw).images,
    "invert": lambda pipe, kw: pipe.invert(IMAGES, num_inference_steps=5, model_kwargs=kw),
    "decode": lambda pipe, kw: pipe.decode(LATENTS, num_inference_steps=5, output_type="pt", model_kwargs=kw).images,
    "interpolate": lambda pipe, kw: pipe.interpolate(IMAGES[:1], IMAGES[1:], num_points=3, num_inference_steps=4,
                                                     input_type="images", output_type="pt", model_kwargs=kw).images,
    "img2img": lambda pipe, kw: pipe.img2img(IMAGES, strength=0.6, num_inference_steps=5, generator=_gen(),
                                             output_type="pt", model_kwargs=kw).images,
    "inpaint": lambda pipe, kw: pipe.inpaint(IMAGES, MASK, num_inference_steps=6, jump_length=2, jump_n_sample=2,
                                             generator=_gen(), output_type="pt", model_kwargs=kw).images,
    "log_likelihood": lambda pipe, kw: pipe.log_likelihood(IMAGES, generator=_gen(), model_kwargs=kw).bits_per_dim,
}


@pytest.mark.parametrize("method", sorted(CALLS))
def test_model_kwargs_reach_every_network_call(method):
    conditioned, twin = _pipe(), _pipe(built_in_shift=SHIFT)
    got = CALLS[method](conditioned, {"shift": SHIFT})
    expected = CALLS[method](twin, None)
    assert conditioned.unet.calls == twin.unet.calls > 0
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    other = CALLS[method](_pipe(), {"shift": -SHIFT})
    assert not torch.allclose(other, got)
    with pytest.raises(TypeError, match="shift"):  # without the keyword the network refuses: nothing bypasses it
        CALLS[method](_pipe(), None)


@pytest.mark.parametrize("bad, error", [([("shift", 1.0)], TypeError), ("shift", TypeError), ({1: 2}, TypeError),
                                        ({"return_dict": True}, ValueError), ({"timestep": 3}, ValueError)])
def test_bad_model_kwargs_are_refused_before_any_network_call(bad, error):
    pipe = _pipe()
    for method in sorted(CALLS):
        with pytest.raises(error, match="model_kwargs"):
            CALLS[method](pipe, bad)
    assert pipe.unet.calls == 0


def test_the_network_is_called_only_through_the_choke_point(monkeypatch):
    """``_predict`` is the one place that calls the network: counting there counts every network call."""
    pipe = _pipe()
    routed = []
    original = DDPMPipeline._predict
    monkeypatch.setattr(DDPMPipeline, "_predict", lambda self, *args, **kw: routed.append(1) or original(self, *args, **kw))
    for method in sorted(CALLS):
        CALLS[method](pipe, {"shift": SHIFT})
    assert len(routed) == pipe.unet.calls > 0
