"""--streaming: shards written at test time (sklearn digits and crops of its sample photos, as parquet and webdataset
tars), streamed and compared with the map-style path, per-epoch reshuffling, per-rank shares, the consumer-side
position (exact resume, also after SIGKILL), bad shards, and no per-step host sync in the training step."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
from fault_injection import Fault, assert_same_state, final_state, tiny_train_args
from PIL import Image

from ddpm_hf.data import DataConfig, ImageTransform
from ddpm_hf.streaming import build_streaming_dataset, check_shards, open_stream

SHARD_SIZES = (40, 40, 40, 40)  # 160 digits in 4 shards


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def digit_pngs(count: int, colour_crops: int = 0) -> list[bytes]:
    """``count`` sklearn digits as 8-bit PNGs, then ``colour_crops`` 24x24 crops of its sample photos."""
    from sklearn.datasets import load_digits, load_sample_images

    images = [_png((d * 255 / 16).astype(np.uint8)) for d in load_digits().images[:count]]
    photos = load_sample_images().images
    rng = np.random.default_rng(0)
    for i in range(colour_crops):
        photo = photos[i % len(photos)]
        top, left = rng.integers(0, photo.shape[0] - 24), rng.integers(0, photo.shape[1] - 24)
        images.append(_png(np.ascontiguousarray(photo[top:top + 24, left:left + 24])))
    return images


def write_parquet(path, images, column="image"):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({column: [{"bytes": b, "path": None} for b in images],
                             "label": list(range(len(images)))}), path)


def write_tar(path, images, first_key=0):
    with tarfile.open(path, "w") as tar:
        for i, data in enumerate(images):
            info = tarfile.TarInfo(f"{first_key + i:06d}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def write_shards(folder, images, sizes, kind):
    folder.mkdir(parents=True, exist_ok=True)
    start = 0
    for i, size in enumerate(sizes):
        part = images[start:start + size]
        if kind == "parquet":
            write_parquet(folder / f"train-{i:02d}.parquet", part)
        else:
            write_tar(folder / f"train-{i:02d}.tar", part, start)
        start += size
    return folder


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    images = digit_pngs(sum(SHARD_SIZES))
    return {"images": images, "parquet": write_shards(root / "pq", images, SHARD_SIZES, "parquet"),
            "tar": write_shards(root / "wds", images, SHARD_SIZES, "tar"), "root": root}


def stream(path, column="image", batch=16, rank=0, world=1, buffer=16, seed=0, **config):
    config = {"resolution": 8, "center_crop": True, **config}
    dataset = build_streaming_dataset(DataConfig(dataset_name=str(path), image_column=column,
                                                 shuffle_buffer_size=buffer, **config), seed=seed)
    dataset.configure(batch, rank, world)
    return dataset


def epoch_images(dataset, epoch=0):
    dataset.set_epoch(epoch)
    return torch.cat([b.images for b in dataset])


def as_rows(images):
    """Images as a sorted list of byte strings: a multiset that ignores order."""
    return sorted(image.numpy().tobytes() for image in images)


# ---- what is streamed --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, column", [("parquet", "image"), ("tar", "png")])
def test_streamed_epoch_holds_exactly_the_images_of_the_map_style_path(shards, kind, column):
    import datasets

    from ddpm_hf.image_dataset import HFImageDataset

    files = sorted(str(p) for p in shards[kind].iterdir())
    builder = "parquet" if kind == "parquet" else "webdataset"
    loaded = datasets.load_dataset(builder, data_files={"train": files}, split="train")
    mapped = HFImageDataset(loaded, column, ImageTransform(8, center_crop=True), num_channels=1)
    expected = torch.stack([mapped[i] for i in range(len(mapped))])
    got = epoch_images(stream(shards[kind], column))
    assert got.shape == expected.shape == (sum(SHARD_SIZES), 1, 8, 8)
    assert as_rows(got) == as_rows(expected)


def test_epochs_reshuffle_with_the_seed_and_repeat_under_it(shards):
    first = stream(shards["parquet"])
    epoch0, epoch1 = epoch_images(first, 0), epoch_images(first, 1)
    assert as_rows(epoch0) == as_rows(epoch1) and not torch.equal(epoch0, epoch1)
    assert torch.equal(epoch_images(stream(shards["parquet"]), 1), epoch1)  # same seed, same epoch: same order
    assert not torch.equal(epoch_images(stream(shards["parquet"], seed=1), 1), epoch1)


@pytest.mark.parametrize("sizes", [SHARD_SIZES, (60, 50, 50)], ids=["shards-per-rank", "examples-per-rank"])
def test_two_ranks_share_an_epoch_without_overlap(tmp_path, sizes):
    images = digit_pngs(sum(sizes))
    folder = write_shards(tmp_path / "pq", images, sizes, "parquet")
    ranks = [epoch_images(stream(folder, batch=8, rank=r, world=2), 3) for r in (0, 1)]
    assert as_rows(torch.cat(ranks)) == as_rows(epoch_images(stream(folder), 3))
    assert not set(as_rows(ranks[0])) & set(as_rows(ranks[1]))


def test_colour_crops_give_three_channels_and_random_crops_follow_the_seed(tmp_path):
    folder = write_shards(tmp_path / "pq", digit_pngs(0, colour_crops=24), (12, 12), "parquet")
    a = stream(folder, batch=6, center_crop=False, random_flip=True)
    assert a.info.num_channels == 3
    assert torch.equal(epoch_images(a), epoch_images(stream(folder, batch=6, center_crop=False, random_flip=True)))


# ---- the position ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_a_restored_position_continues_with_exactly_the_remaining_batches(shards, workers):
    """Through a DataLoader (with workers too): the batches after a saved position are those of one pass."""
    from ddpm_hf.training.components import make_dataloader

    dataset = stream(shards["parquet"], batch=12, buffer=32)
    loader = make_dataloader(dataset, 12, 0, workers)
    whole = [b.images for b in make_dataloader(stream(shards["parquet"], batch=12, buffer=32), 12, 0, 0)]
    taken = []
    for item in loader:
        dataset.advance(item)
        taken.append(item.images)
        if len(taken) == 5:
            break
    state = json.loads(json.dumps(dataset.state_dict()))
    resumed = stream(shards["parquet"], batch=12, buffer=32)
    resumed.load_state_dict(state)
    rest = [b.images for b in make_dataloader(resumed, 12, 0, workers)]
    assert len(whole) == 14 and whole[-1].shape[0] == 4  # 160 = 13 * 12 + 4
    assert all(torch.equal(a, b) for a, b in zip(taken + rest, whole, strict=True))


def test_a_position_of_another_layout_is_refused_naming_what_differs(shards):
    state = stream(shards["parquet"], batch=12).state_dict()
    with pytest.raises(ValueError, match="world_size 1 there, 2 here"):
        stream(shards["parquet"], batch=12, world=2).load_state_dict(state)


# ---- bad input ---------------------------------------------------------------------------------------------------


def test_damaged_shards_are_named(shards, tmp_path):
    good = sorted(shards["parquet"].iterdir())[0]
    truncated = tmp_path / "train-01.parquet"
    truncated.write_bytes(good.read_bytes()[:300])
    with pytest.raises(ValueError, match=f"shard {truncated} is not a readable parquet"):
        check_shards([str(good), str(truncated)], "image")
    not_a_tar = tmp_path / "notes.tar"
    not_a_tar.write_text("hello, not an archive\n" * 40)
    with pytest.raises(ValueError, match=f"shard {not_a_tar} is not a readable tar"):
        check_shards([str(not_a_tar)], "png")
    cut_tar = tmp_path / "cut.tar"
    cut_tar.write_bytes(sorted(shards["tar"].iterdir())[0].read_bytes()[:3000])
    with pytest.raises(ValueError, match=f"shard {cut_tar} is not a readable tar"):
        check_shards([str(cut_tar)], "png")


def test_a_shard_without_the_image_column_is_named(tmp_path):
    folder = tmp_path / "pq"
    folder.mkdir()
    write_parquet(folder / "a.parquet", digit_pngs(4))
    write_parquet(folder / "b.parquet", digit_pngs(4), column="picture")
    with pytest.raises(ValueError, match=r"shard .*b\.parquet has no column 'image'"):
        open_stream(DataConfig(dataset_name=str(folder), streaming=True))


def test_unreadable_images_are_left_out_and_counted(tmp_path):
    images = digit_pngs(10)
    images[3] = images[7] = b"not a png"
    folder = write_shards(tmp_path / "pq", images, (10,), "parquet")
    dataset = stream(folder, batch=4)
    items = list(dataset)
    for item in items:
        dataset.advance(item)
    assert [i.end for i in items] == [4, 8, 10]  # batches cut at raw-record positions
    assert sum(i.images.shape[0] for i in items) == 8 and dataset.num_skipped_seen == 2


@pytest.mark.parametrize("count, batch, message", [(0, 4, "an empty stream"), (3, 4, "process 0: 3")])
def test_an_empty_or_short_stream_stops_before_anything_is_written(training_runner, tmp_path, count, batch,
                                                                   message):
    import pyarrow as pa
    import pyarrow.parquet as pq

    shard = tmp_path / "data.parquet"
    if count:
        write_parquet(shard, digit_pngs(count))
    else:
        pq.write_table(pa.table({"image": pa.array([], pa.struct([("bytes", pa.binary()), ("path", pa.string())]))}),
                       shard)
    out = tmp_path / "out"
    result = training_runner.run(tiny_train_args(out, 2, "--streaming", "true", "--dataset_name", str(shard),
                                                 "--train_batch_size", str(batch), "--num_channels", "1"))
    assert result.returncode == 1, result.stderr[-2000:]
    assert message in result.stderr.strip().splitlines()[-1]
    assert not out.exists()


@pytest.mark.parametrize("flags, message", [
    (["--streaming", "true", "--dataset_name", "x"], "--streaming needs --max_train_steps"),
    (["--streaming", "true", "--max_train_steps", "3"], "--streaming needs --dataset_name or --train_data_dir"),
    (["--shuffle_buffer_size", "0"], "--shuffle_buffer_size"),
    (["--streaming", "true", "--dataset_name", "x", "--max_train_steps", "3", "--eval", "true"], "--eval"),
])
def test_streaming_flags_are_validated(flags, message):
    from ddpm_hf.training.args import parse_args

    with pytest.raises(ValueError, match=message):
        parse_args(flags)


# ---- training ----------------------------------------------------------------------------------------------------


def stream_train_args(out, folder, steps=6, *extra):
    """Streamed digits with random crops and flips, a shuffle buffer, accumulation over 2 batches: 6 optimizer
    steps are 12 batches, over 2 epochs of 5 (the last partial), so groups run across epoch ends."""
    return tiny_train_args(out, steps, "--streaming", "true", "--dataset_name", str(folder), "--train_batch_size",
                           "4", "--gradient_accumulation_steps", "2", "--shuffle_buffer_size", "8",
                           "--random_flip", "true", "--num_channels", "1", *extra)


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory):
    """18 digits, bigger than the net's 8x8 so that random crops move, in 2 shards."""
    root = tmp_path_factory.mktemp("small")
    images = [_png(np.kron((d * 255 / 16).astype(np.uint8), np.ones((2, 2), np.uint8)))
              for d in __import__("sklearn.datasets").datasets.load_digits().images[:18]]
    return write_shards(root / "pq", images, (9, 9), "parquet")


