"""ddpm_hf's EMA against diffusers' `EMAModel`, update by update: decays, shadow weights and resumed state."""

import json

import pytest
import torch
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file

from ddpm_hf.ema import EMA

STEPS = 50
CONFIGS = [  # (our keyword arguments, EMAModel's)
    ({"max_decay": 0.999, "warmup": True}, {"decay": 0.999, "use_ema_warmup": True}),
    ({"max_decay": 0.9999, "warmup": True, "inv_gamma": 3.0, "power": 0.75},
     {"decay": 0.9999, "use_ema_warmup": True, "inv_gamma": 3.0, "power": 0.75}),
    ({"max_decay": 0.9, "warmup": True, "min_decay": 0.5, "update_after_step": 5},
     {"decay": 0.9, "use_ema_warmup": True, "min_decay": 0.5, "update_after_step": 5}),
    ({"max_decay": 0.999, "warmup": False}, {"decay": 0.999, "use_ema_warmup": False}),
    ({"max_decay": 0.8, "warmup": False}, {"decay": 0.8, "use_ema_warmup": False}),  # the ramp hits the cap
    ({"max_decay": 0.99, "warmup": False, "min_decay": 0.99}, {"decay": 0.99, "min_decay": 0.99}),  # constant
]


def _net():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    net[1].bias.requires_grad_(False)  # a frozen parameter: both copy it instead of averaging
    return net


def _train_step(net, g):
    """A stand-in optimizer step: every parameter (frozen ones too, like a buffer) moves by a random amount."""
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("ours_kwargs, theirs_kwargs", CONFIGS)
def test_ema_equals_diffusers_ema_model_update_by_update(ours_kwargs, theirs_kwargs, foreach):
    net = _net()
    ours = EMA(net.parameters(), **ours_kwargs)
    theirs = EMAModel(net.parameters(), foreach=foreach, **theirs_kwargs)
    g = torch.Generator().manual_seed(1)
    decays = []
    for _ in range(STEPS):
        _train_step(net, g)
        predicted = ours.decay()
        decays.append(ours.update(net.parameters()))
        theirs.step(net.parameters())
        assert decays[-1] == predicted == theirs.cur_decay_value
        for s_ours, s_theirs in zip(ours.shadow, theirs.shadow_params, strict=True):
            if foreach:  # the same fused kernel: bit for bit
                assert torch.equal(s_ours, s_theirs)
            else:  # s - (1 - d) * (s - p) unfused: float32 rounding apart
                torch.testing.assert_close(s_ours, s_theirs, rtol=1e-7, atol=1e-7)
    # The schedule itself, from the formulas: the first counted update copies the weights (decay 0).
    after = ours_kwargs.get("update_after_step", 0)
    assert decays[: after + 1] == [0.0] * (after + 1) and decays[after + 1] > 0
    assert max(decays) <= ours_kwargs["max_decay"] and min(decays[after + 1:]) >= ours_kwargs.get("min_decay", 0.0)


def test_first_decays_are_diffusers_not_the_old_off_by_one():
    param = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([param], max_decay=0.999, warmup=True)
    decays = []
    for n in range(1, 5):
        param.data.fill_(float(n))
        decays.append(ema.update([param]))
    # EMAModel.get_decay: step k = n - 1; 0 at k = 0, then 1 - (1 + k)^(-2/3). The old code used k = n (0.37 first).
    assert decays == pytest.approx([0.0, 1 - 2 ** (-2 / 3), 1 - 3 ** (-2 / 3), 1 - 4 ** (-2 / 3)], abs=1e-15)
    expected = 0.0
    for n, d in zip(range(1, 5), decays):
        expected = d * expected + (1 - d) * n
    torch.testing.assert_close(ema.shadow[0], torch.full((3,), expected))
    ramp = EMA([param], max_decay=0.999, warmup=False)
    assert [ramp.update([param]) for _ in range(3)] == pytest.approx([0.0, 2 / 11, 3 / 12])


def test_state_dict_round_trip_resumes_exactly(tmp_path):
    """Save after 20 updates through safetensors + JSON (as checkpointing does), resume, and match EMAModel."""
    net = _net()
    kwargs = {"max_decay": 0.99, "warmup": True, "min_decay": 0.1, "update_after_step": 3, "power": 0.75}
    ours = EMA(net.parameters(), **kwargs)
    theirs = EMAModel(net.parameters(), decay=0.99, use_ema_warmup=True, min_decay=0.1, update_after_step=3,
                      power=0.75)
    g = torch.Generator().manual_seed(2)
    for _ in range(20):
        _train_step(net, g)
        ours.update(net.parameters())
        theirs.step(net.parameters())
    state = ours.state_dict()
    save_file(state["tensors"], tmp_path / "ema.safetensors")
    (tmp_path / "ema.json").write_text(json.dumps(state["meta"]))
    resumed = EMA(net.parameters(), max_decay=0.5, warmup=False)  # every setting comes from the state
    resumed.load_state_dict({"tensors": load_file(tmp_path / "ema.safetensors"),
                             "meta": json.loads((tmp_path / "ema.json").read_text())})
    assert resumed.num_updates == 20 and resumed.decay() == ours.decay()
    for _ in range(STEPS - 20):
        _train_step(net, g)
        assert resumed.update(net.parameters()) == ours.update(net.parameters())
        theirs.step(net.parameters())
        assert resumed.decay() == theirs.get_decay(theirs.optimization_step + 1)
    for a, b, c in zip(resumed.shadow, ours.shadow, theirs.shadow_params, strict=True):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-7, atol=1e-7)
    with pytest.raises(ValueError, match="shape"):
        EMA([torch.nn.Parameter(torch.zeros(2))] * len(ours.shadow)).load_state_dict(state)


def test_copy_to_and_float32_shadows_of_bf16_parameters():
    param = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    ema = EMA([param], max_decay=0.999)
    assert ema.shadow[0].dtype == torch.float32
    ema.update([param])
    target = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    ema.copy_to([target])
    assert target.dtype == torch.bfloat16 and torch.equal(target.data, param.data)


@pytest.mark.parametrize("kwargs, message", [
    ({"max_decay": 1.0}, "max_decay must be < 1"), ({"max_decay": 0}, "max_decay must be a number > 0"),
    ({"min_decay": -0.1}, "min_decay must be a number >= 0"), ({"min_decay": 0.9999, "max_decay": 0.999},
                                                                "min_decay .* must not exceed max_decay"),
    ({"inv_gamma": 0}, "inv_gamma"), ({"power": -1}, "power"), ({"update_after_step": 1.5}, "update_after_step"),
    ({"warmup": "yes"}, "warmup must be True or False"),
])
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EMA([torch.nn.Parameter(torch.zeros(1))], **kwargs)
    with pytest.raises(ValueError, match="tracks 1 parameters, got 2"):
        EMA([torch.nn.Parameter(torch.zeros(1))]).update([torch.nn.Parameter(torch.zeros(1))] * 2)
