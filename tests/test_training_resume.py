"""train.py as a subprocess: SIGKILL + resume is bit-exact, and a real 2-process (gloo) run works."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from fault_injection import free_port
from test_training import ROOT, assert_same_tensors, tiny_flags

from ddpm_hf import checkpointing

SCRIPT = os.path.join(ROOT, "training", "train.py")


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                PYTHONPATH=os.path.join(ROOT, "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _final_state(out):
    """Everything that must match: exported EMA and raw weights, the last checkpoint's model, EMA and optimizer."""
    last = checkpointing.resolve_checkpoint(str(out), "latest")
    state = {"unet": load_file(out / "unet" / "diffusion_pytorch_model.safetensors"),
             "unet_raw": load_file(out / "unet_raw" / "diffusion_pytorch_model.safetensors"),
             "model": load_file(os.path.join(last, "model.safetensors")),
             "ema": load_file(os.path.join(last, checkpointing.EMA_FILE))}
    optimizer = torch.load(os.path.join(last, "optimizer.bin"), weights_only=True)
    state["adam"] = {f"{i}.{k}": v for i, s in optimizer["state"].items() for k, v in s.items()}
    return os.path.basename(last), state


def test_sigkill_then_resume_latest_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    # Uneven accumulation (15 batches per epoch, groups of 2), an epoch boundary, random flips, EMA warmup:
    # every piece of state that a resume has to restore.
    common = dict(max_train_steps=12, gradient_accumulation_steps=2, checkpointing_steps=3, random_flip="true",
                  lr_warmup_steps=4, save_images_steps=100)
    subprocess.run([sys.executable, SCRIPT] + tiny_flags(tmp_path, out="straight", **common), env=_env(),
                   check=True, capture_output=True, timeout=300)

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, SCRIPT] + tiny_flags(tmp_path, out="killed", **common), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while checkpointing.resolve_checkpoint(str(killed), "latest") is None and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "unet").exists()

    resumed = subprocess.run([sys.executable, SCRIPT] + tiny_flags(tmp_path, out="killed", **common)
                             + ["--resume_from_checkpoint", "latest"], env=_env(), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resumed from" in resumed.stderr
    name_a, a = _final_state(tmp_path / "straight")
    name_b, b = _final_state(killed)
    assert name_a == name_b == "checkpoint-12"
    for key in a:
        assert_same_tensors(a[key], b[key])


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed (gloo)")
def test_two_processes_train_and_write_the_export_once(tmp_path):
    # accelerate 1.15: `accelerate launch --cpu --num_processes 2` silently runs one process; --multi_gpu gives two
    # gloo ranks on a GPU-less machine only with ACCELERATE_USE_CPU=1 (docs/training.md). The log proves it.
    command = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), SCRIPT]
    flags = tiny_flags(tmp_path, max_train_steps=3, checkpointing_steps=2, train_batch_size=64)
    result = subprocess.run(command + flags, env=dict(_env(), ACCELERATE_USE_CPU="1"), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "num_processes=2" in result.stderr
    assert "total batch 128" in result.stderr
    out = tmp_path / "out"
    assert result.stderr.count("Saved checkpoint") == 2  # checkpoint-2 and the final checkpoint-3, once each
    assert (out / "samples.png").exists() and (out / "unet_raw").exists()
    ckpt = out / "checkpoint-3"
    assert (ckpt / "generator_0.safetensors").exists() and (ckpt / "generator_1.safetensors").exists()
    assert (ckpt / "random_states_1.pkl").exists()


def test_ranks_that_each_think_they_are_alone_are_refused(tmp_path):
    # Without ACCELERATE_USE_CPU=1 accelerate 1.15 gives each rank DistributedType.NO: two independent runs
    # racing on one output folder. The script stops instead.
    env = _env()
    env.pop("ACCELERATE_USE_CPU", None)
    command = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), SCRIPT]
    result = subprocess.run(command + tiny_flags(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "set ACCELERATE_USE_CPU=1" in result.stderr
    assert not (tmp_path / "out" / "unet").exists()


