"""``ddpm_hf.validation``: the one validator library (schedulers, UNet config, training arguments)."""

import math

import numpy as np
import pytest

from ddpm_hf import UNet2DModel
from ddpm_hf import validation as v
from ddpm_hf.models.config_checks import ConfigTypeError, ConfigValueError, validate_config
from ddpm_hf.models.presets import UNET_PRESETS


@pytest.mark.parametrize("value, is_int, is_real, is_bool", [
    (3, True, True, False), (np.int64(3), True, True, False), (True, False, False, True),
    (np.bool_(False), False, False, True), (2.5, False, True, False), (np.float32(2.5), False, True, False),
    (math.inf, False, True, False), ("3", False, False, False), (None, False, False, False),
])
def test_predicates(value, is_int, is_real, is_bool):
    assert (v.is_int(value), v.is_real(value), v.is_bool(value)) == (is_int, is_real, is_bool)
    assert v.is_finite_real(value) == (is_real and math.isfinite(value))


def test_checks_raise_type_then_value_errors_naming_the_key():
    v.check_int("n", np.int32(4), 1)
    with pytest.raises(TypeError, match=r"^n must be an int >= 1, got True$"):
        v.check_int("n", True, 1)
    with pytest.raises(ValueError, match=r"^n must be an int >= 1, got 0$"):
        v.check_int("n", 0, 1)
    v.check_real("ratio", 1.0, 0.0, 1.0)
    with pytest.raises(ValueError, match=r"ratio must be a finite float in \(0.0, 1.0\], got 0.0"):
        v.check_real("ratio", 0.0, 0.0, 1.0)
    with pytest.raises(ValueError, match=r"x must be a finite float in \[0, inf\), got nan"):
        v.check_real("x", float("nan"), 0, math.inf, low_open=False, high_open=True)
    with pytest.raises(TypeError, match=r"x must be a float in \[0, 1\), got '1'"):
        v.check_real("x", "1", 0, 1, low_open=False, high_open=True)
    v.check_bool("flag", np.bool_(True))
    with pytest.raises(TypeError, match="flag must be True or False, got 1"):
        v.check_bool("flag", 1)
    with pytest.raises(ValueError, match=r"mode must be one of \('a', 'b'\), got 'c'"):
        v.check_choice("mode", "c", ("a", "b"))
    with pytest.raises(ValueError, match="mode must be one of"):
        v.check_choice("mode", ["a"], ("a", "b"))
    assert v.interval_text(0, 1) == "(0, 1]" and v.interval_text(0, 1, False, True) == "[0, 1)"


def test_unet_config_checks_use_the_same_predicates():
    """numpy ints count as ints and bools never do, in the UNet config as in the schedulers."""
    full = dict(UNet2DModel(**UNET_PRESETS["tiny"]).config)
    validate_config({**full, "layers_per_block": np.int64(1)})
    with pytest.raises(ConfigTypeError, match=r"layers_per_block=True must be an int >= 1"):
        validate_config({**full, "layers_per_block": True})
    with pytest.raises(ConfigValueError, match="dropout=1.5 must be a finite number and >= 0.0 and < 1.0"):
        validate_config({**full, "dropout": 1.5})
