"""SIGINT/SIGTERM end a run with a checkpoint that resumes bit-exactly; --checkpointing_minutes saves by the clock.

The interrupted runs are real `training/train.py` processes sent real signals (issue 11).
"""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from fault_injection import free_port
from test_training import assert_same_tensors, tiny_flags
from test_training_resume import SCRIPT, _env, _final_state

from ddpm_hf.checkpointing import list_checkpoints
from ddpm_hf.training.interrupts import CheckpointTimer, StopRequest, step_decisions

COMMON = dict(max_train_steps=40, gradient_accumulation_steps=2, train_batch_size=16, checkpointing_steps=1000,
              lr_warmup_steps=4, random_flip="true", logging_steps=1)


class Watched:
    """A training process whose stderr is collected by a thread, so a test can wait for a line."""

    def __init__(self, command, env):
        self.proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        self.lines = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True)
        self._reader.start()

    def wait_for(self, text, timeout=240):
        deadline = time.time() + timeout
        while not any(text in line for line in self.lines):
            assert self.proc.poll() is None, f"exited ({self.proc.returncode}) before {text!r}:\n{self.stderr[-3000:]}"
            assert time.time() < deadline, f"no {text!r} in time"
            time.sleep(0.01)

    def finish(self, timeout=240):
        self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return self.proc.returncode

    @property
    def stderr(self):
        return "".join(self.lines)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run."""
    tmp = tmp_path_factory.mktemp("straight")
    subprocess.run([sys.executable, SCRIPT] + tiny_flags(tmp, **COMMON), env=_env(), check=True, capture_output=True,
                   timeout=300)
    return _final_state(tmp / "out")


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_a_checkpoint_and_resume_is_bit_identical(tmp_path, straight, signum, code):
    out = tmp_path / "out"
    run = Watched([sys.executable, SCRIPT] + tiny_flags(tmp_path, **COMMON), _env())
    run.wait_for("Time to first step")
    run.proc.send_signal(signum)
    assert run.finish() == code, run.stderr[-3000:]
    stderr = run.stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    steps = [step for step, _ in list_checkpoints(str(out))]
    assert len(steps) == 1 and 1 <= steps[0] < COMMON["max_train_steps"], (steps, stderr[-3000:])
    last_line = stderr.strip().splitlines()[-1]
    assert last_line == (f"error: interrupted by {signal.Signals(signum).name} after optimizer step {steps[0]} of 40: "
                         f"saved {out / f'checkpoint-{steps[0]}'}. To continue, rerun with the same flags plus "
                         "--resume_from_checkpoint latest"), last_line
    assert not (out / "unet").exists()  # stopped: no export was started

    resumed = subprocess.run([sys.executable, SCRIPT] + tiny_flags(tmp_path, **COMMON)
                             + ["--resume_from_checkpoint", "latest"], env=_env(), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resumed from {out / f'checkpoint-{steps[0]}'} at step {steps[0]}" in resumed.stderr
    name, state = _final_state(out)
    assert name == "checkpoint-40"
    for key in straight[1]:
        assert_same_tensors(state[key], straight[1][key])


def test_ctrl_c_before_the_loop_is_a_one_line_abort(tmp_path):
    """While the data and network are being built (no handler yet): no traceback, status 130, nothing saved."""
    run = Watched([sys.executable, SCRIPT] + tiny_flags(tmp_path, **COMMON), _env())
    run.wait_for("num_processes=")  # logged before the data are loaded (seconds before the first step)
    run.proc.send_signal(signal.SIGINT)
    assert run.finish() == 130, run.stderr[-3000:]
    assert "Traceback" not in run.stderr and "Time to first step" not in run.stderr, run.stderr[-3000:]
    assert run.stderr.strip().splitlines()[-1].startswith("error: aborted by Ctrl-C; nothing was saved since the "
                                                          "last checkpoint")
    assert list_checkpoints(str(tmp_path / "out")) == []


def test_a_second_ctrl_c_aborts_at_once_and_a_forwarded_copy_does_not():
    """The handler the loop installs: a second SIGINT a second later raises; a copy within the second (a
    launcher forwarding the same Ctrl-C) and a later SIGTERM are ignored; old handlers come back on exit."""
    now = [100.0]
    before = signal.getsignal(signal.SIGINT)
    with StopRequest(clock=lambda: now[0]) as stop:
        assert signal.getsignal(signal.SIGINT) == stop.handle
        assert not stop.requested
        signal.raise_signal(signal.SIGINT)
        assert stop.requested and stop.signum == signal.SIGINT
        now[0] += 0.2
        signal.raise_signal(signal.SIGINT)  # the forwarded copy
        signal.raise_signal(signal.SIGTERM)
        now[0] += 1.0
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) == before


def test_checkpoint_timer_counts_from_the_last_save():
    now = [0.0]
    timer = CheckpointTimer(2.0, clock=lambda: now[0])
    now[0] = 119.0
    assert not timer.due()
    now[0] = 120.0
    assert timer.due()
    timer.reset()
    now[0] = 239.0
    assert not timer.due()
    assert not CheckpointTimer(None, clock=lambda: 1e9).due()


class TwoRanks:
    """An accelerator stand-in for rank 0 of two: ``reduce`` adds the other rank's flags."""

    num_processes = 2

    def __init__(self, peer):
        self.peer = torch.tensor(peer)

    def reduce(self, tensor, op):
        assert op == "sum"
        return tensor + self.peer


