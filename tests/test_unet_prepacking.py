"""Weight prepacking (``UNet2DModel.enable_weight_prepacking``) against diffusers.UNet2DModel, the oracle.

The packed path must give diffusers' outputs to 1e-5 in fp32, follow weight updates, leave parameters, saving,
copying and training untouched, and actually run on packed weights where it says it does.
"""

from __future__ import annotations

import copy
import pickle

import diffusers
import pytest
import torch
import torch.nn.functional as F

from ddpm_hf.models import UNET_PRESETS, UNet2DModel
from ddpm_hf.models.blocks import UpsampleConv, subpixel_upsample_conv
from ddpm_hf.models import packed_conv
from ddpm_hf.models.packed_conv import PackableConv2d

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="prepacking is a oneDNN path")


@pytest.fixture(autouse=True)
def pack_every_conv(monkeypatch):
    """These small test nets have no weight as big as ``MIN_PACKED_WEIGHT``: pack every conv, 1x1 included."""
    monkeypatch.setattr(packed_conv, "MIN_PACKED_WEIGHT", 0)
    monkeypatch.setattr(PackableConv2d, "worth_packing", lambda self: True)

TINY = UNET_PRESETS["tiny"]
# Every packable conv kind: 1x1 shortcuts, TF-style padded downsampling, resnet resamplers, fused upsampling.
VARIANTS = dict(sample_size=8, in_channels=2, out_channels=4, block_out_channels=(8, 16, 16), layers_per_block=1,
                down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=4,
                downsample_padding=0)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def pair(config: dict, batch: int = 3):
    torch.manual_seed(0)
    theirs = diffusers.UNet2DModel(**config).eval()
    ours = UNet2DModel(**config).eval()
    ours.load_state_dict(theirs.state_dict())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, config["in_channels"], config["sample_size"], config["sample_size"], generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    return theirs, ours, x, t


def packed_calls(model: UNet2DModel, x, t) -> int:
    """How many convs of one forward ran on a packed weight (counted on oneDNN's packed-conv op)."""
    calls = []
    handles = [m.register_forward_hook(lambda mod, args, out: calls.append(mod.uses_pack(args[0])))
               for m in model.modules() if isinstance(m, PackableConv2d)]
    with torch.inference_mode():
        model(x, t)
    for handle in handles:
        handle.remove()
    return sum(calls)


@pytest.mark.parametrize("config", [TINY, VARIANTS, {**VARIANTS, "downsample_type": "resnet",
                                                      "upsample_type": "resnet", "resnet_time_scale_shift":
                                                      "scale_shift"}], ids=["tiny", "variants", "resnet-resample"])
@pytest.mark.parametrize("grad_mode", [torch.no_grad, torch.inference_mode])
def test_packed_forward_matches_diffusers(config, grad_mode):
    theirs, ours, x, t = pair(config)
    ours.enable_weight_prepacking()
    with grad_mode():
        reference = theirs(x, t).sample
        out = ours(x, t).sample
        again = ours(x, t).sample  # second call: from the cache
    assert rel_err(out, reference) < 1e-5 and torch.equal(out, again)
    assert out.is_contiguous()  # the caller's layout, though packed convs return channels-last maps
    n_convs = sum(isinstance(m, PackableConv2d) for m in ours.modules())
    assert packed_calls(ours, x, t) == n_convs


def test_channels_last_input_keeps_its_layout():
    theirs, ours, x, t = pair(TINY)
    ours.enable_weight_prepacking()
    x_cl = x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        out = ours(x_cl, t).sample
        assert rel_err(out, theirs(x, t).sample) < 1e-5
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_packs_follow_weight_updates_and_reenable_sees_data_writes():
    theirs, ours, x, t = pair(VARIANTS)
    ours.enable_weight_prepacking()
    with torch.no_grad():
        ours(x, t)  # pack
        for model in (theirs, ours):  # an autograd-visible in-place update, as an optimizer step makes
            model.conv_in.weight.mul_(1.5)
            model.up_blocks[0].upsamplers[0].conv.weight.add_(0.01)
        assert rel_err(ours(x, t).sample, theirs(x, t).sample) < 1e-5
    ours.load_state_dict(diffusers.UNet2DModel(**VARIANTS).state_dict())  # another net's weights
    theirs.load_state_dict(ours.state_dict())
    with torch.no_grad():
        assert rel_err(ours(x, t).sample, theirs(x, t).sample) < 1e-5
        for model in (theirs, ours):
            model.conv_out.weight.data.mul_(-1)  # invisible to the version counter: documented, re-enable
        ours.enable_weight_prepacking()
        assert rel_err(ours(x, t).sample, theirs(x, t).sample) < 1e-5