def test_sigkill_mid_step_then_resume_is_bit_identical_to_the_uninterrupted_streamed_run(training_runner, tmp_path,
                                                                                         small_shards):
    reference = tmp_path / "reference"
    done = training_runner.run(stream_train_args(reference, small_shards))
    assert done.returncode == 0, done.stderr[-3000:]
    state = json.loads((reference / "checkpoint-6" / "data_state_0.json").read_text())
    assert state["epoch"] >= 2 and state["num_skipped_seen"] == 0  # 24 records taken: past 2 epoch ends
    out = tmp_path / "out"
    killed = training_runner.run(stream_train_args(out, small_shards),
                                 faults=[Fault("torch.optim:AdamW.step", "kill_after", at_call=4)])
    assert killed.killed, killed.stderr[-3000:]
    assert json.loads((out / "checkpoint-2" / "data_state_0.json").read_text())["position"] == 16
    resumed = training_runner.run(stream_train_args(out, small_shards, 6, "--resume_from_checkpoint", "latest"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resumed from" in resumed.stderr
    assert_same_state(final_state(out), final_state(reference))


def test_a_checkpoint_without_the_stream_position_is_refused_naming_the_file(training_runner, tmp_path,
                                                                             small_shards):
    out = tmp_path / "out"
    assert training_runner.run(stream_train_args(out, small_shards, 2)).returncode == 0
    missing = out / "checkpoint-2" / "data_state_0.json"
    os.remove(missing)
    result = training_runner.run(stream_train_args(out, small_shards, 4, "--resume_from_checkpoint", "latest"))
    assert result.returncode == 1
    assert f"checkpoint file {missing} is missing" in result.stderr.strip().splitlines()[-1]


def test_the_training_step_makes_one_host_sync_per_step_and_the_log_the_rest(tmp_path):
    """Every tensor -> Python conversion in a run, counted: a 6-step run makes exactly 3 more than a 3-step run
    (step_decisions' one flag per step), with --logging_steps beyond the run (the log line comes at the end)."""
    from test_training import tiny_flags, train_state_reset

    from ddpm_hf.checkpointing import RunClock
    from ddpm_hf.data import build_train_dataset
    from ddpm_hf.training import build_run, parse_args, prepare_output_dir, setup_accelerator, train_loop

    names = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")
    originals = {name: getattr(torch.Tensor, name) for name in names}

    def syncs(steps):
        calls = []
        try:
            data_args, model_args, args = parse_args(tiny_flags(tmp_path, out=f"out{steps}", max_train_steps=steps,
                                                                train_batch_size=8, logging_steps=100))
            run = build_run(setup_accelerator(args), build_train_dataset(data_args, seed=args.seed), data_args,
                            model_args, args, RunClock())
            prepare_output_dir(run)
            for name in names:
                setattr(torch.Tensor, name, _counting(originals[name], calls, name))
            train_loop(run)
        finally:
            for name, original in originals.items():
                setattr(torch.Tensor, name, original)
            train_state_reset()
        return calls

    short, long = syncs(3), syncs(6)
    assert len(long) - len(short) == 3, (short, long)


def _counting(original, calls, name):
    def counted(self, *args, **kwargs):
        calls.append(name)
        return original(self, *args, **kwargs)
    return counted
