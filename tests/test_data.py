"""Training data: the built-in digits, image-mode conversion, transforms, folders with bad files, data order."""

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_hf.data import (DIGITS_NAME, DataConfig, DigitsDataset, ImageTransform,
                          build_train_dataset, load_digits_tensor, pil_to_float)
from ddpm_hf.image_dataset import HFImageDataset


def folder(path, **options):
    """The data flags for an image folder (centre crop, no flip, 8x8 unless given)."""
    return DataConfig(train_data_dir=str(path), **{"resolution": 8, "center_crop": True, **options})


def test_digits_are_real_upscaled_and_in_range():
    from sklearn.datasets import load_digits

    x = load_digits_tensor(16)
    assert x.shape == (1797, 1, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and x.min() == -1
    native = load_digits_tensor(8)
    torch.testing.assert_close(native[:, 0], torch.from_numpy(load_digits().images / 16.0).float() * 2 - 1)
    # Upscaling keeps each image's mean brightness (bilinear, no shift).
    torch.testing.assert_close(x.mean((1, 2, 3)), native.mean((1, 2, 3)), atol=0.02, rtol=0)
    with pytest.raises(ValueError, match="resolution"):
        load_digits_tensor(4)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "LA", "P", "CMYK", "1", "I;16", "I"])
def test_every_mode_converts_to_the_same_picture(mode):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (6, 5)).astype(np.uint8)
    base = Image.fromarray(gray)
    expected = torch.from_numpy(gray / 255.0).float()
    if mode == "I;16":
        image = Image.fromarray(gray.astype(np.uint16) * 257)  # 8-bit levels spread over 16 bits
    elif mode == "I":
        image = Image.fromarray(gray.astype(np.int32) * 257)
    elif mode == "1":
        image = base.point(lambda v: 255 if v > 127 else 0).convert("1")
        expected = (expected > 127 / 255).float()
    elif mode in ("RGBA", "LA"):
        image = base.convert(mode)  # fully opaque: compositing changes nothing
    else:
        image = base.convert(mode)
    one = pil_to_float(image, 1)
    three = pil_to_float(image, 3)
    assert one.shape == (1, 6, 5) and three.shape == (3, 6, 5)
    torch.testing.assert_close(one[0], expected, atol=2 / 255, rtol=0)
    torch.testing.assert_close(three, one.expand(3, -1, -1), atol=2 / 255, rtol=0)


