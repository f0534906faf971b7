"""Checkpoint saving under disk-full / permission errors and rotation, NaN/inf losses, and unusable checkpoints.

Faults are injected into library functions of a separate training process (tests/fault_injection.py).
"""

import json
import os
import re
import shutil

import pytest
from fault_injection import Fault, assert_same_state, final_state, tiny_train_args
from safetensors.torch import load_file

from ddpm_hf.checkpointing import is_complete, list_checkpoints, resolve_checkpoint


@pytest.fixture(scope="module")
def reference(training_runner, tmp_path_factory):
    """One uninterrupted run: its final state, and its output folder to copy checkpoints from."""
    out = tmp_path_factory.mktemp("reference") / "out"
    result = training_runner.run(tiny_train_args(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return final_state(out), out


def error_line(stderr: str) -> str:
    """The last exception line (``SomeError: ...``) or ``error: ...`` line on stderr: what the user is told."""
    lines = [line for line in stderr.splitlines() if re.match(r"^([\w.]+(Error|Exception)|error): ", line)]
    assert lines, f"no error message on stderr:\n{stderr[-3000:]}"
    return lines[-1]


def checkpoint_names(out):
    return [os.path.basename(path) for _, path in list_checkpoints(str(out))]


@pytest.mark.parametrize(
    "fault, message",
    [
        # accelerate writing checkpoint-4's model weights hits a full disk
        (Fault("accelerate.checkpointing:save", "raise_enospc", at_call=3), "No space left on device"),
        # our EMA/RNG hook files of checkpoint-4 hit a permission error (as root, a read-only folder does not)
        (Fault("ddpm_hf.checkpointing:save_file", "raise_eacces", at_call=3), "Permission denied"),
    ],
    ids=["disk-full", "permission-denied"],
)
def test_failed_save_names_the_path_and_keeps_the_last_checkpoint(training_runner, reference, tmp_path, fault,
                                                                   message):
    """With --checkpoints_total_limit 1 the failing save of checkpoint-4 must not cost checkpoint-2."""
    out = tmp_path / "out"
    limit = ("--checkpoints_total_limit", "1")
    failed = training_runner.run(tiny_train_args(out, 6, *limit), faults=[fault])
    assert failed.returncode == 1
    line = error_line(failed.stderr)
    assert str(out / "checkpoint-4") in line and message in line, line
    assert checkpoint_names(out) == ["checkpoint-2"]
    assert not [n for n in os.listdir(out) if n.startswith(".checkpoint-")]  # the partial folder is cleaned up
    resumed = training_runner.run(tiny_train_args(out, 6, "--resume_from_checkpoint", "latest", *limit))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert checkpoint_names(out) == ["checkpoint-6"]  # rotation kept exactly the newest
    assert_same_state(final_state(out), reference[0])


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(training_runner, reference,
                                                                                 tmp_path):
    out = tmp_path / "out"
    nan_at_step_5 = Fault("ddpm_hf.losses:simple_loss", "nan", at_call=5)
    failed = training_runner.run(tiny_train_args(out), faults=[nan_at_step_5])
    assert failed.returncode == 1
    line = error_line(failed.stderr)
    assert "loss is nan at optimizer step 5" in line, line
    for cause in ("--learning_rate", "fp16", "--skip_nonfinite_steps", "checkpoint-4"):
        assert cause in line, cause
    assert resolve_checkpoint(str(out), "latest").endswith("checkpoint-4")
    assert not (out / "checkpoint-6").exists()
    # the kept checkpoint is the state before the bad step: resuming without the fault is the uninterrupted run
    resumed = training_runner.run(tiny_train_args(out, 6, "--resume_from_checkpoint", "latest"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_state(final_state(out), reference[0])


def test_skip_nonfinite_steps_skips_and_finishes_with_finite_weights(training_runner, tmp_path):
    out = tmp_path / "out"
    inf_at_step_3 = Fault("ddpm_hf.losses:simple_loss", "inf", at_call=3)
    result = training_runner.run(tiny_train_args(out, 6, "--skip_nonfinite_steps"), faults=[inf_at_step_3])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Non-finite loss at step 3: update skipped (1 skipped so far)" in result.stderr
    assert "'skipped_nonfinite_steps': 1" in result.stderr
    state = final_state(out)
    assert all(tensor.isfinite().all() for tensor in state.values())


def copy_run(reference_out, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference_out, out)
    return out


def test_resume_with_missing_training_state_names_the_checkpoint(training_runner, reference, tmp_path):
    out = copy_run(reference[1], tmp_path)
    os.remove(out / "checkpoint-4" / "training_state.json")
    result = training_runner.run(tiny_train_args(out, 6, "--resume_from_checkpoint", "checkpoint-4"))
    assert result.returncode == 1
    line = error_line(result.stderr)
    assert line.startswith("ValueError") and str(out / "checkpoint-4") in line, line


def test_resume_from_incomplete_folder_is_refused(training_runner, reference, tmp_path):
    out = copy_run(reference[1], tmp_path)
    os.remove(out / "checkpoint-4" / "ddpm_hf_checkpoint.json")
    assert not is_complete(out / "checkpoint-4")
    result = training_runner.run(tiny_train_args(out, 6, "--resume_from_checkpoint", "checkpoint-4"))
    assert result.returncode == 1
    line = error_line(result.stderr)
    assert "not a complete checkpoint" in line and str(out / "checkpoint-4") in line, line


@pytest.mark.parametrize("filename", ["model.safetensors", "optimizer.bin", "ema.safetensors", "random_states_0.pkl"])
def test_resume_from_corrupt_checkpoint_file_names_the_file(training_runner, reference, tmp_path, filename):
    out = copy_run(reference[1], tmp_path)
    path = out / "checkpoint-4" / filename
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    result = training_runner.run(tiny_train_args(out, 6, "--resume_from_checkpoint", "checkpoint-4"))
    assert result.returncode == 1
    assert str(path) in error_line(result.stderr), error_line(result.stderr)


def test_resume_without_random_states_is_refused_naming_the_file(training_runner, reference, tmp_path):
    """accelerate skips a missing/unreadable RNG file with an info log; the resumed run would then not be exact."""
    out = copy_run(reference[1], tmp_path)
    path = out / "checkpoint-4" / "random_states_0.pkl"
    os.remove(path)
    result = training_runner.run(tiny_train_args(out, 6, "--resume_from_checkpoint", "checkpoint-4"))
    assert result.returncode == 1
    line = error_line(result.stderr)
    assert str(path) in line and "missing" in line and "RNG" in line, line


def test_resume_with_another_model_config_names_the_checkpoint(training_runner, reference, tmp_path):
    out = copy_run(reference[1], tmp_path)
    args = tiny_train_args(out, 6, "--resume_from_checkpoint", "checkpoint-4")
    config = json.loads((tmp_path / "tiny_unet_config.json").read_text())
    config["block_out_channels"] = [8, 8]
    (tmp_path / "tiny_unet_config.json").write_text(json.dumps(config))
    result = training_runner.run(args)
    assert result.returncode == 1
    line = error_line(result.stderr)
    # the run identity names the differing network key before any weight is loaded (before: a shape mismatch)
    assert str(out / "checkpoint-4") in line and "unet_config.block_out_channels: [8, 16] -> [8, 8]" in line, line


def test_checkpoints_hold_weights_as_safetensors(reference):
    """What a checkpoint contains (documented in docs/reliability.md); the weights are safetensors."""
    folder = reference[1] / "checkpoint-4"
    assert set(os.listdir(folder)) == {"model.safetensors", "ema.safetensors", "optimizer.bin",
                                       "random_states_0.pkl", "generator_0.safetensors", "training_state.json",
                                       "ddpm_hf_checkpoint.json"}
    assert load_file(folder / "model.safetensors").keys() == load_file(reference[1] / "unet_raw" /
                                                                        "diffusion_pytorch_model.safetensors").keys()