def test_training_and_state_dict_unaffected():
    theirs, ours, x, t = pair(VARIANTS)
    keys = list(ours.state_dict())
    ours.enable_weight_prepacking()
    with torch.no_grad():
        ours(x, t)
    assert list(ours.state_dict()) == keys
    ours.train()
    theirs.train()
    target = torch.randn(3, 4, 8, 8)
    for model in (theirs, ours):
        F.mse_loss(model(x, t).sample, target).backward()
    assert packed_calls(ours, x, t) > 0  # inference still packed...
    with torch.enable_grad():  # ...but a grad-enabled forward never is
        assert not any(m.uses_pack(x) for m in ours.modules() if isinstance(m, PackableConv2d))
    grads = {name: p.grad for name, p in theirs.named_parameters()}
    scale = max(g.abs().max() for g in grads.values())
    for name, p in ours.named_parameters():
        assert (p.grad - grads[name]).abs().max() <= 1e-5 * scale, name


def test_copies_and_pickles_with_packs():
    _, ours, x, t = pair(TINY)
    ours.enable_weight_prepacking()
    with torch.no_grad():
        reference = ours(x, t).sample
        for clone in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
            assert torch.equal(clone(x, t).sample, reference)


def test_disable_frees_packs_and_restores_plain_path():
    _, ours, x, t = pair(TINY)
    ours.enable_weight_prepacking()
    with torch.no_grad():
        ours(x, t)
    ours.disable_weight_prepacking()
    assert all(not m._packs and not m.uses_pack(x) for m in ours.modules() if isinstance(m, PackableConv2d))
    assert packed_calls(ours, x, t) == 0


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="oneDNN has no bf16 on this CPU")
def test_bf16_autocast_and_bf16_weights_packed():
    theirs, ours, x, t = pair(TINY)
    ours.enable_weight_prepacking()
    with torch.no_grad():
        reference = theirs(x, t).sample
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = ours(x, t).sample
        assert set(ours.conv_in._packs) == {torch.bfloat16}  # autocast packs bf16 weights
        halved = copy.deepcopy(ours).to(torch.bfloat16)
        cast = halved(x.bfloat16(), t).sample
    assert auto.dtype == torch.bfloat16 and cast.dtype == torch.bfloat16
    assert rel_err(auto, reference) < 0.05 and rel_err(cast, reference) < 0.1  # bf16: 8 mantissa bits


def test_compiles_to_one_graph_with_prepacking_on():
    """Under torch.compile the plain path is traced (Inductor does its own packing); one graph, same outputs."""
    theirs, ours, x, t = pair(TINY)
    ours.enable_weight_prepacking()
    torch._dynamo.reset()
    compiled = torch.compile(ours, fullgraph=True, backend="eager")
    with torch.no_grad():
        assert rel_err(compiled(x, t).sample, theirs(x, t).sample) < 1e-5


def test_dtype_mismatch_still_refused():
    """Without autocast a bf16 input to an fp32 conv is an error on the plain path; the packed path must agree."""
    conv = PackableConv2d(8, 8, kernel_size=3, padding=1)
    conv.prepack = True
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        assert conv.uses_pack(x)
        with pytest.raises(RuntimeError):
            F.conv2d(x.bfloat16(), conv.weight, conv.bias, padding=1)
        with pytest.raises(RuntimeError):
            conv(x.bfloat16())


def test_packed_fused_upsampling_equals_upsample_then_conv():
    torch.manual_seed(3)
    up = UpsampleConv(6)
    x = torch.randn(2, 6, 5, 7)
    expected = F.conv2d(F.interpolate(x.double(), scale_factor=2.0, mode="nearest"), up.weight.double(),
                        up.bias.double(), padding=1)
    up.prepack = True
    with torch.no_grad():
        assert up.uses_pack(x)
        out = up(x)
        assert torch.allclose(out.double(), expected, rtol=1e-5, atol=1e-5)
        assert torch.allclose(subpixel_upsample_conv(x, up.weight, up.bias, up.phase_taps), out, atol=1e-5)


def test_only_convs_worth_packing_are_packed(monkeypatch):
    """With the real rule: the tiny preset's 3x3 64-channel convs and phase kernels, not its 32-channel or 1x1 ones."""
    monkeypatch.undo()
    theirs, ours, x, t = pair(TINY)
    ours.enable_weight_prepacking()
    packed = {name for name, m in ours.named_modules() if isinstance(m, PackableConv2d) and m.prepack}
    assert "down_blocks.1.resnets.0.conv2" in packed and "up_blocks.0.upsamplers.0.conv" in packed
    assert "conv_in" not in packed and "down_blocks.0.resnets.0.conv1" not in packed  # 32 channels
    assert "up_blocks.0.resnets.0.conv_shortcut" not in packed  # 1x1
    assert all(packed_conv.MIN_PACKED_WEIGHT <= ours.get_submodule(name).weight.numel() for name in packed)
    assert 0 < packed_calls(ours, x, t) == len(packed)
    with torch.no_grad():
        assert rel_err(ours(x, t).sample, theirs(x, t).sample) < 1e-5
