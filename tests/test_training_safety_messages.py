"""Bad command lines end in one line naming the flag or file, with no traceback (issue 11).

Each run is `training/train.py` in its own process (tests/fault_injection.py's runner).
"""

import pytest
from fault_injection import tiny_train_args
from test_reliability_checkpoints import error_line


def one_line_error(result):
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return error_line(result.stderr)


def test_a_mistyped_flag_gets_a_suggestion(training_runner, tmp_path):
    result = training_runner.run(tiny_train_args(tmp_path / "out", 2, "--learnig_rate", "1e-3"))
    assert one_line_error(result) == "ValueError: unknown flag --learnig_rate (did you mean --learning_rate?)"
    assert not (tmp_path / "out").exists()


def test_a_logger_whose_package_is_missing_fails_at_start_with_the_install_command(training_runner, tmp_path):
    args = tiny_train_args(tmp_path / "out", 2)
    args[args.index("--logger") + 1] = "comet_ml"  # not installed here (nor a dependency)
    line = one_line_error(training_runner.run(args))
    assert "--logger comet_ml needs the comet_ml package" in line and "pip install comet_ml" in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content, message", [
    (None, "config file '{path}' does not exist"),
    ('{"seed": 1,', "config file {path} is not valid JSON"),
    ('{"learnig_rate": 1}', "config file {path}: "),
], ids=["missing", "malformed", "unknown-key"])
def test_json_config_errors_name_the_file(training_runner, tmp_path, content, message):
    path = tmp_path / "config.json"
    if content is not None:
        path.write_text(content)
    line = one_line_error(training_runner.run([str(path)]))
    assert message.format(path=path) in line, line


def test_json_config_with_flags_is_refused_saying_so(training_runner, tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"seed": 1}')
    line = one_line_error(training_runner.run([str(path), "--seed", "2"]))
    assert f"a JSON config ({path}) cannot be combined with flags (--seed 2)" in line, line


def test_a_run_shorter_than_its_warmup_is_warned_about(training_runner, tmp_path):
    args = tiny_train_args(tmp_path / "short", 3)
    args[args.index("--lr_warmup_steps") + 1] = "100"
    result = training_runner.run(args)
    assert result.returncode == 0, result.stderr[-3000:]
    # linear warmup: after 3 of 100 steps the LR is 3/100 of the peak 2e-3
    assert ("WARNING ddpm_hf.train: --lr_warmup_steps 100 is not below the run's 3 optimizer steps: the learning "
            "rate never reaches --learning_rate 0.002 (it ends at 6e-05)") in result.stderr, result.stderr[-3000:]
    fine = training_runner.run(tiny_train_args(tmp_path / "fine", 3))  # 1 warmup step
    assert fine.returncode == 0 and "--lr_warmup_steps" not in fine.stderr


def test_final_export_grid_and_evaluation_are_logged_with_durations(training_runner, tmp_path):
    """The minutes after the last step are no longer silent: each phase is logged as it starts and ends."""
    result = training_runner.run(tiny_train_args(tmp_path / "out", 2))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line.split(": ", 1)[1] for line in result.stderr.splitlines() if " INFO ddpm_hf.train: " in line]
    phases = [f"Export to {tmp_path / 'out'}", "Sample grid (DDIM, 2 steps)"]
    for what in phases:
        assert f"{what} ..." in lines, lines
        done = [line for line in lines if line.startswith(f"{what} done in ")]
        assert len(done) == 1 and float(done[0].split(" done in ")[1].rstrip(" s")) >= 0, lines
    assert lines.index(f"{phases[0]} ...") < lines.index(f"{phases[1]} ...")


def test_unused_labels_are_said_to_be_ignored(training_runner, tmp_path):
    """Unconditional training on data with labels (the digits' classes) says that it leaves them unused."""
    result = training_runner.run(tiny_train_args(tmp_path / "out", 2))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Label column 'target' found (10 classes): ignored, this training is unconditional" in result.stderr


def test_fp16_on_a_cpu_runs_and_is_recorded_as_fp32(training_runner, tmp_path):
    """fp16 autocast is a no-op on the CPU: the run says so, runs with mixed_precision=no, and records that."""
    result = training_runner.run(tiny_train_args(tmp_path / "out", 2, "--mixed_precision", "fp16"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--mixed_precision fp16 does nothing on a CPU" in result.stderr
    assert "mixed_precision=no" in result.stderr
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| mixed_precision | no |" in card and "fp16" not in card


def test_the_logged_total_batch_is_the_real_one(training_runner, tmp_path):
    """Three images at --train_batch_size 4: batches of 3, and the log says so."""
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.new("L", (8, 8), color=40 * i).save(folder / f"{i}.png")
    result = training_runner.run(tiny_train_args(tmp_path / "out", 2, "--train_data_dir", str(folder)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "total batch 3 (--train_batch_size 4 is more than the 3 images of each process)" in result.stderr


def test_under_accelerate_launch_our_line_is_just_above_the_launchers_traceback(tmp_path):
    """accelerate's launcher turns any non-zero exit into its own CalledProcessError traceback (~10 lines, after
    ours); the fix-it line is the one just above it, and docs/training.md says so."""
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        ["accelerate", "launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "training/train.py", "--learnig_rate", "1", "--output_dir", str(tmp_path / "o")],
        cwd=root, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    message = "ValueError: unknown flag --learnig_rate (did you mean --learning_rate?)"
    ours = lines.index(message)
    launcher = lines.index("Traceback (most recent call last):", ours)
    assert "CalledProcessError" in lines[-1]
    # accelerate <= 1.15 starts its traceback on the next line; 1.16 first repeats our last line as the cause.
    between = {line for line in lines[ours + 1:launcher] if line.strip()}
    assert between <= {f"RuntimeError: {message}", "The above exception was the direct cause of the following "
                       "exception:"}, lines[ours:launcher]
    troubleshooting = (root / "docs" / "training.md").read_text().split("## Troubleshooting", 1)[1]
    assert "CalledProcessError" in troubleshooting and "the last line before" in troubleshooting
    assert not (tmp_path / "o").exists()


def test_only_a_failed_collective_of_a_distributed_run_is_reported_as_a_lost_peer(monkeypatch):
    import torch

    from ddpm_hf.training.interrupts import lost_peer_message

    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [::1]:4242")
    assert lost_peer_message(gloo) is None  # one process: there is no peer to lose
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    message = lost_peer_message(gloo)
    assert message.startswith("another process of this run stopped answering or died ([../third_party/gloo/gloo/"
                              "transport/tcp/pair.cc:534] Connection closed by peer [::1]:4242); its own log says why")
    assert "--resume_from_checkpoint latest" in message and "--ddp_timeout" in message
    assert lost_peer_message(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    assert lost_peer_message(ValueError("Timed out waiting for the user")) is None