def test_transparency_composites_on_white_and_colour_becomes_luma():
    rgba = Image.new("RGBA", (2, 1), (255, 0, 0, 0))
    rgba.putpixel((1, 0), (255, 0, 0, 255))
    x = pil_to_float(rgba, 3)
    torch.testing.assert_close(x[:, 0, 0], torch.ones(3))
    torch.testing.assert_close(x[:, 0, 1], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(pil_to_float(rgba, 1)[0, 0, 1], torch.tensor(0.299))
    palette = Image.new("P", (1, 1))
    palette.putpalette([0, 0, 255] + [0] * 765)
    torch.testing.assert_close(pil_to_float(palette, 3)[:, 0, 0], torch.tensor([0.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="num_channels"):
        pil_to_float(rgba, 2)


def test_transform_resizes_crops_and_flips_deterministically():
    image = torch.rand(3, 20, 30)
    center = ImageTransform(10, center_crop=True)(image)
    assert center.shape == (3, 10, 10) and center.min() >= -1 and center.max() <= 1
    random_crop = ImageTransform(10, center_crop=False, random_flip=True)
    a = random_crop(image, torch.Generator().manual_seed(1))
    b = random_crop(image, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    outs = {random_crop(image, torch.Generator().manual_seed(s)).sum().item() for s in range(8)}
    assert len(outs) > 1
    small = ImageTransform(16)(torch.rand(1, 4, 6))  # smaller than the resolution: upscaled
    assert small.shape == (1, 16, 16)


def _prepared_order(tmp_path, seed, epoch, skip=0, global_seed=None, size=10, batch=3):
    """The indices the training loader yields in ``epoch`` from batch ``skip`` on, prepared as training prepares it
    (`setup_accelerator`, `make_dataloader`, the loop's `skip_first_batches` then `set_epoch`)."""
    from test_training import train_state_reset

    from ddpm_hf.training.args import TrainingArguments
    from ddpm_hf.training.components import make_dataloader, setup_accelerator

    try:
        accelerator = setup_accelerator(TrainingArguments(seed=seed, logger="none", output_dir=str(tmp_path)))
        loader = accelerator.prepare(make_dataloader(torch.arange(size), batch, seed, num_workers=0))
        if global_seed is not None:  # torch's global RNG (noise, dropout) must not move the order
            torch.manual_seed(global_seed)
        if skip:
            loader = accelerator.skip_first_batches(loader, skip)
        loader.set_epoch(epoch)
        return torch.cat(list(loader)).tolist()
    finally:
        train_state_reset()


def test_loader_order_is_accelerates_seeded_permutation_of_seed_and_epoch(tmp_path):
    # accelerate's SeedableRandomSampler, independently: torch.randperm under a generator seeded with seed + epoch.
    def expected(seed, epoch):
        return torch.randperm(10, generator=torch.Generator().manual_seed(seed + epoch)).tolist()

    first = _prepared_order(tmp_path, 3, 0)
    assert first == expected(3, 0) and sorted(first) == list(range(10))
    assert _prepared_order(tmp_path, 3, 1) == expected(3, 1) != first  # a new order every epoch
    assert _prepared_order(tmp_path, 3, 1, global_seed=99) == expected(3, 1)  # a function of (seed, epoch) only
    assert _prepared_order(tmp_path, 3, 1, skip=2) == expected(3, 1)[6:]  # a resume inside the epoch: its rest


def test_built_in_digits_are_the_fixed_train_split_only():
    """Training sees the 75 % stratified "train" split (sklearn's train_test_split, seed 0), never "test"."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    train_idx, test_idx = train_test_split(np.arange(1797), test_size=0.25, stratify=digits.target, random_state=0)
    dataset = build_train_dataset(DataConfig(resolution=8))
    assert isinstance(dataset, DigitsDataset) and len(dataset) == 1347 == len(train_idx)
    everything = load_digits_tensor(8)
    assert torch.equal(dataset.images, everything[np.sort(train_idx)])
    info = dataset.info
    assert (info.name, info.is_local, info.num_images, info.num_channels, info.resolution, info.num_skipped) == (
        DIGITS_NAME, False, 1347, 1, 8, 0)
    assert torch.equal(info.labels, torch.from_numpy(digits.target[np.sort(train_idx)]))
    assert info.class_names == tuple("0123456789")
    assert "1,347 of the 1,797" in info.split and "450 held out" in info.split
    # class balance is kept by the stratified split: every digit 25 % held out (+-1)
    held = np.bincount(digits.target[test_idx], minlength=10)
    assert (np.abs(held - np.bincount(digits.target, minlength=10) * 0.25) <= 1).all()


def test_digits_flip_is_a_function_of_seed_epoch_index():
    d = DigitsDataset(8, random_flip=True, seed=0)
    flips = [not torch.equal(d[i], d.images[i]) for i in range(40)]
    assert 5 < sum(flips) < 35
    assert [not torch.equal(d[i], d.images[i]) for i in range(40)] == flips
    d.set_epoch(1)
    assert [not torch.equal(d[i], d.images[i]) for i in range(40)] != flips


def _write_folder(root, with_bad=True):
    root.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((12, 10, 3), 200, np.uint8)).save(root / "rgb.png")
    Image.fromarray(np.full((9, 9), 50, np.uint8)).save(root / "gray.jpg")
    Image.fromarray(np.full((8, 8), 30000, np.uint16)).save(root / "deep.png")
    Image.new("RGBA", (7, 11), (0, 0, 255, 128)).save(root / "alpha.png")
    Image.new("P", (8, 8)).save(root / "palette.gif")
    if with_bad:
        (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
        good = root / "rgb.png"
        (root / "truncated.png").write_bytes(good.read_bytes()[:40])


def test_image_folder_replaces_and_counts_unreadable_files_as_they_are_met(tmp_path):
    _write_folder(tmp_path / "imgs")
    ds = build_train_dataset(folder(tmp_path / "imgs"))
    assert isinstance(ds, HFImageDataset)
    assert len(ds) == 7 and ds.info.num_channels == 3 and ds.info.num_images == 7 and ds.num_skipped_seen == 0
    assert ds.info.is_local and ds.info.name == str(tmp_path / "imgs") and ds.info.labels is None
    batch = torch.stack([ds[i] for i in range(len(ds))])
    assert batch.shape == (7, 3, 8, 8) and batch.min() >= -1 and batch.max() <= 1
    assert ds.num_skipped_seen == 2
    gray = build_train_dataset(folder(tmp_path / "imgs", num_channels=1))
    assert gray[0].shape == (1, 8, 8)


def test_bad_sources_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="train_data_dir"):
        build_train_dataset(folder(tmp_path / "empty"))
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("hello")
    with pytest.raises(ValueError, match="--train_data_dir .* holds no image files"):
        build_train_dataset(folder(tmp_path / "texts"))
    (tmp_path / "allbad").mkdir()
    (tmp_path / "allbad" / "x.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="could be read"):
        build_train_dataset(folder(tmp_path / "allbad"))
    with pytest.raises(ValueError, match="not a directory"):
        build_train_dataset(folder(tmp_path / "missing"))
    with pytest.raises(ValueError, match="not both"):
        build_train_dataset(DataConfig(dataset_name="x", train_data_dir=str(tmp_path / "empty")))
    with pytest.raises(ValueError, match="num_channels"):
        build_train_dataset(DataConfig(resolution=8, num_channels=3))


def test_dataset_name_loads_a_local_dataset_with_a_custom_column(tmp_path):
    import datasets

    _write_folder(tmp_path / "imgs", with_bad=False)
    files = sorted(str(p) for p in (tmp_path / "imgs").iterdir())
    ds = datasets.Dataset.from_dict({"picture": files}).cast_column("picture", datasets.Image())
    (tmp_path / "local").mkdir()
    ds.to_parquet(str(tmp_path / "local" / "train.parquet"))
    train = build_train_dataset(DataConfig(dataset_name=str(tmp_path / "local"), resolution=8, center_crop=True,
                                           image_column="picture", cache_dir=str(tmp_path / "cache")))
    assert len(train) == 5 and train.info.num_channels == 3 and train[0].shape == (3, 8, 8)
    assert train.info.is_local
    with pytest.raises(ValueError, match="--image_column 'image'"):
        HFImageDataset(ds, "image", ImageTransform(8))


def test_a_class_label_column_is_recorded_and_its_being_ignored_is_logged(tmp_path, caplog):
    """imagefolder turns sub-folders into a ClassLabel column: the contract keeps it, the log says it is unused."""
    import logging

    from ddpm_hf.training.components import log_dataset

    for cls, value in (("cat", 40), ("dog", 200)):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((8, 8), value, np.uint8)).save(tmp_path / "imgs" / cls / f"{i}.png")
    ds = build_train_dataset(folder(tmp_path / "imgs"))
    assert ds.info.label_column == "label" and ds.info.class_names == ("cat", "dog")
    # each label matches its image: the cat folder's images are the dark ones
    dark = [bool(ds[i].mean() < 0) for i in range(len(ds))]
    assert [ds.info.class_names[label] == "cat" for label in ds.info.labels.tolist()] == dark
    with caplog.at_level(logging.INFO, logger="ddpm_hf.train"):
        log_dataset(ds)
    assert "Label column 'label' found (2 classes): ignored" in caplog.text
