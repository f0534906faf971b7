"""``--torch_compile``: accelerate compiles the network (Inductor); exports and checkpoints keep plain parameter
names, the EMA averages the real parameters, a compiled resume is bit-exact, and the loss matches eager rounding.

Compiling takes tens of seconds on a small CPU, so one eager and two compiled training subprocesses are shared
through module-scoped fixtures (the second compile hits Inductor's on-disk cache).
"""

import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from test_training import assert_same_tensors, tiny_flags
from test_training_resume import SCRIPT, _env, _final_state

from ddpm_hf.training.args import TORCH_COMPILE_MODES, TrainingArguments, parse_args
from ddpm_hf.training.components import compile_plugin

# Tiny and short: 4 optimizer steps of 8 images, a checkpoint after each (the EMA oracle replays them).
COMMON = dict(train_batch_size=8, max_train_steps=4, checkpointing_steps=1, logging_steps=1, save_images_steps=100)
COMPILE = ["--torch_compile", "true"]


def _train(tmp_path, out, extra=(), **overrides):
    result = subprocess.run([sys.executable, SCRIPT] + tiny_flags(tmp_path, out=out, **dict(COMMON, **overrides))
                            + list(extra), env=_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An eager and a compiled run of the same recipe: their folders and logs."""
    tmp = tmp_path_factory.mktemp("compile")
    eager_log = _train(tmp, "eager")
    compiled_log = _train(tmp, "compiled", COMPILE)
    return tmp, eager_log, compiled_log


def _resume_copy(tmp, source, out, step, extra):
    """Continue ``source``'s checkpoint-``step`` in a fresh folder ``out``: what an interruption after that step
    leaves behind (tests/test_training_resume.py kills real runs; the files are the same)."""
    os.makedirs(tmp / out)
    shutil.copytree(tmp / source / f"checkpoint-{step}", tmp / out / f"checkpoint-{step}")
    return _train(tmp, out, list(extra) + ["--resume_from_checkpoint", "latest"])


def _history(folder):
    lines = (folder / "loss_history.csv").read_text().split()[1:]
    return {int(step): float(loss) for step, loss in (line.split(",") for line in lines)}


@pytest.mark.slow
def test_compiled_run_logs_its_compile_cost_and_keeps_plain_names(runs):
    tmp, eager_log, compiled_log = runs
    assert "torch.compile (backend inductor, mode default)" in compiled_log and "Time to first step" in compiled_log
    assert "torch.compile" not in eager_log
    eager_keys = set(load_file(tmp / "eager" / "checkpoint-4" / "model.safetensors"))
    for step in range(1, 5):
        keys = set(load_file(tmp / "compiled" / f"checkpoint-{step}" / "model.safetensors"))
        assert keys == eager_keys and not any("_orig_mod" in key for key in keys)
    for folder in ("unet", "unet_raw"):
        keys = set(load_file(tmp / "compiled" / folder / "diffusion_pytorch_model.safetensors"))
        assert keys == eager_keys


@pytest.mark.slow
def test_compiled_export_loads_in_stock_diffusers_with_the_ema_of_the_real_parameters(runs):
    from diffusers import UNet2DModel
    from diffusers.training_utils import EMAModel

    tmp = runs[0]
    unet, info = UNet2DModel.from_pretrained(tmp / "compiled" / "unet", output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    # Oracle: diffusers' EMAModel (the same warmup and clamps as the defaults) stepped with the checkpointed raw
    # weights after each optimizer step. A stale EMA (one averaging copies, not the trained parameters) differs.
    steps = [load_file(tmp / "compiled" / f"checkpoint-{k}" / "model.safetensors") for k in range(1, 5)]
    model = UNet2DModel.from_config(unet.config)
    model.load_state_dict(steps[0])
    ema = EMAModel(model.parameters(), decay=0.999, min_decay=0.0, use_ema_warmup=True, inv_gamma=1.0, power=2 / 3)
    for weights in steps:
        model.load_state_dict(weights)
        ema.step(model.parameters())
    ema.copy_to(model.parameters())
    expected, exported = model.state_dict(), unet.state_dict()
    assert not torch.equal(exported["conv_in.weight"], steps[-1]["conv_in.weight"])  # it is an average
    for name in expected:
        torch.testing.assert_close(exported[name], expected[name], rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_compiled_loss_matches_eager_up_to_rounding(runs):
    tmp = runs[0]
    eager, compiled = _history(tmp / "eager"), _history(tmp / "compiled")
    assert eager.keys() == compiled.keys() == {1, 2, 3, 4}
    # Step 1: the same initial weights, batch, noise and timesteps. Inductor fuses and reorders fp32 arithmetic,
    # whose rounding (2**-24 relative per operation) over a few hundred operations and reductions stays far below
    # 1e-4; a wrong graph (e.g. a dropped residual) moves the loss by tens of per cent.
    assert compiled[1] == pytest.approx(eager[1], rel=1e-4)
    for step in (2, 3, 4):  # diverging only by that rounding, through 3 updates
        assert compiled[step] == pytest.approx(eager[step], rel=1e-2)


@pytest.mark.slow
def test_compiled_resume_is_bit_identical_and_an_eager_checkpoint_resumes_compiled(runs):
    tmp, _, _ = runs
    log = _resume_copy(tmp, "compiled", "compiled_resumed", 2, COMPILE)
    assert "Resumed from" in log and "execution changed" not in log
    name_a, a = _final_state(tmp / "compiled")
    name_b, b = _final_state(tmp / "compiled_resumed")
    assert name_a == name_b == "checkpoint-4"
    for key in a:
        assert_same_tensors(a[key], b[key])
    # Compiling is no part of the run's identity: an eager run continues compiled, saying its rounding differs.
    log = _resume_copy(tmp, "eager", "eager_then_compiled", 2, COMPILE)
    assert "Resumed from" in log and "The run's execution changed" in log
    assert "dynamo_backend: 'no' -> 'inductor'" in log
    continued, eager = _history(tmp / "eager_then_compiled"), _history(tmp / "eager")
    assert continued.keys() == {3, 4}
    for step in continued:
        assert continued[step] == pytest.approx(eager[step], rel=1e-2)


def test_compile_modes_are_torchs_and_a_bad_one_is_refused_naming_the_flag():
    from torch import _inductor

    assert set(TORCH_COMPILE_MODES) <= set(_inductor.list_mode_options())
    with pytest.raises(ValueError, match="--torch_compile_mode"):
        parse_args(["--torch_compile", "true", "--torch_compile_mode", "fastest"])


def test_no_cpp_compiler_is_refused_naming_the_flag(monkeypatch):
    from torch._inductor import config

    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    # torch's own patch, not monkeypatch: pytest >= 9.2 undoes a setattr on this config proxy by deleting the
    # attribute, which hides cpp.cxx from every later Inductor compile in the process.
    with config.patch({"cpp.cxx": ("no-such-c++-compiler-ddpm-hf",)}), \
            pytest.raises(ValueError, match="--torch_compile needs a C\\+\\+ compiler"):
        compile_plugin(TrainingArguments(torch_compile=True))
    assert config.cpp.cxx != ("no-such-c++-compiler-ddpm-hf",)
    assert compile_plugin(TrainingArguments()) is None  # accelerate's own config decides
