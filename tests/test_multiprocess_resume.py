"""Two processes (gloo on CPU), SIGKILLed mid-run, then `--resume_from_checkpoint latest`: the end is bit-identical
to an uninterrupted two-process run, for map-style and streaming data, with gradient accumulation and EMA and
without either.

Each rank is a process forked by a fault-injection helper (tests/fault_injection.py) with the environment that
torchrun and `accelerate launch --multi_gpu` give a worker (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
MASTER_ADDR/PORT, and ACCELERATE_USE_CPU=1 so that accelerate picks gloo): the same accelerate set-up as a launched
run without ~6 s of imports per rank and run (tests/test_multinode.py runs the real launcher). The kill comes from
a monkeypatched library function: both ranks at the same point (the whole job lost), or one rank only (a machine
lost: its peer must stop on the broken connection, not hang, and the checkpoint being written must not count).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch
from fault_injection import Fault, RunResult, TrainingRunner, free_port, tiny_train_args
from safetensors.torch import load_file

from ddpm_hf.checkpointing import resolve_checkpoint

# flaky: in 2 of 6 suite runs on 2026-12-02 one rank of a finished two-process run hung (rank 1, after the run's
# last barrier: in accelerate's end_training / destroy_process_group once rank 0 had exited; cause not yet found).
# The runner's timeout fails that try and one rerun follows; a rank that hangs twice still fails the test.
pytestmark = [pytest.mark.slow, pytest.mark.flaky(reruns=1),
              pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed (gloo)")]

STEPS = 6  # tiny_train_args: checkpoints at 2, 4, 6, an export at 4 and at the end
WORLD = 2


def rank_env(rank: int, port: int) -> dict[str, str]:
    """What torchrun / accelerate launch set for a worker on one machine (accelerate reads no other variable here)."""
    return {"ACCELERATE_USE_CPU": "1", "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
            "LOCAL_WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


@pytest.fixture(scope="module")
def ranks(training_runner, tmp_path_factory):
    """One helper per rank: rank 0 reuses the session's, rank 1 gets its own (both fork a fresh child per run)."""
    with TrainingRunner(tmp_path_factory.mktemp("rank1_runs")) as second:
        yield [training_runner, second]


