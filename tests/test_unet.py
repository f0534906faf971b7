"""Differential tests of ddpm_hf.UNet2DModel against diffusers.UNet2DModel 0.42.1 (the oracle).

Random-init diffusers nets are saved with ``save_pretrained`` and loaded into ours (and the reverse); outputs
must agree to 1e-5 relative in float32 for batched and scalar timesteps.
"""

from __future__ import annotations

import inspect
import json
import logging
import warnings
from contextlib import contextmanager

import diffusers
import pytest
import torch
from safetensors.torch import save_file

from ddpm_hf.models import UNET_PRESETS, UNet2DModel

SCALE_SHIFT_LEARNED_VARIANCE = dict(
    sample_size=16, in_channels=3, out_channels=6, block_out_channels=(16, 32), layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8, attention_head_dim=8, resnet_time_scale_shift="scale_shift", dropout=0.1,
)
CLASS_CONDITIONAL = dict(
    sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32, 32), layers_per_block=2,
    down_block_types=("AttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D"), norm_num_groups=8, attention_head_dim=4,
    num_class_embeds=10, downsample_type="resnet", upsample_type="resnet", mid_block_scale_factor=1.5,
    center_input_sample=True,
)
SMALL = dict(sample_size=8, in_channels=2, out_channels=2, block_out_channels=(8, 16), layers_per_block=1,
             down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
             norm_num_groups=4, attention_head_dim=4)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def diffusers_net(config: dict, seed: int = 0) -> diffusers.UNet2DModel:
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(**config).eval()


