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
    pytest.importorskip("tensorboard")  # the dependency that must pass
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
