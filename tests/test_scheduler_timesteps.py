"""Timestep tables: equal to diffusers' wherever diffusers' are valid, fixed where not, and always well formed."""

import diffusers
import mpmath as mp
import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ddpm_hf import DDIMScheduler, DDPMScheduler
from ddpm_hf.timestep_spacing import check_custom_timesteps, make_timesteps


def diffusers_table(spacing, T, n, steps_offset=0):
    s = diffusers.DDPMScheduler(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=steps_offset)
    s.set_timesteps(n)
    return s.timesteps.tolist()


@pytest.mark.parametrize("T", [1000, 50, 999])
@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
def test_tables_equal_diffusers_where_valid(T, spacing):
    fixed = []
    for n in range(1, T + 1):
        theirs, ours = diffusers_table(spacing, T, n), make_timesteps(spacing, T, n)
        if len(theirs) == n:
            assert ours == theirs, (T, spacing, n)
        else:
            fixed.append(n)
            # float-arange rounding: N + 1 entries ending at -1; ours keeps the first N
            assert spacing == "trailing" and len(theirs) == n + 1 and theirs[-1] == -1 and ours == theirs[:n]
    if spacing == "trailing" and T == 1000:
        assert len(fixed) == 62 and fixed[:3] == [61, 103, 121]


def test_known_tables():
    assert make_timesteps("leading", 1000, 10) == list(range(900, -1, -100))
    assert make_timesteps("leading", 1000, 10, steps_offset=1) == list(range(901, 0, -100))
    assert make_timesteps("trailing", 1000, 10) == list(range(999, 0, -100))
    assert make_timesteps("linspace", 1000, 10) == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    assert make_timesteps("trailing", 1000, 7)[:2] == [999, 856]
    # DDIM App. D.2: floor(c i^2), c = 0.8 T / (N - 1)^2 = 800 / 81: 9.88 i^2 for i = 9 .. 0, by hand
    assert make_timesteps("quad", 1000, 10) == [800, 632, 483, 355, 246, 158, 88, 39, 9, 0]
    assert make_timesteps("quad", 1000, 1) == [0] and make_timesteps("linspace", 1000, 1) == [0]


def test_leading_with_offset_past_the_end_is_a_value_error():
    """diffusers: steps_offset=1 with N = T starts at t = T and fails with IndexError inside step()."""
    theirs = diffusers.DDPMScheduler(steps_offset=1)
    theirs.set_timesteps(1000)
    assert theirs.timesteps[0] == 1000
    with pytest.raises(IndexError):
        theirs.step(torch.zeros(1, 1, 2, 2), theirs.timesteps[0], torch.zeros(1, 1, 2, 2))
    for cls in (DDPMScheduler, DDIMScheduler):
        with pytest.raises(ValueError, match="steps_offset"):
            cls(steps_offset=1).set_timesteps(1000)
    assert make_timesteps("leading", 1000, 999, steps_offset=1)[0] == 999


@settings(max_examples=150, deadline=None)
@given(T=st.integers(1, 1500), data=st.data())
def test_every_table_is_well_formed(T, data):
    n = data.draw(st.integers(1, T))
    for spacing in ("leading", "linspace", "trailing", "quad"):
        table = make_timesteps(spacing, T, n)
        assert len(table) == n and all(b < a for a, b in zip(table, table[1:])), (spacing, T, n)
        assert 0 <= table[-1] and table[0] < T
    assert make_timesteps("trailing", T, n)[0] == T - 1


def quad_reference(T: int, n: int) -> list[int]:
    """DDIM App. D.2's quadratic selection, tau_i = floor(c i^2) with c such that tau_{n-1} = 0.8 T, built the way
    the paper's code does (ermongroup/ddim, runners/diffusion.py: the squares of n points evenly spaced on
    [0, sqrt(0.8 T)]), in 50-digit arithmetic. The 1e-30 nudge only lifts exact integers that the square root
    leaves a hair below: every true value is a rational with denominator 5 (n - 1)^2, so a non-integer is at least
    1 / (5 (n - 1)^2) below the next integer."""
    mp.mp.dps = 50
    top = mp.sqrt(mp.mpf(4) * T / 5)
    return [int(mp.floor((top * i / (n - 1)) ** 2 + mp.mpf(10) ** -30)) for i in range(n)]