def inputs(config: dict, batch: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    size = config["sample_size"]
    x = torch.randn(batch, config["in_channels"], size, size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    labels = torch.randint(0, config.get("num_class_embeds") or 1, (batch,), generator=g)
    return x, t, labels


def run(net, x, t, labels=None):
    with torch.no_grad():
        return net(x, t, class_labels=labels).sample


@contextmanager
def captured_diffusers_logs():
    """Collect every diffusers log record of level WARNING or above, and every Python warning."""
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    root = logging.getLogger("diffusers")
    root.addHandler(handler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield records
    root.removeHandler(handler)
    records.extend(str(w.message) for w in caught)


def load_ours(path) -> UNet2DModel:
    ours, info = UNet2DModel.from_pretrained(path, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == [], info
    assert type(ours) is UNet2DModel
    return ours.eval()


def assert_saved_config_complete(path) -> None:
    saved = json.loads((path / "config.json").read_text())
    assert saved["_class_name"] == "UNet2DModel"
    expected = set(inspect.signature(diffusers.UNet2DModel.__init__).parameters) - {"self"}
    assert expected <= set(saved), expected - set(saved)


def check_round_trip(config: dict, tmp_path, batch: int = 2) -> None:
    theirs = diffusers_net(config)
    theirs.save_pretrained(tmp_path / "theirs")
    ours = load_ours(tmp_path / "theirs")
    x, t, labels = inputs(config, batch)
    labels = labels if config.get("num_class_embeds") else None

    reference = run(theirs, x, t, labels)
    assert rel_err(run(ours, x, t, labels), reference) < 1e-5
    for scalar in (int(t[0]), t[0], t[:1]):  # Python int, 0-d tensor, one-element tensor
        assert rel_err(run(ours, x, scalar, labels), run(theirs, x, scalar, labels)) < 1e-5

    ours.save_pretrained(tmp_path / "ours")
    assert_saved_config_complete(tmp_path / "ours")
    with captured_diffusers_logs() as logs:
        reloaded = diffusers.UNet2DModel.from_pretrained(tmp_path / "ours").eval()
    assert logs == []
    assert torch.equal(run(reloaded, x, t, labels), reference)


def test_tiny_round_trip(tmp_path):
    check_round_trip(UNET_PRESETS["tiny"], tmp_path)


def test_scale_shift_learned_variance_round_trip(tmp_path):
    check_round_trip(SCALE_SHIFT_LEARNED_VARIANCE, tmp_path)
    ours = UNet2DModel(**SCALE_SHIFT_LEARNED_VARIANCE)
    assert ours.mid_block.attentions[0].group_norm is None  # diffusers: no mid-attention norm with scale_shift


def test_class_conditional_round_trip(tmp_path):
    check_round_trip(CLASS_CONDITIONAL, tmp_path, batch=3)


def test_ddpm_cifar10_config(tmp_path):
    """The paper's 35.7M net: one batch-1 forward each at 32x32 (kept small: this is the slowest net here)."""
    config = UNET_PRESETS["ddpm-cifar10"]
    theirs = diffusers_net(config)
    theirs.save_pretrained(tmp_path / "theirs")
    ours = load_ours(tmp_path / "theirs")
    assert sum(p.numel() for p in ours.parameters()) == 35_746_307
    x, t, _ = inputs(config, 1)
    assert rel_err(run(ours, x, int(t[0])), run(theirs, x, int(t[0]))) < 1e-5

    ours.save_pretrained(tmp_path / "ours")
    assert_saved_config_complete(tmp_path / "ours")
    with captured_diffusers_logs() as logs:
        reloaded = diffusers.UNet2DModel.from_pretrained(tmp_path / "ours")
    assert logs == []
    # Same class and identical weights as the net just run, so identical outputs without another forward.
    reference = theirs.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in reloaded.state_dict().items())


@pytest.mark.parametrize(
    "overrides",
    [
        dict(class_embed_type="timestep"),
        dict(class_embed_type="identity", time_embedding_dim=32),
        dict(time_embedding_type="learned", num_train_timesteps=1000),
        dict(time_embedding_type="fourier", flip_sin_to_cos=False),
        dict(mid_block_type=None),
        dict(add_attention=False, act_fn="mish"),
        dict(act_fn="gelu", attn_norm_num_groups=2, downsample_padding=0),
        dict(attention_head_dim=None, freq_shift=1, flip_sin_to_cos=False, norm_eps=1e-6),
        dict(attention_head_dim=3),  # 16 // 3 heads of width 3: inner width 15 < 16 channels, as diffusers
        dict(down_block_types=("UNetResDownBlock2D", "AttnDownBlock2D"), time_embedding_dim=24),
        dict(resnet_time_scale_shift="scale_shift", attn_norm_num_groups=4, mid_block_scale_factor=2.0),
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_config_variants_match_diffusers(overrides):
    config = {**SMALL, **overrides}
    theirs = diffusers_net(config)
    ours = UNet2DModel(**config).eval()
    ours.load_state_dict(theirs.state_dict())
    x, t, _ = inputs(config, 2)
    t = t + 1  # fourier embeds log(t)
    labels = None
    if config.get("class_embed_type") == "timestep":
        labels = torch.tensor([3, 7])
    elif config.get("class_embed_type") == "identity":
        labels = torch.randn(2, 32)
    assert rel_err(run(ours, x, t, labels), run(theirs, x, t, labels)) < 1e-5


def test_legacy_attention_key_names_load(tmp_path):
    """Pre-0.14 checkpoints name the attention projections query/key/value/proj_attn; diffusers renames them."""
    theirs = diffusers_net(SMALL)
    renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    legacy = {}
    for name, tensor in theirs.state_dict().items():
        for new, old in renames.items():
            name = name.replace(new, old)
        legacy[name] = tensor.contiguous()
    assert any(".proj_attn." in k for k in legacy)
    path = tmp_path / "legacy"
    path.mkdir()
    save_file(legacy, path / "diffusion_pytorch_model.safetensors")
    (path / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", **SMALL}))
    ours = load_ours(path)
    x, t, _ = inputs(SMALL, 2)
    assert rel_err(run(ours, x, t), run(theirs, x, t)) < 1e-5


def test_float_timesteps_stay_fractional():
    """Divergence: diffusers casts a Python float timestep to long; we keep it (the tensor path agrees)."""
    ours = UNet2DModel(**SMALL).eval()
    x, _, _ = inputs(SMALL, 2)
    assert torch.equal(run(ours, x, 10.5), run(ours, x, torch.tensor([10.5, 10.5])))
    assert not torch.equal(run(ours, x, 10.5), run(ours, x, 10))


@pytest.mark.parametrize(
    "key, value",
    [
        ("down_block_types", ("SkipDownBlock2D", "AttnDownBlock2D")),
        ("up_block_types", ("AttnSkipUpBlock2D", "UpBlock2D")),
        ("mid_block_type", "UNetMidBlock2DCrossAttn"),
        ("time_embedding_type", "rotary"),
        ("class_embed_type", "projection"),
        ("resnet_time_scale_shift", "spatial"),
        ("downsample_type", "fir"),
        ("upsample_type", "transpose"),
        ("act_fn", "tanh"),
        ("norm_num_groups", 3),
        ("attn_norm_num_groups", 5),
        ("attention_head_dim", 0),
        ("dropout", 1.0),
        ("layers_per_block", 0),
        ("block_out_channels", (8, 16, 32)),
    ],
)
def test_unsupported_config_raises(key, value):
    with pytest.raises(ValueError, match=key):
        UNet2DModel(**{**SMALL, key: value})


def test_learned_embedding_needs_num_train_timesteps():
    with pytest.raises(ValueError, match="num_train_timesteps"):
        UNet2DModel(**{**SMALL, "time_embedding_type": "learned"})


@pytest.mark.parametrize(
    "sample, timestep, labels, match",
    [
        (torch.zeros(2, 3, 8, 8), 1, None, "sample"),  # wrong channel count
        (torch.zeros(2, 2, 7, 8), 1, None, "sample"),  # not a multiple of 2 ** (stages - 1)
        (torch.zeros(2, 2, 8), 1, None, "sample"),
        (torch.zeros(2, 2, 8, 8), torch.zeros(3), None, "timestep"),
        (torch.zeros(2, 2, 8, 8), 1, torch.zeros(2, dtype=torch.long), "class_labels"),
    ],
)
def test_bad_inputs_raise(sample, timestep, labels, match):
    ours = UNet2DModel(**SMALL)
    with pytest.raises(ValueError, match=match):
        ours(sample, timestep, class_labels=labels)


def test_missing_class_labels_raise():
    ours = UNet2DModel(**{**SMALL, "num_class_embeds": 4})
    with pytest.raises(ValueError, match="class_labels"):
        ours(torch.zeros(1, 2, 8, 8), 1)


def test_timestep_type_is_checked():
    with pytest.raises(TypeError, match="timestep"):
        UNet2DModel(**SMALL)(torch.zeros(1, 2, 8, 8), "1")


def test_return_dict_false_gives_tuple():
    ours = UNet2DModel(**SMALL).eval()
    x, t, _ = inputs(SMALL, 2)
    with torch.no_grad():
        out = ours(x, t, return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1 and torch.equal(out[0], run(ours, x, t))
