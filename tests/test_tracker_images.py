"""Sample grids reach the tensorboard tracker (read back with tensorboard's EventAccumulator) beside the scalars."""

import glob

import pytest
from fault_injection import tiny_train_args
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


@pytest.fixture(scope="module")
def events(training_runner, tmp_path_factory):
    out = tmp_path_factory.mktemp("tracker") / "out"
    args = tiny_train_args(out, 6, "--save_images_steps", "2")
    args[args.index("--logger") + 1] = "tensorboard"
    result = training_runner.run(args)
    assert result.returncode == 0, result.stderr[-3000:]
    files = glob.glob(str(out / "logs" / "**" / "events.out.tfevents*"), recursive=True)
    assert files
    accumulators = [EventAccumulator(f, size_guidance={"images": 0, "scalars": 0}).Reload() for f in files]
    return out, accumulators


def test_each_grid_is_logged_at_its_step_with_the_grids_size(events):
    out, accumulators = events
    images = [e for a in accumulators if "samples" in a.Tags()["images"] for e in a.Images("samples")]
    assert sorted(e.step for e in images) == [2, 4, 6]  # every --save_images_steps and the end
    # 2 samples of 8x8 in one row, a white pixel around each tile, upscaled 64 // 8 = 8 times
    assert {(e.width, e.height) for e in images} == {((2 * 9 + 1) * 8, (1 * 9 + 1) * 8)}


def test_the_scalars_are_logged_beside_them(events):
    _, accumulators = events
    tags = {t for a in accumulators for t in a.Tags()["scalars"]}
    assert {"loss", "lr", "grad_norm", "ema_decay", "images_per_sec"} <= tags
