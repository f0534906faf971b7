"""Training data: the built-in digits, `datasets` image sources, and PIL/torch transforms (no torchvision).

Augmentation randomness is a pure function of ``(seed, epoch, index)`` rather than of a shared RNG, so a
resumed run sees the same crops and flips as an uninterrupted one even though data loaders prefetch batches
ahead of the step that a checkpoint records.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

logger = logging.getLogger(__name__)

DIGITS_NAME = "sklearn-digits"  # how model cards and logs name the built-in data
# PIL modes that carry a single intensity channel (plus, for LA, alpha).
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N"}


# ---- the built-in digits -----------------------------------------------------------------------------------------


def load_digits_tensor(resolution: int = 16) -> torch.Tensor:
    """scikit-learn's 1,797 real 8x8 digits as a float32 tensor ``(N, 1, resolution, resolution)`` in [-1, 1].

    The digits ship inside scikit-learn (no download). Their 17 grey levels (0..16) are mapped to [0, 1] and
    upscaled bilinearly, which keeps strokes smooth where nearest-neighbour would make 2x2 blocks.

    Args:
        resolution: output side length, at least 8.

    Returns:
        The image tensor, in sklearn's order.
    """
    if not isinstance(resolution, int) or isinstance(resolution, bool) or resolution < 8:
        raise ValueError(f"resolution must be an int >= 8 for the built-in digits, got {resolution!r}")
    from sklearn.datasets import load_digits

    images = torch.from_numpy(load_digits().images.astype(np.float32) / 16.0).unsqueeze(1)
    if resolution != 8:
        images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return (images.clamp(0, 1) * 2 - 1).contiguous()


# ---- per-image conversion ----------------------------------------------------------------------------------------


def is_gray(image: Image.Image) -> bool:
    """Whether a PIL image has one intensity channel (palette images count as colour)."""
    return image.mode in _GRAY_MODES


def pil_to_float(image: Image.Image, num_channels: int) -> torch.Tensor:
    """Convert any PIL image to a float32 ``(num_channels, H, W)`` tensor in [0, 1].

    RGB/L pass through; RGBA/LA/PA and palette images with transparency are composited onto white (a
    transparent pixel has no colour of its own); 16-bit and 32-bit integer grey images are scaled by their
    bit depth rather than clipped at 255; colour images become grey with ITU-R 601 luma weights when
    ``num_channels == 1``, grey images are repeated to 3 channels when ``num_channels == 3``.

    Args:
        image: a loaded PIL image.
        num_channels: 1 or 3.

    Returns:
        The image as a float tensor.
    """
    if num_channels not in (1, 3):
        raise ValueError(f"num_channels must be 1 or 3, got {num_channels!r}")
    mode = image.mode
    if mode == "P" or mode == "PA":
        image = image.convert("RGBA")
    elif mode == "1":
        image = image.convert("L")
    elif mode not in _GRAY_MODES and mode not in ("RGB", "RGBA"):
        image = image.convert("RGB")  # CMYK, YCbCr, LAB, HSV, ...
    mode = image.mode
    array = np.asarray(image)
    if mode in _SIXTEEN_BIT_MODES:
        array = array.astype(np.float32) / 65535.0
    elif mode == "I":
        # 32-bit ints: PIL's decoding of 16-bit PNGs on some versions; 8-bit data stored as I stays 8-bit.
        array = array.astype(np.float32)
        array = array / (65535.0 if array.max(initial=0) > 255 else 255.0)
    elif mode == "F":
        array = array.astype(np.float32)
    else:
        array = array.astype(np.float32) / 255.0
    if array.ndim == 2:
        array = array[:, :, None]
    if mode in ("RGBA", "LA"):
        alpha = array[:, :, -1:]
        array = array[:, :, :-1] * alpha + (1.0 - alpha)
    tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).clamp(0, 1)
    if tensor.shape[0] == 3 and num_channels == 1:
        weights = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
        tensor = (tensor * weights).sum(0, keepdim=True)
    elif tensor.shape[0] == 1 and num_channels == 3:
        tensor = tensor.expand(3, -1, -1)
    return tensor.contiguous()


def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator for one sample's augmentation, a pure function of (seed, epoch, index)."""
    # Large odd multipliers keep nearby (epoch, index) pairs on unrelated seeds.
    mixed = (seed * 0x9E3779B1 + epoch * 0x85EBCA77 + index * 0xC2B2AE3D) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


