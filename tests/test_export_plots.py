"""The export's loss plot and its history: one row per logging step across a resume, the card shows the plot."""

import csv

import pytest
from fault_injection import tiny_train_args
from PIL import Image


@pytest.fixture(scope="module")
def resumed(training_runner, tmp_path_factory):
    out = tmp_path_factory.mktemp("plots") / "out"
    first = training_runner.run(tiny_train_args(out, 4))
    assert first.returncode == 0, first.stderr[-3000:]
    with open(out / "loss_history.csv") as handle:
        before = list(csv.DictReader(handle))
    # a row past the checkpoint the resume starts from, as a crash after a logging step would leave it
    with open(out / "loss_history.csv", "a") as handle:
        handle.write("5,123.0\n6,1")
    again = training_runner.run(tiny_train_args(out, 6, "--resume_from_checkpoint", "latest"))
    assert again.returncode == 0, again.stderr[-3000:]
    with open(out / "loss_history.csv") as handle:
        after = list(csv.DictReader(handle))
    return out, before, after


def test_the_history_has_each_logging_step_once_across_the_resume(resumed):
    _, before, after = resumed
    assert [int(r["step"]) for r in before] == [1, 2, 3, 4]
    assert [int(r["step"]) for r in after] == [1, 2, 3, 4, 5, 6]
    assert after[:4] == before and float(after[4]["loss"]) != 123.0  # the stale row was replaced


def test_the_plot_is_a_png_and_the_card_shows_it_with_the_grid(resumed):
    out, _, _ = resumed
    with Image.open(out / "loss.png") as plot:
        assert plot.format == "PNG" and plot.width > 100
    readme = (out / "README.md").read_text()
    assert "![Training loss](loss.png)" in readme and "](samples.png)" in readme