@pytest.mark.parametrize("peer, mine, expected", [
    ([0.0, 1.0, 0.0], (False, False), (True, True, False)),   # the other rank got the signal: both stop
    ([0.0, 0.0, 0.0], (False, True), (True, False, True)),    # the main process's clock says save: both save
    ([1.0, 0.0, 0.0], (True, False), (False, True, False)),   # the other rank's loss is NaN: nobody steps
])
def test_every_rank_decides_the_same_from_one_reduction(peer, mine, expected):
    assert step_decisions(TwoRanks(peer), torch.tensor(0.5), *mine) == expected


def test_checkpointing_minutes_saves_by_the_clock(tmp_path):
    """A due time far below one step's duration: a checkpoint after every step, none from --checkpointing_steps."""
    flags = tiny_flags(tmp_path, max_train_steps=5, checkpointing_steps=1000, checkpointing_minutes=1e-9)
    result = subprocess.run([sys.executable, SCRIPT] + flags, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [step for step, _ in list_checkpoints(str(tmp_path / "out"))] == [1, 2, 3, 4, 5]


def test_checkpointing_minutes_must_be_positive(tmp_path):
    result = subprocess.run([sys.executable, SCRIPT] + tiny_flags(tmp_path, checkpointing_minutes=0), env=_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("ValueError: --checkpointing_minutes must be")
    assert not (tmp_path / "out").exists()


TWO_PROCESSES = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                 "--mixed_precision", "no", "--dynamo_backend", "no"]
TWO_PROCESS_FLAGS = dict(COMMON, max_train_steps=24)


def _two_process_command(tmp_path, out, *extra):
    return TWO_PROCESSES + ["--main_process_port", str(free_port()), SCRIPT] \
        + tiny_flags(tmp_path, out=out, **TWO_PROCESS_FLAGS) + list(extra)


def _two_process_env():
    return dict(_env(), ACCELERATE_USE_CPU="1")


@pytest.fixture(scope="module")
def straight_two_processes(tmp_path_factory):
    """The uninterrupted 2-process run, shared by both ways of stopping one."""
    tmp = tmp_path_factory.mktemp("straight2")
    result = subprocess.run(_two_process_command(tmp, "straight"), env=_two_process_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return _final_state(tmp / "straight")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed (gloo)")
@pytest.mark.parametrize("how", ["sigterm-to-launcher", "ctrl-c-to-the-group"])
def test_two_processes_stop_together_and_resume_bit_identically(tmp_path, how, straight_two_processes):
    """SIGTERM to `accelerate launch` (as a scheduler sends it), or Ctrl-C (SIGINT to the terminal's whole
    process group, which torch elastic then forwards to the workers a second time): both ranks stop after the
    same step with a checkpoint holding both ranks' RNG files (the forwarded copy does not abort), and the
    resumed 2-process run equals the uninterrupted one."""
    env = _two_process_env()
    run = Watched(_two_process_command(tmp_path, "stopped"), env)
    run.wait_for("Time to first step")
    if how == "sigterm-to-launcher":
        run.proc.send_signal(signal.SIGTERM)
    else:
        os.killpg(run.proc.pid, signal.SIGINT)  # the launcher leads its own session (start_new_session)
    name = "SIGTERM" if how == "sigterm-to-launcher" else "SIGINT"
    assert run.finish() != 0
    out = tmp_path / "stopped"
    checkpoints = list_checkpoints(str(out))
    assert len(checkpoints) == 1 and checkpoints[0][0] < 24, run.stderr[-3000:]
    assert run.stderr.count(f"error: interrupted by {name}") == 1, run.stderr[-3000:]  # reported once
    assert "aborted by Ctrl-C" not in run.stderr
    for rank in (0, 1):
        assert os.path.isfile(os.path.join(checkpoints[0][1], f"random_states_{rank}.pkl"))
    resumed = subprocess.run(_two_process_command(tmp_path, "stopped", "--resume_from_checkpoint", "latest"),
                             env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    name_a, a = straight_two_processes
    name_b, b = _final_state(out)
    assert name_a == name_b == "checkpoint-24"
    for key in a:
        assert_same_tensors(a[key], b[key])
