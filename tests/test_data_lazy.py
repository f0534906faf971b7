"""Map-style data decodes lazily (issue 13): construction reads O(1) images and holds no image bytes; an unreadable
image met mid-epoch is replaced by the next readable one (of its class when training on labels) and counted once,
and the count survives a checkpoint through state_dict / load_state_dict."""

import io
import json
import tracemalloc

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

import ddpm_hf.image_dataset as image_dataset
from ddpm_hf.data import DataConfig, ImageTransform, build_train_dataset, pil_to_float
from ddpm_hf.image_dataset import PROBE_ATTEMPTS, HFImageDataset

BAD = b"\x89PNG\r\n\x1a\nnot really a png"


def png(level, size=8, noise=False):
    pixels = (np.random.default_rng(level).integers(0, 256, (size, size, 3)) if noise
              else np.full((size, size, 3), level)).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def table(blobs, labels=None):
    data = {"image": [{"bytes": b, "path": None} for b in blobs]}
    features = {"image": datasets.Image()}
    if labels is not None:
        data["label"], features["label"] = labels, datasets.ClassLabel(names=[str(i) for i in range(max(labels) + 1)])
    return datasets.Dataset.from_dict(data, features=datasets.Features(features))


def saved(tmp_path, blobs, name="data"):
    """A parquet file on disk (memory-mapped once loaded, as a real source is)."""
    path = tmp_path / f"{name}.parquet"
    table(blobs).to_parquet(str(path))
    return str(path)


def expected(blob):
    """The training tensor of a readable image, computed directly (centre crop at its own size: no resize)."""
    return pil_to_float(Image.open(io.BytesIO(blob)), 3) * 2 - 1


def counting_opens(monkeypatch):
    calls = []
    real = image_dataset.open_image

    def counted(record):
        calls.append(1)
        return real(record)

    monkeypatch.setattr(image_dataset, "open_image", counted)
    return calls


@pytest.mark.parametrize("count", [40, 400])
def test_construction_decodes_a_bounded_number_of_images(tmp_path, monkeypatch, count):
    calls = counting_opens(monkeypatch)
    dataset = build_train_dataset(DataConfig(dataset_name=saved(tmp_path, [png(i % 250) for i in range(count)]),
                                             resolution=8, center_crop=True, eval_holdout=0,
                                             cache_dir=str(tmp_path / "cache")))
    assert len(dataset) == count
    assert len(calls) <= image_dataset.PROBE_READABLE  # 16 for the channel count, whatever the size
    calls.clear()
    dataset[count - 1]
    assert len(calls) == 1


def test_construction_holds_no_image_bytes(tmp_path):
    """Python allocations while building: a fraction of the images' bytes, not growing with their number."""
    peaks = {}
    for count in (50, 200):
        path = saved(tmp_path, [png(i, size=48, noise=True) for i in range(count)], name=f"n{count}")
        source = datasets.load_dataset("parquet", data_files=path, split="train", cache_dir=str(tmp_path / "c"))
        tracemalloc.start()
        HFImageDataset(source, "image", ImageTransform(8, center_crop=True), num_channels=3)
        peaks[count] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    extra_bytes = 150 * len(png(0, size=48, noise=True))  # the 150 more images' encoded size (~7 kB each)
    assert peaks[200] - peaks[50] < 0.1 * extra_bytes, (peaks, extra_bytes)


def test_a_corrupt_image_met_mid_epoch_is_replaced_by_the_next_readable_one_and_counted(caplog):
    blobs = [png(10 * i) for i in range(PROBE_ATTEMPTS + 6)]
    late = PROBE_ATTEMPTS + 2  # beyond what construction looks at: found only when met
    blobs[late] = BAD
    dataset = HFImageDataset(table(blobs), "image", ImageTransform(8, center_crop=True))
    assert dataset.num_skipped_seen == 0
    torch.testing.assert_close(dataset[late - 1], expected(blobs[late - 1]))
    with caplog.at_level("WARNING", logger="ddpm_hf.image_dataset"):
        item = dataset[late]
    torch.testing.assert_close(item, expected(blobs[late + 1]))  # the next readable image in its place
    assert dataset.num_skipped_seen == 1
    assert f"Unreadable image #{late} in the dataset (OSError: " in caplog.text
    dataset[late]
    dataset.set_epoch(1)
    dataset[late]
    assert dataset.num_skipped_seen == 1  # met again: replaced, not counted again
    # the last image wraps around to the first readable one
    blobs[-1] = BAD
    dataset = HFImageDataset(table(blobs), "image", ImageTransform(8, center_crop=True))
    torch.testing.assert_close(dataset[len(blobs) - 1], expected(blobs[0]))


def test_with_labels_the_replacement_is_of_the_same_class():
    blobs, labels = [png(20), BAD, png(200), png(60)], [0, 0, 1, 0]
    dataset = HFImageDataset(table(blobs, labels), "image", ImageTransform(8, center_crop=True), label_column="label")
    torch.testing.assert_close(dataset[1], expected(blobs[3]))  # image 2 is class 1: skipped over
    unconditional = HFImageDataset(table(blobs, labels), "image", ImageTransform(8, center_crop=True))
    torch.testing.assert_close(unconditional[1], expected(blobs[2]))


def test_the_count_survives_a_checkpoint_as_json():
    blobs = [png(10), BAD, png(30), BAD, png(50)]
    first = HFImageDataset(table(blobs), "image", ImageTransform(8, center_crop=True))
    for index in (0, 1):
        first[index]
    state = json.loads(json.dumps(first.state_dict()))
    assert state["num_skipped_seen"] == 1 and state["counted"] == [1]
    resumed = HFImageDataset(table(blobs), "image", ImageTransform(8, center_crop=True))
    resumed.load_state_dict(state)
    for index in (1, 2, 3, 4):  # image 1 met again after the resume: not counted twice
        resumed[index]
    assert resumed.num_skipped_seen == 2
    with pytest.raises(ValueError, match="outside the 5"):
        resumed.load_state_dict({"counted": [7]})


def test_worker_processes_update_the_count_the_training_process_reads():
    blobs = [png(10), BAD, png(30), BAD, png(50), png(60)]
    dataset = HFImageDataset(table(blobs), "image", ImageTransform(8, center_crop=True))
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2)
    batches = list(loader)
    assert sum(len(b) for b in batches) == 6 and dataset.num_skipped_seen == 2
