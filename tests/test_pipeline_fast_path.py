"""The bf16 fast path: the network in bf16, x_t and every scheduler step in fp32 with float64 coefficients.

The references are independent of the pipeline: DDIM's closed form (Song et al. 2021, eq. 12) in float64 from
the linear beta schedule's definition, and the fp32 pipeline's images for the same seeds.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import ddpm_hf
from ddpm_hf import fast_path

TINY = dict(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=4, attention_head_dim=None)
T = 1000


def _pipe(dtype=torch.float32, scheduler_cls=ddpm_hf.DDIMScheduler) -> ddpm_hf.DDPMPipeline:
    torch.manual_seed(0)
    unet = ddpm_hf.UNet2DModel(**TINY).eval()
    pipe = ddpm_hf.DDPMPipeline(unet, scheduler_cls(num_train_timesteps=T, clip_sample=False))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype=dtype)


def _ddim_step_float64(eps: torch.Tensor, t: int, prev_t: int, x: torch.Tensor) -> torch.Tensor:
    """DDIM eq. 12 with eta = 0, from the linear schedule's definition, all in float64."""
    betas = np.linspace(1e-4, 0.02, T, dtype=np.float64)
    alphas_cumprod = np.cumprod(1.0 - betas)
    a_t = alphas_cumprod[t]
    a_prev = alphas_cumprod[prev_t] if prev_t >= 0 else 1.0  # set_alpha_to_one
    eps, x = eps.double(), x.double()
    x0 = (x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
    return np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps


@pytest.fixture(autouse=True)
def _native_bf16(monkeypatch):
    """Tests run on any CPU: detection is patched (to native) unless a test patches it otherwise."""
    monkeypatch.setattr(fast_path, "cpu_bf16_native", lambda: True)


def test_bf16_network_fp32_steps_match_float64_closed_form(monkeypatch):
    pipe = _pipe(torch.bfloat16)
    assert pipe.unet.dtype == torch.bfloat16 and pipe.sample_dtype == torch.float32
    steps, unet_inputs = [], []
    original_step = pipe.scheduler.step

    def recording_step(model_output, timestep, sample, **kwargs):
        out = original_step(model_output, timestep, sample, **kwargs)
        steps.append((model_output, int(timestep), sample, out[0]))
        return out

    monkeypatch.setattr(pipe.scheduler, "step", recording_step)
    pipe.unet.register_forward_pre_hook(lambda module, args: unet_inputs.append(args[0].dtype))
    images = pipe(batch_size=3, num_inference_steps=8, generator=torch.Generator().manual_seed(1),
                  output_type="pt").images
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
    assert unet_inputs == [torch.bfloat16] * 8  # the network itself runs in bf16
    table = pipe.scheduler.timesteps.tolist() + [-1]
    for i, (eps, t, x, prev) in enumerate(steps):
        assert eps.dtype == x.dtype == prev.dtype == torch.float32
        expected = _ddim_step_float64(eps, t, table[i + 1], x)
        # fp32 arithmetic on float64 coefficients: a few fp32 ulps. A bf16 step would be off by ~1e-2.
        assert (prev.double() - expected).abs().max().item() < 1e-5 * max(1.0, expected.abs().max().item())
    assert len(steps) == 8


def test_a_bf16_scheduler_step_would_fail_the_same_check():
    """The tolerance above separates fp32 maths from bf16 maths (the check can fail)."""
    scheduler = ddpm_hf.DDIMScheduler(num_train_timesteps=T, clip_sample=False)
    scheduler.set_timesteps(8)
    x, eps = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)).unbind(0)
    t, prev_t = scheduler.timesteps[0].item(), scheduler.timesteps[1].item()
    bf16 = scheduler.step(eps.bfloat16(), scheduler.timesteps[0], x.bfloat16(), return_dict=False)[0]
    error = (bf16.double() - _ddim_step_float64(eps.bfloat16(), t, prev_t, x.bfloat16())).abs().max().item()
    assert error > 1e-3


def test_bf16_images_close_to_fp32_for_the_same_seed():
    seeds = [torch.Generator().manual_seed(s) for s in range(4)]
    fp32 = _pipe(torch.float32)(batch_size=4, num_inference_steps=10, generator=seeds, output_type="pt").images
    seeds = [torch.Generator().manual_seed(s) for s in range(4)]
    bf16 = _pipe(torch.bfloat16)(batch_size=4, num_inference_steps=10, generator=seeds, output_type="pt").images
    assert bf16.dtype == torch.float32
    difference = (bf16 - fp32).abs()
    assert difference.mean().item() < 0.01 and difference.max().item() < 0.25
    assert (bf16 - fp32.roll(1, 0)).abs().mean().item() > 10 * difference.mean().item()  # other seeds differ


def test_start_noise_is_the_fp32_draw_for_both_dtypes(monkeypatch):
    """Same generator, same x_T for the fp32 and the bf16 network: the fp32 draw, not a rounded bf16 one."""
    expected = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    assert not torch.equal(expected.bfloat16().float(), expected)  # a bf16 draw would differ
    for dtype in (torch.float32, torch.bfloat16):
        pipe = _pipe(dtype, ddpm_hf.DDPMScheduler)
        first = []
        original_step = pipe.scheduler.step
        monkeypatch.setattr(pipe.scheduler, "step", lambda out, t, x, **kw: first.append(x) or original_step(out, t, x, **kw))
        pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(3), output_type="pt")
        assert torch.equal(first[0], expected), dtype


def test_from_pretrained_torch_dtype_bf16(tmp_path):
    _pipe().save_pretrained(tmp_path)
    pipe = ddpm_hf.DDPMPipeline.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.dtype == torch.bfloat16
    images = pipe(batch_size=2, num_inference_steps=3, output_type="pt").images
    assert images.dtype == torch.float32 and images.shape == (2, 1, 8, 8)


def test_warns_when_bf16_would_be_emulated(monkeypatch):
    monkeypatch.setattr(fast_path, "cpu_bf16_native", lambda: False)
    pipe = _pipe(torch.bfloat16)
    with pytest.warns(RuntimeWarning, match="bf16 is emulated there and runs slower than float32"):
        pipe(batch_size=1, num_inference_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _pipe(torch.float32)(batch_size=1, num_inference_steps=2)  # fp32: nothing to warn about


def test_no_warning_where_bf16_is_native():
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _pipe(torch.bfloat16)(batch_size=1, num_inference_steps=2)


def test_detection_reads_the_cpu_flags(tmp_path):
    """Without bf16 instructions in the flags, bf16 counts as emulated whatever oneDNN says."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("model name\t: Old CPU\nflags\t\t: fpu sse avx2 fma\n")
    assert not ddpm_hf.hardware.describe_hardware(str(cpuinfo)).cpu_bf16_native
    cpuinfo.write_text("model name\t: New CPU\nflags\t\t: avx2 avx512f avx512_bf16\n")
    info = ddpm_hf.hardware.describe_hardware(str(cpuinfo))
    assert info.cpu_bf16_native == ddpm_hf.hardware._onednn_bf16()  # then it is oneDNN's verdict


def test_sample_dtype():
    assert fast_path.sample_dtype(torch.bfloat16) == torch.float32
    assert fast_path.sample_dtype(torch.float16) == torch.float32
    assert fast_path.sample_dtype(torch.float64) == torch.float64
