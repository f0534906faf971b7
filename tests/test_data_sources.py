"""`--dataset_name` sources (issue 11): a single parquet file, a glob of shards, a webdataset tar, a save_to_disk
folder, map-style and streaming; a mistyped path or an unreachable Hub fails at once, naming the problem; an
image column that holds no images and a folder without images are one-line errors."""

import io
import os
import re
import subprocess
import sys
import tarfile
import time

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_hf.data import DataConfig, build_train_dataset
from ddpm_hf.dataset_sources import load_source

LEVELS = (10, 90, 170, 250)


def grey_png(level):
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8), level, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def image_table(levels=LEVELS):
    """A Dataset of grey 8x8 images embedded as bytes, with an integer column."""
    data = {"image": [{"bytes": grey_png(v), "path": None} for v in levels], "label": list(range(len(levels)))}
    return datasets.Dataset.from_dict(data, features=datasets.Features(
        {"image": datasets.Image(), "label": datasets.Value("int64")}))


def levels_of(dataset):
    """The grey level of each training item, back in 0..255 (the items are in [-1, 1])."""
    return [round((float(dataset[i].mean()) + 1) / 2 * 255) for i in range(len(dataset))]


def config(name, **options):
    return DataConfig(dataset_name=str(name), **{"resolution": 8, "center_crop": True, **options})


@pytest.fixture
def sources(tmp_path):
    table = image_table()
    table.to_parquet(str(tmp_path / "one.parquet"))
    table.select([0, 1]).to_parquet(str(tmp_path / "shard-0.parquet"))
    table.select([2, 3]).to_parquet(str(tmp_path / "shard-1.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": table, "test": table.select([0])}).save_to_disk(str(tmp_path / "saved_dict"))
    with tarfile.open(tmp_path / "shard.tar", "w") as tar:  # webdataset: <key>.<ext> members
        for i, level in enumerate(LEVELS):
            payload = grey_png(level)
            member = tarfile.TarInfo(f"{i:04d}.png")
            member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))
    return tmp_path


@pytest.mark.parametrize("name", ["one.parquet", "shard-*.parquet", "shard.tar", "saved", "saved_dict"])
def test_each_source_kind_trains_on_its_images_in_order(sources, name):
    column = "png" if name.endswith(".tar") else "image"
    dataset = build_train_dataset(config(sources / name, image_column=column, cache_dir=str(sources / "cache")))
    assert levels_of(dataset) == list(LEVELS)
    assert dataset.info.num_channels == 1 and dataset.info.is_local


@pytest.mark.parametrize("name", ["one.parquet", "shard-*.parquet", "shard.tar", "saved"])
def test_each_source_kind_streams(sources, name):
    column = "png" if name.endswith(".tar") else "image"
    stream = load_source(config(sources / name, cache_dir=str(sources / "cache")), streaming=True)
    assert isinstance(stream, datasets.IterableDataset)
    assert len(list(stream)) == 4 and column in next(iter(stream))


def test_a_save_to_disk_split_that_is_missing_is_named(sources):
    with pytest.raises(ValueError, match=r"--dataset_name '.*saved_dict' has no 'validation' split; its splits: "
                                         r"\['test', 'train'\]"):
        load_source(config(sources / "saved_dict"), split="validation")
    assert len(load_source(config(sources / "saved_dict"), split="test")) == 1


@pytest.mark.parametrize("name, message", [
    ("./no_such_folder", "is not a local path"),
    ("data/typo/images", "is not a local path"),
    ("missing-*.parquet", "matches no file"),
    ("notes.txt", "a single file must be one of .parquet, .tar"),
])
def test_a_path_that_is_none_fails_at_once(tmp_path, monkeypatch, name, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("hi")
    started = time.perf_counter()
    with pytest.raises(ValueError, match=f"--dataset_name {re.escape(repr(name))}.*{re.escape(message)}"):
        build_train_dataset(config(name))
    assert time.perf_counter() - started < 5  # no Hub retries (they took 23 s)


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}],
                         ids=["offline", "unreachable-endpoint"])
def test_a_hub_name_without_a_hub_fails_fast_in_one_line(tmp_path, env):
    """Before: 23 s of retries, every warning twice, then a raw ConnectionError traceback."""
    code = ("from ddpm_hf.data import DataConfig, build_train_dataset\n"
            "try:\n    build_train_dataset(DataConfig(dataset_name='someone/no-such-data'))\n"
            "except ValueError as err:\n    print('ERR', err)\n")
    environment = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1", **env}
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment,
                            timeout=120)
    took = time.perf_counter() - started
    assert "ERR --dataset_name 'someone/no-such-data' is not a local path, and the Hub is unreachable" in result.stdout, (
        result.stdout + result.stderr[-2000:])
    assert took < 15, took  # interpreter start and imports; the retries alone took 23 s
    assert "Traceback" not in result.stderr


def test_an_image_column_holding_no_images_names_it(sources):
    with pytest.raises(ValueError, match=r"--image_column 'label' of --dataset_name '.*one.parquet' holds "
                                         r"Value\('int64'\).*not images .*image columns there: \['image'\]"):
        build_train_dataset(config(sources / "one.parquet", image_column="label"))
    with pytest.raises(ValueError, match=r"--image_column 'picture' is not a column of .*columns: \['image', 'label'\]"):
        build_train_dataset(config(sources / "one.parquet", image_column="picture"))


def test_paths_and_bytes_columns_are_images_too(tmp_path):
    paths = []
    for i, level in enumerate(LEVELS[:2]):
        paths.append(str(tmp_path / f"{i}.png"))
        (tmp_path / f"{i}.png").write_bytes(grey_png(level))
    table = datasets.Dataset.from_dict({"file": paths, "raw": [grey_png(v) for v in LEVELS[:2]]})
    (tmp_path / "local").mkdir()
    table.to_parquet(str(tmp_path / "local" / "train.parquet"))
    for column in ("file", "raw"):
        dataset = build_train_dataset(config(tmp_path / "local", image_column=column, cache_dir=str(tmp_path / "c")))
        assert levels_of(dataset) == list(LEVELS[:2])
    assert isinstance(dataset[0], torch.Tensor)


def test_an_image_folder_streams(tmp_path):
    for i, level in enumerate(LEVELS):
        (tmp_path / f"{i}.png").write_bytes(grey_png(level))
    stream = load_source(DataConfig(train_data_dir=str(tmp_path)), streaming=True)
    assert isinstance(stream, datasets.IterableDataset) and len(list(stream)) == 4


def test_train_py_trains_on_a_parquet_file_and_names_a_column_without_images(training_runner, sources):
    from fault_injection import tiny_train_args
    from test_reliability_data import assert_nothing_written, error_line

    parquet = str(sources / "one.parquet")
    result = training_runner.run(tiny_train_args(sources / "ok", 1, "--dataset_name", parquet))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Training images: 4 (1 channel(s), 8x8)" in result.stderr
    bad = training_runner.run(tiny_train_args(sources / "bad", 1, "--dataset_name", parquet, "--image_column", "label"))
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert error_line(bad.stderr).startswith(f"ValueError: --image_column 'label' of --dataset_name '{parquet}' holds ")
    assert_nothing_written(sources / "bad")