def test_quad_reference_is_the_papers_code():
    """The paper code's own float construction gives the same lists wherever float rounding does not bite."""
    for T, n in ((1000, 10), (1000, 20), (1000, 50), (100, 7), (4000, 100)):
        code = [int(v) for v in np.linspace(0, np.sqrt(T * 0.8), n) ** 2]
        assert quad_reference(T, n) == code, (T, n)
    assert quad_reference(1000, 20) == [0, 2, 8, 19, 35, 55, 79, 108, 141, 179, 221, 268, 319, 374, 434, 498, 567,
                                        640, 718, 800]


@settings(max_examples=60, deadline=None)
@given(T=st.integers(2, 1500), data=st.data())
@example(T=1000, data=None)
def test_quad_is_the_quadratic_where_it_is_distinct(T, data):
    n = data.draw(st.integers(2, T)) if data is not None else 20
    table = make_timesteps("quad", T, n)[::-1]
    reference = quad_reference(T, n)
    if all(b > a for a, b in zip(reference, reference[1:])):
        assert table == reference
    else:  # c < 1 repeats timesteps: each entry is raised to one past its predecessor (documented extension)
        raised = []
        for t in reference:
            raised.append(max(t, raised[-1] + 1) if raised else t)
        assert table == raised


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
def test_custom_timesteps(cls):
    s = cls()
    s.set_timesteps(timesteps=[999, 500, 3])
    assert s.timesteps.tolist() == [999, 500, 3] and s.custom_timesteps and s.num_inference_steps == 3
    assert [int(s.previous_timestep(t)) for t in s.timesteps] == [500, 3, -1]
    s.set_timesteps(timesteps=torch.tensor([7, 2]))
    assert s.timesteps.tolist() == [7, 2]
    s.set_timesteps(5)
    assert not s.custom_timesteps and s.timesteps.tolist() == [800, 600, 400, 200, 0]


@pytest.mark.parametrize(
    "bad,error,match",
    [
        ([5, 5, 1], ValueError, "strictly descending"),
        ([1, 5], ValueError, "strictly descending"),
        ([1000, 5], ValueError, "in \\[0, num_train_timesteps=1000\\)"),
        ([5, -1], ValueError, "in \\[0, num_train_timesteps=1000\\)"),
        ([], ValueError, "empty"),
        ([5.0, 1.0], TypeError, "ints"),
        (torch.tensor([5.0, 1.0]), TypeError, "ints"),
        ("54", TypeError, "list of ints"),
    ],
)
def test_bad_custom_timesteps(bad, error, match):
    with pytest.raises(error, match=match):
        check_custom_timesteps(bad, 1000)
    with pytest.raises(error, match=match):
        DDIMScheduler().set_timesteps(timesteps=bad)


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
def test_bad_step_counts(cls):
    s = cls(num_train_timesteps=50)
    with pytest.raises(ValueError, match="num_inference_steps must be in \\[1, num_train_timesteps=50\\]"):
        s.set_timesteps(51)
    with pytest.raises(ValueError, match="num_inference_steps must be in"):
        s.set_timesteps(0)
    with pytest.raises(TypeError, match="num_inference_steps must be an int"):
        s.set_timesteps(10.0)
    with pytest.raises(ValueError, match="exactly one of"):
        s.set_timesteps()
    with pytest.raises(ValueError, match="exactly one of"):
        s.set_timesteps(10, timesteps=[5, 1])
    s.set_timesteps(50, device="cpu")
    assert s.timesteps.dtype == torch.int64 and s.timesteps.device.type == "cpu"
