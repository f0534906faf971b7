"""One run per output folder (issue 11): contradictory flags, overwriting only our files, run identities.

Every run is `training/train.py` in its own process (tests/fault_injection.py's runner, no faults injected).
"""

import hashlib
import json
import os

import pytest
from fault_injection import tiny_train_args
from test_reliability_checkpoints import error_line

from ddpm_hf.checkpointing import MARKER, list_checkpoints
from ddpm_hf.training.args import RESULT_NEUTRAL_ARGS, TrainingArguments


def snapshot(folder):
    """Every file below ``folder`` with its bytes: what must stay untouched."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, folder)] = f.read()
    return files


@pytest.fixture
def finished_run(training_runner, tmp_path):
    """A finished 6-step run (checkpoints 2, 4, 6 and an export), plus files of the user's own in its folder."""
    out = tmp_path / "out"
    result = training_runner.run(tiny_train_args(out))
    assert result.returncode == 0, result.stderr[-3000:]
    (out / "my_notes.txt").write_text("not from a training run")
    (out / "my_data").mkdir()
    (out / "my_data" / "image.png").write_bytes(b"\x89PNG user data")
    return out


def test_overwrite_together_with_resume_is_refused_before_anything_is_touched(training_runner, finished_run):
    before = snapshot(finished_run)
    result = training_runner.run(tiny_train_args(finished_run, 6, "--overwrite_output_dir", "true",
                                                 "--resume_from_checkpoint", "latest"))
    assert result.returncode == 1
    line = error_line(result.stderr)
    assert "--overwrite_output_dir" in line and "--resume_from_checkpoint" in line, line
    assert "starting from scratch" not in result.stderr
    assert snapshot(finished_run) == before


def test_overwrite_removes_only_what_a_run_wrote(training_runner, finished_run):
    result = training_runner.run(tiny_train_args(finished_run, 2, "--overwrite_output_dir", "true"))
    assert result.returncode == 0, result.stderr[-3000:]
    # the old run's later checkpoints are gone (the new run only reaches step 2); the user's files are not
    assert [os.path.basename(p) for _, p in list_checkpoints(str(finished_run))] == ["checkpoint-2"]
    assert (finished_run / "my_notes.txt").read_text() == "not from a training run"
    assert (finished_run / "my_data" / "image.png").read_bytes() == b"\x89PNG user data"
    assert "kept other files: my_data, my_notes.txt" in result.stderr


def test_new_run_into_a_folder_holding_another_run_is_refused_naming_it(training_runner, finished_run):
    before = snapshot(finished_run)
    result = training_runner.run(tiny_train_args(finished_run, 6, "--seed", "1"))
    assert result.returncode == 1
    line = error_line(result.stderr)
    for name in ("checkpoint-2", "checkpoint-4", "checkpoint-6", "model_index.json", "--overwrite_output_dir",
                 "--resume_from_checkpoint latest"):
        assert name in line, line
    assert snapshot(finished_run) == before


@pytest.mark.parametrize("changed, expected", [
    (("--seed", "1"), "seed: 0 -> 1"),
    (("--learning_rate", "0.001"), "learning_rate: 0.002 -> 0.001"),
    (("--random_flip", "true"), "random_flip: False -> True"),
], ids=["seed", "learning-rate", "augmentation"])
def test_resuming_another_runs_checkpoint_is_refused_naming_the_keys(training_runner, finished_run, changed,
                                                                     expected):
    before = snapshot(finished_run)
    result = training_runner.run(tiny_train_args(finished_run, 6, "--resume_from_checkpoint", "latest", *changed))
    assert result.returncode == 1
    line = error_line(result.stderr)
    assert str(finished_run / "checkpoint-6") in line and expected in line, line
    assert snapshot(finished_run) == before


def test_resuming_with_another_network_config_names_the_key(training_runner, finished_run, tmp_path):
    config = json.loads((tmp_path / "tiny_unet_config.json").read_text())
    other = tmp_path / "other_unet.json"
    other.write_text(json.dumps(dict(config, act_fn="relu")))  # same shapes: the weights alone would load
    args = tiny_train_args(finished_run, 6, "--resume_from_checkpoint", "checkpoint-4")
    args[args.index("--model_config_name_or_path") + 1] = str(other)
    result = training_runner.run(args)
    assert result.returncode == 1
    assert "unet_config.act_fn: 'silu' -> 'relu'" in error_line(result.stderr)


def test_each_checkpoint_records_the_identity_and_neutral_flags_do_not_change_it(training_runner, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert training_runner.run(tiny_train_args(a, 4)).returncode == 0
    # other output folder, logging, checkpoint cadence, grid: the same run
    neutral = ("--logging_steps", "3", "--checkpointing_steps", "4", "--eval_batch_size", "1", "--logger", "none")
    assert training_runner.run(tiny_train_args(b, 4, *neutral)).returncode == 0
    markers = [json.loads((a / f"checkpoint-{s}" / MARKER).read_text()) for s in (2, 4)]
    marker_b = json.loads((b / "checkpoint-4" / MARKER).read_text())
    for marker in markers + [marker_b]:
        assert marker["seed"] == 0
        # the hash is the SHA-256 of the recorded config as sorted JSON
        assert marker["config_hash"] == hashlib.sha256(json.dumps(marker["config"], sort_keys=True).encode()
                                                       ).hexdigest()
        # neutral flags are left out; the precision enters as the one in force, not as the flag's spelling
        assert not RESULT_NEUTRAL_ARGS & marker["config"].keys() - {"mixed_precision"}
        assert marker["config"]["mixed_precision"] == "no"
        assert "hub_token" not in json.dumps(marker)
    assert markers[0]["config_hash"] == markers[1]["config_hash"] == marker_b["config_hash"]
    run_file = json.loads((a / "ddpm_hf_run.json").read_text())
    assert run_file["config_hash"] == markers[0]["config_hash"]
    # a resume with neutral flags changed is accepted
    resumed = training_runner.run(tiny_train_args(a, 4, "--resume_from_checkpoint", "checkpoint-2", *neutral))
    assert resumed.returncode == 0 and "Resumed from" in resumed.stderr, resumed.stderr[-3000:]


def test_neutral_arguments_name_real_flags():
    """The one list of arguments outside a run's identity names only existing flags (a typo would hash it)."""
    from ddpm_hf.training.args import ARGUMENT_GROUPS

    names = {f for group in ARGUMENT_GROUPS for f in group.__dataclass_fields__}
    assert RESULT_NEUTRAL_ARGS <= names
    assert {"output_dir", "logging_dir", "push_to_hub", "hub_token"} <= RESULT_NEUTRAL_ARGS
    assert not {"seed", "learning_rate", "prediction_type", "train_batch_size"} & RESULT_NEUTRAL_ARGS
    assert "checkpointing_minutes" in TrainingArguments.__dataclass_fields__


def test_output_dir_naming_a_file_is_a_one_line_error(training_runner, tmp_path):
    target = tmp_path / "a_file"
    target.write_text("x")
    result = training_runner.run(tiny_train_args(target, 2))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    line = error_line(result.stderr)
    assert str(target) in line and "existing file" in line, line
    assert target.read_text() == "x"
