"""Bad and awkward training data through the real script (`--train_data_dir`, datasets' imagefolder).

Each run is a 1-step training in its own process (tests/fault_injection.py). Expected behaviour (issue 5):
unreadable images are skipped and counted, any PIL mode converts, small images are upscaled, and a source
with no usable image, or a resolution the network cannot halve, stops before anything is written.
"""

import json
import re

import numpy as np
import pytest
from fault_injection import tiny_train_args
from PIL import Image

from ddpm_hf.data import DataConfig, build_train_dataset


def save(path, mode, size, value=None, seed=0):
    """An image of `mode` and (height, width) `size`: random, or constant `value` (raw pixel units)."""
    rng = np.random.default_rng(seed)
    h, w = size
    if mode == "I;16":
        pixels = np.full((h, w), value, np.uint16) if value is not None else (rng.random((h, w)) * 65535).astype(
            np.uint16)
        Image.fromarray(pixels).save(path)
        return
    bands = {"L": 1, "RGB": 3, "RGBA": 4, "P": 3}[mode]
    pixels = np.full((h, w, bands), value, np.uint8) if value is not None else (
        rng.random((h, w, bands)) * 255).astype(np.uint8)
    image = Image.fromarray(pixels[:, :, 0] if bands == 1 else pixels, "RGB" if mode == "P" else mode)
    (image.convert("P") if mode == "P" else image).save(path)


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


def error_line(stderr):
    lines = [line for line in stderr.splitlines() if re.match(r"^[\w.]+(Error|Exception): ", line)]
    assert lines, stderr[-3000:]
    return lines[-1]


def assert_nothing_written(out):
    assert not out.exists() or not [p for p in out.iterdir() if p.name != "logs"], sorted(out.iterdir())


@pytest.fixture
def mixed_folder(tmp_path):
    """Every mode and size at once, including images smaller than the 8x8 training resolution."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    save(folder / "rgb.png", "RGB", (10, 12))
    save(folder / "gray.jpg", "L", (8, 8))
    save(folder / "rgba.png", "RGBA", (20, 9))
    save(folder / "palette.png", "P", (9, 9))
    save(folder / "sixteen.png", "I;16", (11, 8))
    save(folder / "tiny.png", "RGB", (3, 5))
    return folder


@pytest.mark.parametrize("content", ["empty", "non-images", "all-unreadable"])
def test_folder_without_usable_images_stops_with_a_clear_error(training_runner, tmp_path, content):
    folder = tmp_path / "data"
    folder.mkdir()
    if content == "non-images":
        (folder / "notes.txt").write_text("not an image")
        (folder / "table.csv").write_text("a,b\n1,2\n")
    elif content == "all-unreadable":  # image extensions, unreadable content
        (folder / "a.png").write_text("not a png")
        (folder / "b.jpg").write_bytes(b"\xff\xd8\xff garbage")
    out = tmp_path / "out"
    result = training_runner.run(tiny_train_args(out, 1, "--train_data_dir", str(folder)))
    assert result.returncode == 1
    line = error_line(result.stderr)
    assert line.startswith("ValueError: ")
    if content == "all-unreadable":
        assert "none of the 2 images" in line and "could be read" in line, line
    assert f"--train_data_dir '{folder}'" in line, line  # the error names the folder in every case
    assert_nothing_written(out)


def test_corrupt_images_among_good_ones_are_replaced_and_named_as_they_are_met(training_runner, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(3):
        save(folder / f"good{i}.png", "RGB", (8, 8), seed=i)
    save(folder / "good.jpg", "RGB", (12, 10))
    for name in ("bad.png", "bad.jpg"):
        save(folder / name, "RGB", (16, 16))
        truncate(folder / name)
    (folder / "bad2.png").write_text("text with an image extension")
    # 7 images at batch 4: the first epoch (2 steps) meets every image once, without a pre-pass at the start
    result = training_runner.run(tiny_train_args(tmp_path / "out", 2, "--train_data_dir", str(folder)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Training images: 7 (3 channel(s), 8x8)" in result.stderr
    named = re.findall(r"Unreadable image '([^']+)' in --train_data_dir .*\((\w+Error): ", result.stderr)
    assert sorted(path.rsplit("/", 1)[1] for path, _ in named) == ["bad.jpg", "bad.png", "bad2.png"], named


@pytest.mark.parametrize("num_channels", [None, 1])
def test_mixed_modes_and_sizes_train(training_runner, tmp_path, mixed_folder, num_channels):
    out = tmp_path / "out"
    extra = () if num_channels is None else ("--num_channels", str(num_channels))
    result = training_runner.run(tiny_train_args(out, 1, "--train_data_dir", str(mixed_folder), *extra))
    assert result.returncode == 0, result.stderr[-3000:]
    channels = 3 if num_channels is None else 1  # one colour image makes the data RGB
    assert f"Training images: 6 ({channels} channel(s), 8x8), skipped unreadable: 0" in result.stderr
    config = json.loads((out / "unet" / "config.json").read_text())
    assert (config["in_channels"], config["sample_size"]) == (channels, 8)


def test_every_mode_converts_to_the_right_values(tmp_path):
    """Constant images of each mode: the training tensors hold the colour, not a clipped or wrapped value."""
    folder = tmp_path / "data"
    folder.mkdir()
    save(folder / "a_sixteen.png", "I;16", (8, 8), value=32768)  # mid grey in 16 bits, not white
    save(folder / "b_gray.png", "L", (8, 8), value=255)
    save(folder / "c_rgba.png", "RGBA", (4, 4), value=0)  # fully transparent: composited on white
    save(folder / "d_palette.png", "P", (8, 8), value=0)
    save(folder / "e_rgb.png", "RGB", (3, 5), value=128)  # smaller than the resolution: upscaled
    dataset = build_train_dataset(DataConfig(train_data_dir=str(folder), resolution=8, center_crop=True))
    assert dataset.info.num_channels == 3 and len(dataset) == 5
    by_name = sorted(range(5), key=lambda i: dataset.images[i]["image"]["path"])
    values = [dataset[i] for i in by_name]
    assert all(v.shape == (3, 8, 8) for v in values)
    expected = [32768 / 65535, 1.0, 1.0, 0.0, 128 / 255]
    for value, level in zip(values, expected):
        assert torch_close(value, level * 2 - 1)


def torch_close(tensor, value):
    return bool((tensor - value).abs().max() < 1e-4)


def test_resolution_the_network_cannot_halve_is_refused(training_runner, tmp_path):
    out = tmp_path / "out"
    args = tiny_train_args(out, 1)
    args[args.index("--resolution") + 1] = "9"  # the tiny net halves once: needs a multiple of 2
    result = training_runner.run(args)
    assert result.returncode == 1
    line = error_line(result.stderr)
    assert "--resolution 9" in line and "multiple of 2" in line, line
    assert_nothing_written(out)
