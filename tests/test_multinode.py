"""Multi-node through accelerate: two `accelerate launch --num_machines 2 --machine_rank {0,1}` processes on this
machine (one process per "machine", gloo, rendezvous at 127.0.0.1) form one run, and it produces the same
weights, bit for bit, as one `--num_machines 1 --num_processes 2` run with the same global batch and seed.

Both "machines" write to one output folder, as nodes of a cluster with a shared filesystem do: only the global
main process may write the export and the checkpoint folder, every rank its own RNG files.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from fault_injection import ROOT, TRAIN_SCRIPT, free_port, tiny_train_args
from safetensors.torch import load_file

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed (gloo)")]

STEPS = 4
# --multi_gpu with ACCELERATE_USE_CPU=1 is how accelerate 1.15 starts gloo ranks on a machine without a GPU
# (`--cpu --num_processes 2` starts one process); on GPU nodes the same command without the variable uses NCCL.
LAUNCH = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--mixed_precision", "no",
          "--dynamo_backend", "no"]
WEIGHT_FILES = ("unet/diffusion_pytorch_model.safetensors", "unet_raw/diffusion_pytorch_model.safetensors",
                f"checkpoint-{STEPS}/model.safetensors", f"checkpoint-{STEPS}/ema.safetensors",
                f"checkpoint-{STEPS}/generator_0.safetensors", f"checkpoint-{STEPS}/generator_1.safetensors")


def launch_env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", ACCELERATE_USE_CPU="1",
                PYTHONPATH=os.path.join(str(ROOT), "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))


def start(topology: list[str], out: Path, log: Path) -> subprocess.Popen:
    command = LAUNCH + topology + [TRAIN_SCRIPT] + tiny_train_args(out, STEPS)
    return subprocess.Popen(command, env=launch_env(), stdout=subprocess.DEVNULL, stderr=open(log, "wb"))


def finish(proc: subprocess.Popen, log: Path) -> str:
    code = proc.wait(timeout=300)
    text = log.read_text(errors="replace")
    assert code == 0, text[-3000:]
    return text


def weights(out: Path) -> dict[str, torch.Tensor]:
    return {f"{rel}/{k}": v for rel in WEIGHT_FILES for k, v in load_file(out / rel).items()}


def test_two_machines_train_the_same_weights_as_one_machine_with_two_processes(tmp_path):
    port = free_port()
    multi = tmp_path / "two_machines" / "out"
    machines = [start(["--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                       "--main_process_port", str(port)], multi, tmp_path / f"machine{rank}.log") for rank in (0, 1)]
    logs = [finish(proc, tmp_path / f"machine{rank}.log") for rank, proc in enumerate(machines)]
    single = tmp_path / "one_machine" / "out"
    one = finish(start(["--num_machines", "1", "--main_process_port", str(free_port())], single,
                       tmp_path / "one.log"), tmp_path / "one.log")

    for log in (logs[0], one):  # one run of two processes, global batch 2 x 4, in both topologies
        assert "num_processes=2" in log and "total batch 8" in log and "'num_processes': 2" in log, log[-2000:]
    assert "Saved checkpoint" not in logs[1] and "Export to" not in logs[1]  # machine 1 writes only its RNG files
    assert logs[0].count(f"Saved checkpoint {multi / f'checkpoint-{STEPS}'}") == 1
    assert (multi / f"checkpoint-{STEPS}" / "random_states_1.pkl").is_file()

    got, expected = weights(multi), weights(single)
    assert got.keys() == expected.keys()
    different = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not different, f"{len(different)} of {len(expected)} tensors differ, e.g. {different[:3]}"
