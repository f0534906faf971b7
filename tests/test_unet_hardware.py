"""``ddpm_hf.hardware.describe_hardware`` on fixed /proc/cpuinfo texts (the machines this project met) and here."""

from __future__ import annotations

import pytest
import torch

from ddpm_hf import hardware

ZEN5 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9B45
flags\t\t: fpu sse avx2 fma avx512f avx512bw avx512_vnni avx512_bf16 avx512vl
processor\t: 1
model name\t: ignored second CPU
flags\t\t: fpu
"""
ZEN3 = "model name\t: AMD EPYC 7B13\nflags\t\t: fpu sse avx avx2 fma\n"
SAPPHIRE_RAPIDS = ("model name\t: Intel(R) Xeon(R) Platinum 8480+\n"
                   "flags\t\t: avx2 fma avx512f avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8\n")
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\nCPU implementer\t: 0x41\n"


def describe(tmp_path, text: str, onednn_bf16: bool, monkeypatch) -> hardware.HardwareInfo:
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    monkeypatch.setattr(hardware, "_onednn_bf16", lambda: onednn_bf16)
    return hardware.describe_hardware(str(path))


@pytest.mark.parametrize("text, model, flags, native, amx", [
    (ZEN5, "AMD EPYC 9B45", ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16"), True, False),
    (ZEN3, "AMD EPYC 7B13", ("avx2", "fma"), False, False),
    (SAPPHIRE_RAPIDS, "Intel(R) Xeon(R) Platinum 8480+",
     ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8"), True, True),
    (GRAVITON3, None, ("asimd", "bf16", "sve"), True, False),
], ids=["zen5", "zen3", "sapphire-rapids", "graviton3"])
def test_flags_and_native_bf16(tmp_path, monkeypatch, text, model, flags, native, amx):
    info = describe(tmp_path, text, True, monkeypatch)
    assert info.cpu_flags == flags and info.cpu_bf16_native is native and info.cpu_amx is amx
    if model is not None:
        assert info.cpu_model == model
    assert ("native" in info.summary()) is native and ("emulated" in info.summary()) is not native


def test_bf16_instructions_without_onednn_kernels_are_not_native(tmp_path, monkeypatch):
    assert describe(tmp_path, ZEN5, False, monkeypatch).cpu_bf16_native is False


def test_unreadable_cpuinfo_still_describes(tmp_path):
    info = hardware.describe_hardware(str(tmp_path / "missing"))
    assert info.cpu_flags == () and info.cpu_model and info.logical_cpus >= 1
    assert "none of" in info.summary()


def test_this_machine():
    info = hardware.describe_hardware()
    assert info.torch_threads == torch.get_num_threads()
    assert info.cpu_bf16_native <= bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert len(info.gpus) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
