"""The sampling loop reads nothing back from the device: no ``.item()``, ``.tolist()``, ``float(t)``, ``int(t)``
or ``bool(t)`` per step (each is a device sync on a GPU). Counted by patching those Tensor methods during a
2-step and a 20-step call: a per-step read would make the 20-step count larger."""

from __future__ import annotations

import contextlib
from collections import Counter

import pytest
import torch

import ddpm_hf

TINY = dict(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=4, attention_head_dim=None)
_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")


@contextlib.contextmanager
def counting_host_reads(monkeypatch):
    """Count calls of the Tensor methods that copy a value to the host."""
    counts: Counter = Counter()
    with monkeypatch.context() as patch:
        for name in _READS:
            original = getattr(torch.Tensor, name)

            def counted(self, *args, _name=name, _original=original, **kwargs):
                counts[_name] += 1
                return _original(self, *args, **kwargs)

            patch.setattr(torch.Tensor, name, counted)
        yield counts


def _pipe(scheduler, conditional=False):
    torch.manual_seed(0)
    config = dict(TINY, num_class_embeds=3) if conditional else TINY
    unet = ddpm_hf.UNet2DModel(**config).eval()
    pipe = ddpm_hf.DDPMPipeline(unet, scheduler, id2label={0: "a", 1: "b"} if conditional else None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _reads(monkeypatch, pipe, steps, **kwargs) -> Counter:
    pipe(batch_size=2, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="pt",
         **kwargs)  # warm-up: first-call caches (step coefficients) are not per-step work
    with counting_host_reads(monkeypatch) as counts:
        pipe(batch_size=2, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
             output_type="pt", **kwargs)
    return counts


@pytest.mark.parametrize("make_scheduler, kwargs", [
    (lambda: ddpm_hf.DDPMScheduler(), {}),
    (lambda: ddpm_hf.DDIMScheduler(), {"eta": 0.5}),
    (lambda: ddpm_hf.DDPMScheduler(variance_type="fixed_large", clip_sample=False), {}),
], ids=["ddpm", "ddim-eta", "ddpm-fixed-large"])
def test_no_host_reads_per_step(monkeypatch, make_scheduler, kwargs):
    pipe = _pipe(make_scheduler())
    few, many = _reads(monkeypatch, pipe, 2, **kwargs), _reads(monkeypatch, pipe, 20, **kwargs)
    assert many == few, f"host reads grow with the step count: 2 steps {dict(few)}, 20 steps {dict(many)}"


def test_no_host_reads_per_step_with_guidance(monkeypatch):
    pipe = _pipe(ddpm_hf.DDIMScheduler(), conditional=True)
    kwargs = dict(class_labels=[0, 1], guidance_scale=2.0, guidance_rescale=0.5)
    few, many = _reads(monkeypatch, pipe, 2, **kwargs), _reads(monkeypatch, pipe, 20, **kwargs)
    assert many == few, f"host reads grow with the step count: 2 steps {dict(few)}, 20 steps {dict(many)}"


def test_the_counter_sees_a_per_step_read(monkeypatch):
    """The check can fail: a callback that reads one value per step is caught."""
    pipe = _pipe(ddpm_hf.DDPMScheduler())

    def reading_callback(pipeline, i, t, kwargs):
        kwargs["latents"].abs().max().item()
        return kwargs

    few = _reads(monkeypatch, pipe, 2, callback_on_step_end=reading_callback)
    many = _reads(monkeypatch, pipe, 20, callback_on_step_end=reading_callback)
    assert many["item"] == few["item"] + 18