def run_two(ranks, argv: list[str], faults: dict[int, list[Fault]] | None = None,
            timeouts: tuple[float, float] = (300, 300)) -> list[RunResult]:
    """Run ``train.py argv`` as ranks 0 and 1 of one gloo group, at the same time; each rank's faults apply to it,
    and each is killed once its timeout passes."""
    port, results = free_port(), [None] * WORLD

    def one(rank: int) -> None:
        results[rank] = ranks[rank].run(argv, faults=(faults or {}).get(rank, []), env=rank_env(rank, port),
                                        timeout=timeouts[rank])

    threads = [threading.Thread(target=one, args=(rank,)) for rank in range(WORLD)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def final_state(out: Path) -> dict[str, torch.Tensor]:
    """Every tensor the run leaves at its end: each export folder's weights, and every weight, EMA, optimizer and
    RNG tensor of the last checkpoint (both ranks' generators), with the ranks' data positions as tensors."""
    last = Path(resolve_checkpoint(str(out), "latest"))
    assert last.name == f"checkpoint-{STEPS}"
    state = {}
    for file in sorted(out.glob("*/diffusion_pytorch_model.safetensors")) + sorted(last.glob("*.safetensors")):
        state.update({f"{file.parent.name}/{file.name}/{k}": v for k, v in load_file(file).items()})
    optimizer = torch.load(last / "optimizer.bin", weights_only=True)
    state.update({f"adam/{i}.{k}": v for i, s in optimizer["state"].items() for k, v in s.items()
                  if isinstance(v, torch.Tensor)})
    for file in sorted(last.glob("data_state_*.json")):
        state[file.name] = torch.frombuffer(bytearray(file.read_bytes()), dtype=torch.uint8)
    return state


def assert_two_processes(results: list[RunResult]) -> None:
    """Both ranks succeeded, and rank 0 (the one that logs) trained as one of two processes."""
    for rank, result in enumerate(results):
        assert result.returncode == 0, f"rank {rank}:\n{result.stderr[-3000:]}"
    log = results[0].stderr
    assert "num_processes=2" in log and "'num_processes': 2" in log, log[-2000:]


def kill_resume_compare(ranks, tmp_path: Path, extra: list[str], faults: dict[int, list[Fault]],
                        leftover: str | None) -> None:
    straight = tmp_path / "straight" / "out"
    reference = run_two(ranks, tiny_train_args(straight, STEPS, *extra))
    assert_two_processes(reference)

    out = tmp_path / "killed" / "out"
    killed = run_two(ranks, tiny_train_args(out, STEPS, *extra), faults)
    for rank, result in enumerate(killed):
        if rank in faults:
            assert result.killed, f"rank {rank}'s fault never fired (exit {result.returncode}):\n{result.stderr[-3000:]}"
        else:  # its peer vanished: it stops on the broken connection
            assert result.returncode != 0, f"rank {rank} went on alone:\n{result.stderr[-3000:]}"
    assert os.path.basename(resolve_checkpoint(str(out), "latest")) == "checkpoint-2"
    if leftover is not None:
        assert leftover in os.listdir(out)  # the interrupted write really happened, and `latest` skipped it
    assert not (out / "unet").exists()

    resumed = run_two(ranks, tiny_train_args(out, STEPS, "--resume_from_checkpoint", "latest", *extra))
    assert_two_processes(resumed)
    assert f"Resumed from {out / 'checkpoint-2'}" in resumed[0].stderr

    got, expected = final_state(out), final_state(straight)
    assert got.keys() == expected.keys()
    if "--streaming" in extra:  # each rank's stream position is part of the checkpoint
        assert {f"data_state_{rank}.json" for rank in range(WORLD)} <= got.keys()
    different = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not different, f"{len(different)} of {len(expected)} tensors differ, e.g. {different[:3]}"


MID_STEP_BOTH = {rank: [Fault("torch.optim:AdamW.step", "kill_after", at_call=3)] for rank in range(WORLD)}
MID_CHECKPOINT_RANK0 = {0: [Fault("accelerate.checkpointing:save", "kill", at_call=4)]}
CASES = [
    # accumulation 2 + EMA (the default): the whole job SIGKILLed after step 3's optimizer update, before its EMA
    # update, LR step and counter.
    pytest.param(["--gradient_accumulation_steps", "2"], MID_STEP_BOTH, None, id="accum2-ema-both-killed-mid-step"),
    # no accumulation, no EMA: rank 0 SIGKILLed while writing checkpoint-4; rank 1 waits for it and fails.
    pytest.param(["--no_use_ema"], MID_CHECKPOINT_RANK0, ".checkpoint-4.partial",
                 id="plain-rank0-killed-mid-checkpoint"),
]


@pytest.mark.parametrize("extra, faults, leftover", CASES)
def test_two_process_map_style_run_killed_and_resumed_is_bit_identical(ranks, tmp_path, extra, faults, leftover):
    kill_resume_compare(ranks, tmp_path, list(extra), faults, leftover)


@pytest.fixture(scope="module")
def parquet_shards(tmp_path_factory) -> Path:
    """Two parquet shards of 20 small gray PNGs each (one shard per rank): 2.5 optimizer steps per epoch."""
    import datasets
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    for shard in range(2):
        images = [Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), mode="L") for _ in range(20)]
        table = datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()}))
        table.to_parquet(str(folder / f"train-{shard:05d}.parquet"))
    return folder


@pytest.mark.parametrize("extra, faults, leftover", CASES)
def test_two_process_streaming_run_killed_and_resumed_is_bit_identical(ranks, tmp_path, parquet_shards, extra,
                                                                       faults, leftover):
    streaming = ["--streaming", "true", "--dataset_name", str(parquet_shards), "--shuffle_buffer_size", "8"]
    kill_resume_compare(ranks, tmp_path, streaming + list(extra), faults, leftover)


def test_a_rank_that_stops_answering_fails_its_peer_after_the_ddp_timeout(ranks, tmp_path):
    # Rank 1 hangs before its second optimizer step; rank 0 then waits in a collective. With torch's default
    # (1800 s) it would still be waiting when its runner kills it at 120 s; --ddp_timeout 5 ends it first.
    hang = {1: [Fault("torch.optim:AdamW.step", "hang", at_call=2)]}
    out = tmp_path / "out"
    first, second = run_two(ranks, tiny_train_args(out, STEPS, "--ddp_timeout", "5"), hang, timeouts=(120, 20))
    assert second.timed_out
    assert first.returncode != 0 and not first.timed_out, first.stderr[-3000:]
    # (after the progress bar, on its line)
    [line] = [line.split("error: ", 1)[1] for line in first.stderr.splitlines() if "error: " in line]
    assert line.startswith("another process of this run stopped answering or died (") and "Timed out" in line
    assert "--resume_from_checkpoint latest" in line and "Traceback" not in first.stderr
    assert resolve_checkpoint(str(out), "latest") is None and not (out / "unet").exists()  # it stopped at step 2
