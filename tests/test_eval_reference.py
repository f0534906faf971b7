"""What a model is evaluated against (issue 11): --eval_data_dir, the digits' test split, the source's own test
split, else images held out from training, which training never sees; `--eval` and `python -m ddpm_hf.evaluate`
rebuild the same reference, and the evaluate CLI refuses the digits for a model trained on other data."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from fault_injection import tiny_train_args
from PIL import Image
from sklearn.model_selection import train_test_split

from ddpm_hf.data import DataConfig, build_train_dataset, digits_real_images
from ddpm_hf.eval_reference import build_eval_reference

# 120 images, each a distinct grey level, so an image is known by its mean.
LEVELS = [2 * i for i in range(120)]


def write_folder(root, levels, classes=None, mode="L"):
    for i, level in enumerate(levels):
        folder = root if classes is None else root / classes[i]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8), level, np.uint8)).convert(mode).save(folder / f"{i:03d}.png")
    return root


def levels_of(images):
    return sorted(round((float(x.mean()) + 1) / 2 * 255) for x in images)


def config(folder, **options):
    return DataConfig(train_data_dir=str(folder), **{"resolution": 8, "center_crop": True, **options})


def test_a_source_without_a_test_split_holds_out_a_fixed_tenth_that_training_never_sees(tmp_path):
    folder = write_folder(tmp_path / "imgs", LEVELS)
    train = build_train_dataset(config(folder), seed=0)
    reference = build_eval_reference(config(folder), num_channels=1)
    # independently: sklearn's split of the 120 sorted files, 12 held out, seed 0 (whatever the run's seed)
    _, held = train_test_split(np.arange(120), test_size=12, random_state=0)
    assert levels_of(reference.images) == sorted(LEVELS[i] for i in held) and reference.heldout
    assert levels_of(train[i] for i in range(len(train))) == sorted(set(LEVELS) - {LEVELS[i] for i in held})
    assert train.info.num_heldout == 12 and train.info.num_images == 108 and "12 held out" in train.info.split
    other_seed = build_train_dataset(config(folder), seed=5)
    assert levels_of(other_seed[i] for i in range(len(other_seed))) == levels_of(train[i] for i in range(108))
    assert "held out from training" in reference.description


def test_the_hold_out_keeps_each_class_in_proportion(tmp_path):
    classes = ["a"] * 90 + ["b"] * 30
    folder = write_folder(tmp_path / "imgs", LEVELS, classes)
    reference = build_eval_reference(config(folder, class_conditional=True), num_channels=1,
                                     class_names=("a", "b"))
    assert torch.bincount(reference.labels).tolist() == [9, 3]
    # each label belongs to its image: class "a" holds the first 90 levels
    for image, label in zip(reference.images, reference.labels):
        assert (levels_of([image])[0] < 180) == (label == 0)


def test_its_own_test_split_and_an_eval_folder_come_first(tmp_path):
    write_folder(tmp_path / "split" / "train", LEVELS[:110])
    write_folder(tmp_path / "split" / "test", LEVELS[110:])
    train = build_train_dataset(config(tmp_path / "split"))
    assert len(train) == 110 and train.info.num_heldout == 0
    reference = build_eval_reference(config(tmp_path / "split"), num_channels=1)
    assert levels_of(reference.images) == LEVELS[110:] and "'test' split" in reference.description
    eval_folder = write_folder(tmp_path / "eval", [7, 77, 177, 247])
    for source in (config(tmp_path / "split", eval_data_dir=str(eval_folder)),
                   DataConfig(resolution=8, eval_data_dir=str(eval_folder))):  # the digits too
        reference = build_eval_reference(source, num_channels=1)
        assert levels_of(reference.images) == [7, 77, 177, 247] and "--eval_data_dir" in reference.description


def test_digits_keep_their_test_split_and_a_small_folder_says_it_is_not_held_out(tmp_path):
    digits = build_eval_reference(DataConfig(resolution=8), num_channels=1)
    assert torch.equal(digits.images, digits_real_images("test", 8)) and digits.heldout
    small = write_folder(tmp_path / "small", LEVELS[:10])
    assert len(build_train_dataset(config(small))) == 10  # under 100 images: nothing held out by default
    reference = build_eval_reference(config(small), num_channels=1)
    assert not reference.heldout and "not held out" in reference.description
    assert len(build_train_dataset(config(small, eval_holdout=4))) == 6


@pytest.mark.parametrize("options, message", [
    ({"eval_holdout": 2}, "--eval_holdout 2 must be 0, or at least 4"),
    ({"eval_holdout": 120}, "below the source's 120 images"),
    ({"eval_holdout": -1}, "--eval_holdout must be an int >= 0"),
    ({"eval_holdout": 5, "eval_data_dir": "x"}, "--eval_holdout 5 would hold out images for nothing: --eval_data_dir"),
])
def test_bad_hold_outs_are_refused_naming_the_flag(tmp_path, options, message):
    folder = write_folder(tmp_path / "imgs", LEVELS)
    with pytest.raises(ValueError, match=message):
        build_train_dataset(config(folder, **options))


@pytest.mark.slow
def test_eval_and_the_evaluate_cli_use_the_held_out_images_and_the_cli_refuses_the_digits(training_runner, tmp_path):
    """Before: an RGB model was scored against the sklearn digits (FID 1767) by --eval's card and by the CLI."""
    folder = write_folder(tmp_path / "photos", LEVELS, mode="RGB")
    out = tmp_path / "out"
    result = training_runner.run(tiny_train_args(out, 2, "--train_data_dir", str(folder), "--eval", "true",
                                                 "--eval_num_samples", "4"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Training images: 108 (3 channel(s), 8x8)" in result.stderr
    run = json.loads((out / "ddpm_hf_run.json").read_text())
    assert run["config"]["num_heldout"] == 12
    card = (out / "README.md").read_text()
    assert "the 12 images of --train_data_dir" in card and "held out from training" in card
    from ddpm_hf import evaluate

    metrics = evaluate.main([str(out), "--num_samples", "4", "--num_bpd_images", "2", "--num_inference_steps", "2"])
    assert metrics["reference"].startswith("the 12 images of --train_data_dir") and metrics["reference_heldout"]
    assert metrics["num_real_b"] == 6  # half of the 12 held-out images
    refused = subprocess.run([sys.executable, "-m", "ddpm_hf.evaluate", str(out), "--real_split", "test"],
                             capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
    assert refused.stderr.strip().splitlines()[-1].startswith(
        "ValueError: --real_split choose digits, but "), refused.stderr[-2000:]
    assert "--eval_data_dir" in refused.stderr


def test_a_stream_is_scored_against_its_first_images_and_says_they_are_not_held_out(tmp_path):
    folder = write_folder(tmp_path / "imgs", LEVELS[:20])
    reference = build_eval_reference(config(folder, streaming=True), num_channels=1, limit=8)
    assert len(reference.images) == 8 and not reference.heldout and "not held out" in reference.description
    assert set(levels_of(reference.images)) <= set(LEVELS[:20])
