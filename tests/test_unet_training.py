"""ddpm_hf.UNet2DModel beyond float32 eager inference: training, gradient checkpointing, torch.compile,
bfloat16 autocast, channels_last, and the exactness of the fused upsampling conv."""

from __future__ import annotations

import diffusers
import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from ddpm_hf.models import UNET_PRESETS, UNet2DModel
from ddpm_hf.models.blocks import _phase_taps, subpixel_upsample_conv

TINY = UNET_PRESETS["tiny"]
TRAIN = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
             down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
             norm_num_groups=8, attention_head_dim=8)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def tiny_pair(config: dict = TINY):
    torch.manual_seed(0)
    theirs = diffusers.UNet2DModel(**config).eval()
    ours = UNet2DModel(**config).eval()
    ours.load_state_dict(theirs.state_dict())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, config["in_channels"], config["sample_size"], config["sample_size"], generator=g)
    t = torch.randint(0, 1000, (4,), generator=g)
    return theirs, ours, x, t


def loss_and_grads(net, x, t, target):
    net.zero_grad(set_to_none=True)
    loss = F.mse_loss(net(x, t).sample, target)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad}


def test_gradients_match_diffusers_and_training_reduces_loss():
    theirs, ours, x, t = tiny_pair(TRAIN)
    theirs.train()
    ours.train()
    target = torch.randn_like(x)
    loss_theirs, grads_theirs = loss_and_grads(theirs, x, t, target)
    loss_ours, grads_ours = loss_and_grads(ours, x, t, target)
    assert rel_err(loss_ours, loss_theirs) < 1e-5
    # Relative to the largest gradient: some are exactly zero in exact arithmetic (the key bias cancels in
    # the softmax) and are pure rounding noise in both implementations.
    scale = max(g.abs().max() for g in grads_theirs.values())
    for name, grad in grads_theirs.items():
        assert (grads_ours[name] - grad).abs().max() <= 1e-5 * scale, name

    optimizer = torch.optim.Adam(ours.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        loss = F.mse_loss(ours(x, t).sample, target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_dropout_is_active_in_training_only():
    torch.manual_seed(0)
    ours = UNet2DModel(**{**TRAIN, "dropout": 0.5})
    x = torch.randn(2, 1, 8, 8)
    ours.train()
    assert not torch.equal(ours(x, 5).sample, ours(x, 5).sample)
    ours.eval()
    with torch.no_grad():
        assert torch.equal(ours(x, 5).sample, ours(x, 5).sample)


def test_gradient_checkpointing_gives_same_gradients():
    _, ours, x, t = tiny_pair(TRAIN)
    ours.train()
    target = torch.randn_like(x)
    loss_plain, grads_plain = loss_and_grads(ours, x, t, target)

    calls = []

    def counting_checkpoint(module, *args):
        calls.append(type(module).__name__)
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)

    ours.enable_gradient_checkpointing(counting_checkpoint)
    loss_ckpt, grads_ckpt = loss_and_grads(ours, x, t, target)
    assert len(calls) == 8  # every ResNet block: 2 down + 2 mid + 4 up
    assert torch.equal(loss_ckpt, loss_plain)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-7, msg=name)

    ours.enable_gradient_checkpointing()  # diffusers' default checkpoint function
    _, grads_default = loss_and_grads(ours, x, t, target)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_default[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    ours.disable_gradient_checkpointing()
    assert not any(getattr(m, "gradient_checkpointing", False) for m in ours.modules())


def test_dynamo_traces_one_graph():
    """fullgraph=True with the graph-capturing "eager" backend: fails on any graph break, without Inductor."""
    torch._dynamo.reset()
    _, ours, x, t = tiny_pair()
    compiled = torch.compile(ours, backend="eager", fullgraph=True)
    with torch.no_grad():
        assert rel_err(compiled(x, t).sample, ours(x, t).sample) < 1e-6
        assert rel_err(compiled(x, 17).sample, ours(x, 17).sample) < 1e-6


@pytest.mark.slow  # ~70 s of Inductor compilation on a 2-core CPU
def test_inductor_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    _, ours, x, t = tiny_pair()
    compiled = torch.compile(ours, fullgraph=True)
    with torch.no_grad():
        assert rel_err(compiled(x, t).sample, ours(x, t).sample) < 1e-4


def test_bf16_autocast_close_to_diffusers_and_fp32():
    theirs, ours, x, t = tiny_pair()
    with torch.no_grad():
        fp32 = ours(x, t).sample
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours_bf16 = ours(x, t).sample
            theirs_bf16 = theirs(x, t).sample
    assert rel_err(ours_bf16, fp32) < 5e-2
    assert rel_err(ours_bf16, theirs_bf16) < 5e-2


def test_bf16_weights_keep_float32_time_frequencies():
    _, ours, x, t = tiny_pair()
    with torch.no_grad():
        fp32 = ours(x, t).sample
        ours.to(torch.bfloat16)
        bf16 = ours(x.bfloat16(), t).sample
    assert bf16.dtype == torch.bfloat16
    assert rel_err(bf16, fp32) < 1e-1


@pytest.mark.parametrize("weights_channels_last", [False, True])
def test_channels_last(weights_channels_last):
    theirs, ours, x, t = tiny_pair()
    with torch.no_grad():
        reference = theirs(x, t).sample
        if weights_channels_last:
            ours.to(memory_format=torch.channels_last)
        out = ours(x.contiguous(memory_format=torch.channels_last), t).sample
    assert rel_err(out, reference) < 1e-5


@pytest.mark.parametrize("batch, channels, height, width", [(1, 3, 4, 4), (2, 5, 3, 6), (1, 4, 1, 1)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_subpixel_upsample_conv_is_upsample_then_conv(batch, channels, height, width, channels_last):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, height, width, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(7, channels, 3, 3, generator=g)
    bias = torch.randn(7, generator=g)
    expected = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias, padding=1)
    out = subpixel_upsample_conv(x, weight, bias, _phase_taps())
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    if height * width > 1:  # a 1x1 map is both formats at once
        assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_deepcopy_and_whole_model_pickle():
    """EMA helpers deepcopy the net and some users torch.save the whole module."""
    import copy
    import io

    _, ours, x, t = tiny_pair()
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    with torch.no_grad():
        expected = ours(x, t).sample
        assert torch.equal(copy.deepcopy(ours)(x, t).sample, expected)
        assert torch.equal(torch.load(buffer, weights_only=False)(x, t).sample, expected)


def test_timestep_class_embedding_in_bfloat16():
    """Divergence: diffusers feeds the float32 label embedding into bf16 weights and raises; we cast it."""
    config = {**TRAIN, "class_embed_type": "timestep"}
    torch.manual_seed(0)
    ours = UNet2DModel(**config).eval()
    x, labels = torch.randn(2, 1, 8, 8), torch.tensor([1, 7])
    with torch.no_grad():
        fp32 = ours(x, 3, class_labels=labels).sample
        bf16 = ours.to(torch.bfloat16)(x.bfloat16(), 3, class_labels=labels).sample
    assert rel_err(bf16, fp32) < 1e-1
