"""Training data: the built-in digits, image-mode conversion, transforms, folders with bad files, data order."""

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_hf.data import (DigitsDataset, EpochShuffleSampler, HFImageDataset, ImageTransform, build_train_dataset,
                          load_digits_tensor, pil_to_float)


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


def test_sampler_depends_only_on_seed_and_epoch():
    s = EpochShuffleSampler(10, seed=3)
    first = list(s)
    assert sorted(first) == list(range(10)) and list(s) == first
    s.set_epoch(1)
    assert list(s) != first
    again = EpochShuffleSampler(10, seed=3)
    again.set_epoch(1)
    assert list(again) == list(s)


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


def test_image_folder_skips_and_counts_unreadable_files(tmp_path):
    _write_folder(tmp_path / "imgs")
    ds = build_train_dataset(None, str(tmp_path / "imgs"), 8, center_crop=True, random_flip=False)
    assert isinstance(ds, HFImageDataset)
    assert len(ds) == 5 and ds.num_skipped == 2 and ds.num_channels == 3
    batch = torch.stack([ds[i] for i in range(len(ds))])
    assert batch.shape == (5, 3, 8, 8) and batch.min() >= -1 and batch.max() <= 1
    gray = build_train_dataset(None, str(tmp_path / "imgs"), 8, True, False, num_channels=1)
    assert gray[0].shape == (1, 8, 8)


def test_bad_sources_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="train_data_dir"):
        build_train_dataset(None, str(tmp_path / "empty"), 8, True, False)
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("hello")
    with pytest.raises(ValueError, match="train_data_dir"):
        build_train_dataset(None, str(tmp_path / "texts"), 8, True, False)
    (tmp_path / "allbad").mkdir()
    (tmp_path / "allbad" / "x.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="could be read"):
        build_train_dataset(None, str(tmp_path / "allbad"), 8, True, False)
    with pytest.raises(ValueError, match="not a directory"):
        build_train_dataset(None, str(tmp_path / "missing"), 8, True, False)
    with pytest.raises(ValueError, match="not both"):
        build_train_dataset("x", str(tmp_path / "empty"), 8, True, False)
    with pytest.raises(ValueError, match="num_channels"):
        build_train_dataset(None, None, 8, True, False, num_channels=3)


def test_dataset_name_loads_a_local_dataset_with_a_custom_column(tmp_path):
    import datasets

    _write_folder(tmp_path / "imgs", with_bad=False)
    files = sorted(str(p) for p in (tmp_path / "imgs").iterdir())
    ds = datasets.Dataset.from_dict({"picture": files}).cast_column("picture", datasets.Image())
    (tmp_path / "local").mkdir()
    ds.to_parquet(str(tmp_path / "local" / "train.parquet"))
    train = build_train_dataset(str(tmp_path / "local"), None, 8, True, False, image_column="picture",
                                cache_dir=str(tmp_path / "cache"))
    assert len(train) == 5 and train.num_channels == 3 and train[0].shape == (3, 8, 8)
    with pytest.raises(ValueError, match="--image_column 'image'"):
        HFImageDataset(ds, "image", ImageTransform(8))