@dataclass
class ImageTransform:
    """Resize the shorter side to ``resolution``, crop to a square, optionally flip, map to [-1, 1].

    Args:
        resolution: output side length.
        center_crop: centre crop if True, else a random crop.
        random_flip: flip horizontally with probability 1/2.
    """

    resolution: int
    center_crop: bool = True
    random_flip: bool = False

    def __call__(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Transform a ``(C, H, W)`` tensor in [0, 1]; ``generator`` drives the random crop and flip."""
        _, height, width = image.shape
        scale = self.resolution / min(height, width)
        if (height, width) != (self.resolution, self.resolution) or scale != 1:
            size = (max(self.resolution, round(height * scale)), max(self.resolution, round(width * scale)))
            # antialias matters when shrinking photos; bilinear like diffusers' example.
            image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False,
                                  antialias=scale < 1)[0]
        image = self._crop(image, generator)
        if self.random_flip and bool(torch.rand((), generator=generator) < 0.5):
            image = image.flip(-1)
        return (image.clamp(0, 1) * 2 - 1).contiguous()

    def _crop(self, image: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        _, height, width = image.shape
        extra_h, extra_w = height - self.resolution, width - self.resolution
        if self.center_crop:
            top, left = extra_h // 2, extra_w // 2
        else:
            top = int(torch.randint(extra_h + 1, (), generator=generator))
            left = int(torch.randint(extra_w + 1, (), generator=generator))
        return image[:, top : top + self.resolution, left : left + self.resolution]


# ---- datasets ----------------------------------------------------------------------------------------------------


class EpochDataset(torch.utils.data.Dataset):
    """Base for datasets whose random augmentation depends on the epoch set by ``set_epoch``."""

    def __init__(self, seed: int = 0):
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)


class DigitsDataset(EpochDataset):
    """The built-in digits; ``random_flip`` flips per (seed, epoch, index).

    Args:
        resolution: side length (see `load_digits_tensor`).
        random_flip: horizontal flips (off by default: digits are not mirror-symmetric).
        seed: base seed of the flips.
    """

    def __init__(self, resolution: int = 16, random_flip: bool = False, seed: int = 0):
        super().__init__(seed)
        self.images = load_digits_tensor(resolution)
        self.random_flip = random_flip

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        image = self.images[index]
        if self.random_flip and bool(torch.rand((), generator=item_generator(self.seed, self.epoch, index)) < 0.5):
            image = image.flip(-1)
        return image


def _open_image(record: Any) -> Image.Image:
    """Decode one image from a `datasets` record: {'bytes', 'path'} dict, a path, or a PIL image."""
    if isinstance(record, Image.Image):
        image = record
    elif isinstance(record, dict) and record.get("bytes") is not None:
        image = Image.open(io.BytesIO(record["bytes"]))
    elif isinstance(record, dict) and record.get("path"):
        image = Image.open(record["path"])
    elif isinstance(record, str):
        image = Image.open(record)
    else:
        raise TypeError(f"cannot read an image from a {type(record).__name__}")
    image.load()
    return image


class HFImageDataset(EpochDataset):
    """Images from a `datasets.Dataset` column, skipping unreadable files (counted in ``num_skipped``).

    Every image is decoded once up front: the unreadable ones are known (and logged) before training
    starts, the batch size never changes mid-epoch, and the number of channels can come from the data.

    Args:
        dataset: a `datasets.Dataset`.
        image_column: the column that holds the images.
        transform: the `ImageTransform` to apply.
        num_channels: 1 or 3, or None to use 1 when every image is grey and 3 otherwise.
        seed: base seed of the random crops and flips.
        source: where the images come from (a flag and its value), for error messages.
    """

    def __init__(self, dataset: Any, image_column: str, transform: ImageTransform,
                 num_channels: int | None = None, seed: int = 0, source: str = "the dataset"):
        super().__init__(seed)
        if image_column not in dataset.column_names:
            raise ValueError(
                f"--image_column {image_column!r} is not a column of the dataset; columns: {dataset.column_names}"
            )
        import datasets

        if isinstance(dataset.features[image_column], datasets.Image):
            dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        self.records = dataset[image_column]
        self.transform = transform
        self.valid: list[int] = []
        any_colour = False
        first_error = None
        for i, record in enumerate(self.records):
            try:
                any_colour |= not is_gray(_open_image(record))
            except Exception as err:  # any decoder failure means "unreadable": PIL raises many types
                logger.debug("skipping unreadable image %d: %s", i, err)
                if first_error is None:
                    first_error = err
                continue
            self.valid.append(i)
        self.num_skipped = len(self.records) - len(self.valid)
        if self.num_skipped:
            logger.warning("Skipped %d unreadable image(s) of %d in %s", self.num_skipped, len(self.records), source)
        if not self.valid:
            raise ValueError(f"none of the {len(self.records)} images in {source} (column {image_column!r}) could "
                             f"be read; the first error: {type(first_error).__name__}: {first_error}")
        self.num_channels = num_channels if num_channels is not None else (3 if any_colour else 1)

    def __len__(self) -> int:
        return len(self.valid)

    def __getitem__(self, index: int) -> torch.Tensor:
        source = self.valid[index]
        image = pil_to_float(_open_image(self.records[source]), self.num_channels)
        needs_rng = self.transform.random_flip or not self.transform.center_crop
        generator = item_generator(self.seed, self.epoch, index) if needs_rng else None
        return self.transform(image, generator)


def _source(dataset_name: str | None, train_data_dir: str | None) -> str:
    """The flag and value the images come from, as error messages name it."""
    if train_data_dir is not None:
        return f"--train_data_dir {train_data_dir!r}"
    return f"--dataset_name {dataset_name!r}"


def load_hf_dataset(dataset_name: str | None, train_data_dir: str | None, dataset_config_name: str | None = None,
                    cache_dir: str | None = None) -> Any:
    """Load the ``train`` split through `datasets.load_dataset` (a name or local path, or an imagefolder).

    Raises:
        ValueError: when the source is missing, empty, or holds no images.
    """
    import datasets

    source = _source(dataset_name, train_data_dir)
    if train_data_dir is not None:
        import os

        if not os.path.isdir(train_data_dir):
            raise ValueError(f"{source} is not a directory")
        path, name, data_dir = "imagefolder", None, train_data_dir
    else:
        path, name, data_dir = dataset_name, dataset_config_name, None
    try:
        dataset = datasets.load_dataset(path, name, data_dir=data_dir, cache_dir=cache_dir, split="train")
    except (FileNotFoundError, ValueError, datasets.exceptions.DataFilesNotFoundError) as err:
        raise ValueError(f"could not load images from {source}: {err}") from err
    if len(dataset) == 0:
        raise ValueError(f"{source} holds no images")
    return dataset


def build_train_dataset(dataset_name: str | None, train_data_dir: str | None, resolution: int,
                        center_crop: bool, random_flip: bool, image_column: str = "image",
                        num_channels: int | None = None, seed: int = 0, dataset_config_name: str | None = None,
                        cache_dir: str | None = None) -> EpochDataset:
    """The training dataset the flags ask for: the built-in digits when neither source is given.

    Returns:
        An `EpochDataset` whose items are ``(C, resolution, resolution)`` float tensors in [-1, 1]; it has a
        ``num_channels`` attribute.
    """
    if dataset_name is None and train_data_dir is None:
        if num_channels not in (None, 1):
            raise ValueError(f"the built-in digits have 1 channel; --num_channels {num_channels} is not possible")
        dataset = DigitsDataset(resolution, random_flip=random_flip, seed=seed)
        dataset.num_channels = 1
        return dataset
    if dataset_name is not None and train_data_dir is not None:
        raise ValueError("give --dataset_name or --train_data_dir, not both")
    hf_dataset = load_hf_dataset(dataset_name, train_data_dir, dataset_config_name, cache_dir)
    transform = ImageTransform(resolution, center_crop=center_crop, random_flip=random_flip)
    return HFImageDataset(hf_dataset, image_column, transform, num_channels=num_channels, seed=seed,
                          source=_source(dataset_name, train_data_dir))


class EpochShuffleSampler(torch.utils.data.Sampler):
    """A random permutation per epoch that depends only on (seed, epoch), identical on every process.

    ``accelerate`` shards the batches drawn from it and calls ``set_epoch`` before each pass; a resumed run
    therefore replays exactly the order of an uninterrupted one.
    """

    def __init__(self, num_samples: int, seed: int = 0):
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())
