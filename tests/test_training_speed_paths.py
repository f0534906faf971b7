"""Training speed paths: --mixed_precision bf16 on a CPU warns exactly where bf16 would be emulated."""

import dataclasses

import pytest
from test_training import tiny_flags, train_state_reset

import ddpm_hf.hardware
from ddpm_hf.training import components, parse_args, setup_accelerator


def _warnings_of_setup(tmp_path, monkeypatch, native: bool, precision: str) -> list[str]:
    """The warnings setup_accelerator logs for ``precision`` on a CPU whose bf16 is (not) native."""
    real = ddpm_hf.hardware.describe_hardware()
    monkeypatch.setattr(ddpm_hf.hardware, "describe_hardware",
                        lambda: dataclasses.replace(real, cpu_bf16_native=native))
    monkeypatch.setattr(components, "_on_cpu_only", lambda: True)
    said: list[str] = []
    monkeypatch.setattr(components.logger, "warning", lambda msg, *a: said.append(msg % a if a else msg))
    _, _, args = parse_args(tiny_flags(tmp_path, mixed_precision=precision))
    train_state_reset()
    try:
        accelerator = setup_accelerator(args)
        assert accelerator.mixed_precision == precision  # bf16 is kept: autocast with fp32 master weights
    finally:
        train_state_reset()
    return said


@pytest.mark.parametrize("native,precision,warned", [(False, "bf16", True), (True, "bf16", False),
                                                     (False, "no", False)])
def test_bf16_warning_only_where_emulated(tmp_path, monkeypatch, native, precision, warned):
    said = _warnings_of_setup(tmp_path, monkeypatch, native, precision)
    assert any("no native bf16" in line for line in said) == warned
