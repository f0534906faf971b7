"""The accelerate config examples in training/accelerate_configs/, and what FSDP does on a CPU.

accelerate 1.15 enables FSDP only for GPU-like distributed types (CUDA, XPU, NPU, ...): launched with
ACCELERATE_USE_CPU=1, an FSDP config gives plain data-parallel gloo ranks (DistributedType.MULTI_CPU), the model
unsharded. The launch test pins that, so that a release that shards on CPUs shows up here (and in
docs/training.md, "Several processes and machines"). DeepSpeed is not installed: its example is only parsed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from fault_injection import launch_probe

from ddpm_hf.models import blocks

CONFIGS = Path(__file__).resolve().parent.parent / "training" / "accelerate_configs"
REPORT = ('f"rank={a.process_index} type={a.distributed_type.value} n={a.num_processes} "'
          'f"fsdp_env={os.environ.get(\'ACCELERATE_USE_FSDP\')} '
          'fsdp_plugin={getattr(a.state, \'fsdp_plugin\', None) is not None}"')


@pytest.mark.parametrize("name, kind, machines", [("ddp", "MULTI_GPU", 1), ("multi_node", "MULTI_GPU", 2),
                                                  ("fsdp", "FSDP", 1), ("deepspeed_zero2", "DEEPSPEED", 1)])
def test_each_example_config_loads_with_accelerate(name, kind, machines):
    config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    assert config.distributed_type.value == kind and config.num_machines == machines
    assert config.num_processes % machines == 0  # a total over the machines


def test_the_fsdp_example_wraps_classes_that_exist():
    wrap = load_config_from_file(str(CONFIGS / "fsdp.yaml")).fsdp_config["fsdp_transformer_layer_cls_to_wrap"]
    for name in wrap.split(","):
        assert isinstance(getattr(blocks, name.strip(), None), type), name


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed (gloo)")
def test_the_fsdp_config_on_a_cpu_runs_as_data_parallel_gloo_ranks(tmp_path):
    lines = launch_probe(tmp_path, CONFIGS / "fsdp.yaml", REPORT)
    # the launcher did ask for FSDP (the variable is set), accelerate chose gloo data parallelism without a plugin
    assert lines == [f"rank={r} type=MULTI_CPU n=2 fsdp_env=true fsdp_plugin=False" for r in (0, 1)]
