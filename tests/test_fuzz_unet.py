"""Fuzz every UNet2DModel config argument and forward input: a ValueError/TypeError naming it, or a working net.

Integers stay small (a huge layers_per_block is a valid, enormous network, not a bad input).
"""

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ddpm_hf import UNet2DModel
from ddpm_hf.models.packed_conv import PackableConv2d

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
ANYTHING = st.one_of(
    st.none(), st.booleans(), st.integers(-4, 40), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6), st.sampled_from(["DownBlock2D", "silu", "positional", "fourier", "conv", "UNetMidBlock2D"]),
    st.lists(st.integers(-4, 24), max_size=3), st.just([]), st.just({}),
    st.lists(st.sampled_from(["DownBlock2D", "AttnDownBlock2D", "UpBlock2D", "bogus"]), max_size=3),
)
TINY = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=4, attention_head_dim=None)
KEYS = [k for k in UNet2DModel(**TINY).config if not k.startswith("_")]


def assert_names(error, name):
    assert name in str(error), f"{type(error).__name__}: {error}"


@FUZZ
@given(key=st.sampled_from(KEYS), value=ANYTHING)
@example(key="attn_norm_num_groups", value=0)
@example(key="norm_eps", value=None)
@example(key="dropout", value="0.1")
def test_config_arguments(key, value):
    try:
        model = UNet2DModel(**{**TINY, key: value})
    except (ValueError, TypeError) as error:
        assert_names(error, key)
        return
    config = model.config
    size = config.sample_size if isinstance(config.sample_size, int) and 0 < config.sample_size <= 16 else 8
    x = torch.randn(2, config.in_channels, size, size, generator=torch.Generator().manual_seed(0))
    labels = {"class_labels": torch.zeros(2, dtype=torch.long)} if config.num_class_embeds else {}
    out = model(x, torch.tensor([3, 5]), **labels).sample
    assert out.shape == (2, config.out_channels, size, size) and torch.isfinite(out).all()
    if torch.backends.mkldnn.is_available():  # every config that builds also runs prepacked, to the same outputs
        model.eval()
        with torch.no_grad():
            plain = model(x, torch.tensor([3, 5]), **labels).sample
            model.enable_weight_prepacking()
            for conv in model.modules():  # this net's weights are all below the packing size: force it
                if isinstance(conv, PackableConv2d):
                    conv.prepack = True
            packed = model(x, torch.tensor([3, 5]), **labels).sample
        assert torch.allclose(packed, plain, rtol=1e-5, atol=1e-5 * plain.abs().max().item())


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return UNet2DModel(**TINY).eval()


@FUZZ
@given(argument=st.sampled_from(["sample", "timestep"]),
       value=st.one_of(ANYTHING, st.sampled_from([torch.zeros(2, 1, 7, 7), torch.zeros(2, 3, 8, 8), torch.zeros(1, 8, 8),
                                                  torch.zeros(2, 1, 8, 8, dtype=torch.long),
                                                  torch.tensor([1.5, 2.0]), torch.tensor([1, 2, 3])])))
@example(argument="sample", value=torch.zeros(2, 1, 8, 8, dtype=torch.long))
@example(argument="timestep", value=float("nan"))
@example(argument="timestep", value=1e300)
def test_forward_inputs(model, argument, value):
    kwargs = dict(sample=torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)),
                  timestep=torch.tensor([3, 5]))
    kwargs[argument] = value
    try:
        with torch.no_grad():
            out = model(**kwargs).sample
    except (ValueError, TypeError) as error:
        assert_names(error, argument)
        return
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()
