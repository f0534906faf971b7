"""Training data: the built-in digits, `datasets` image sources, and PIL/torch transforms (no torchvision).

One contract for every source: a `TrainDataset` yields ``(C, resolution, resolution)`` float tensors in [-1, 1]
and describes itself with a `DatasetInfo` (size, channels, resolution, skipped files, optional labels and class
names, which split it is). `build_train_dataset` turns a `DataConfig` (the ``--dataset_name`` ... flags) into one.

Augmentation randomness is a pure function of ``(seed, epoch, index)`` rather than of a shared RNG, so a
resumed run sees the same crops and flips as an uninterrupted one even though data loaders prefetch batches
ahead of the step that a checkpoint records.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .class_labels import LabelledDataset, check_class_labels

logger = logging.getLogger(__name__)

DIGITS_NAME = "sklearn-digits"  # how model cards and logs name the built-in data
# The fixed, stratified held-out split of the built-in digits: training sees "train", evaluation scores "test".
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.25
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


# ---- the dataset contract ----------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """Where the training images come from and how they are prepared (the data flags of ``training/train.py``).

    Neither ``dataset_name`` nor ``train_data_dir``: the built-in digits (their fixed "train" split).
    """

    dataset_name: str | None = field(default=None, metadata={"help": "A `datasets` name or local path. Neither this "
                                     "nor --train_data_dir: the built-in sklearn digits (no download)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset's config name."})
    train_data_dir: str | None = field(default=None, metadata={"help": "A folder of images (datasets' imagefolder)."})
    image_column: str = field(default="image", metadata={"help": "The dataset column holding the images."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where `datasets` caches downloads."})
    resolution: int = field(default=16, metadata={"help": "Side of the square training images."})
    center_crop: bool = field(default=False, metadata={"help": "Centre crop (default: random crop)."})
    random_flip: bool = field(default=False, metadata={"help": "Random horizontal flips."})
    num_channels: int | None = field(default=None, metadata={"help": "1 or 3; default: from the data."})
    class_conditional: bool = field(default=False, metadata={"help": "Train on the data's class labels (the "
                                    "built-in digits' 10, --label_column of a dataset, an image folder's "
                                    "sub-folders), with a learned null class for classifier-free guidance."})
    label_column: str = field(default="label", metadata={"help": "The dataset column holding the class labels "
                              "(a ClassLabel feature, whose names become the class names, or integers 0..K-1)."})
    streaming: bool = field(default=False, metadata={"help": "Stream --dataset_name / --train_data_dir "
                            "(datasets' streaming=True: parquet, webdataset .tar, image folders, Hub names) instead "
                            "of loading it; needs --max_train_steps."})
    shuffle_buffer_size: int = field(default=1000, metadata={"help": "With --streaming: the shuffle buffer's size "
                                     "in examples (reshuffled every epoch with the run's seed)."})
    eval_data_dir: str | None = field(default=None, metadata={"help": "A folder of images --eval scores against "
                                      "(default: the data's test/validation split, else the images held out by "
                                      "--eval_holdout; the built-in digits: their test split)."})
    eval_holdout: int | None = field(default=None, metadata={"help": "Images of --dataset_name/--train_data_dir "
                                     "held out from training as the evaluation reference when the source has no "
                                     "test/validation split and no --eval_data_dir is given (a fixed, seeded "
                                     "choice, stratified by class when there are labels). Default: 10 %% of the "
                                     "images, at most 2,048, for sources of at least 100 images; else 0."})


@dataclass(frozen=True)
class DatasetInfo:
    """What the training loop, the logs and the model card know about a training set.

    Args:
        name: the source as the user named it (``DIGITS_NAME`` for the built-in digits).
        is_local: whether ``name`` is a local folder or file rather than a Hub dataset or the built-in digits.
        split: which images of the source are trained on, in words.
        num_images: readable images trained on.
        num_channels: 1 or 3.
        resolution: side of the square images.
        num_skipped: unreadable images left out.
        labels: the class of each image (int64, aligned with the dataset's indices), or None.
        label_column: where the labels came from, or None.
        class_names: the name of each class id, or None.
        num_heldout: images of the source held out from training as the evaluation reference (``--eval_holdout``).
    """

    name: str
    is_local: bool
    split: str
    num_images: int
    num_channels: int
    resolution: int
    num_skipped: int = 0
    labels: torch.Tensor | None = None
    label_column: str | None = None
    class_names: tuple[str, ...] | None = None
    num_heldout: int = 0


class TrainDataset(Protocol):
    """A map-style training set: ``info``, ``len``, ``(C, H, W)`` tensors in [-1, 1], ``set_epoch`` for augmentation."""

    info: DatasetInfo

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> torch.Tensor: ...

    def set_epoch(self, epoch: int) -> None: ...


# ---- datasets ----------------------------------------------------------------------------------------------------


class EpochDataset(torch.utils.data.Dataset):
    """Base for datasets whose random augmentation depends on the epoch set by ``set_epoch``."""

    def __init__(self, seed: int = 0):
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch``'s augmentation (or permutation) from now on."""
        self.epoch = int(epoch)


def digits_split_indices(split: str) -> np.ndarray:
    """Indices into ``sklearn.datasets.load_digits()`` of a fixed, stratified split.

    Args:
        split: ``"train"`` (75 %), ``"test"`` (25 %) or ``"all"``.

    Returns:
        Sorted int64 indices.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    labels = load_digits().target
    if split == "all":
        return np.arange(len(labels))
    if split not in ("train", "test"):
        raise ValueError(f"split must be one of ('train', 'test', 'all'), got {split!r}")
    train, test = train_test_split(np.arange(len(labels)), test_size=DIGITS_TEST_FRACTION, stratify=labels,
                                   random_state=DIGITS_SPLIT_SEED)
    return np.sort(train if split == "train" else test)


def digits_real_images(split: str, resolution: int, num_channels: int = 1) -> torch.Tensor:
    """The built-in digits of ``split`` exactly as training sees them, channels repeated to ``num_channels``."""
    images = load_digits_tensor(resolution)[torch.from_numpy(digits_split_indices(split))]
    return images.expand(-1, num_channels, -1, -1).contiguous()


def digits_split_text() -> str:
    """The built-in digits' training split in words, e.g. "1,347 of the 1,797 digits (stratified 75 %, ...)"."""
    train, total = len(digits_split_indices("train")), len(digits_split_indices("all"))
    return (f"the fixed 'train' split: {train:,} of the {total:,} digits (stratified "
            f"{100 * (1 - DIGITS_TEST_FRACTION):g} %, seed {DIGITS_SPLIT_SEED}); {total - train:,} held out")


class DigitsDataset(EpochDataset):
    """The built-in digits of one fixed split; ``random_flip`` flips per (seed, epoch, index).

    The split is `digits_split_indices`: training uses "train" only, so that evaluation can
    score against "test" images the model never saw.

    Args:
        resolution: side length (see `load_digits_tensor`).
        random_flip: horizontal flips (off by default: digits are not mirror-symmetric).
        seed: base seed of the flips.
        split: "train", "test" or "all".
    """

    def __init__(self, resolution: int = 16, random_flip: bool = False, seed: int = 0, split: str = "train"):
        super().__init__(seed)
        from sklearn.datasets import load_digits

        indices = torch.from_numpy(digits_split_indices(split))
        self.images = load_digits_tensor(resolution)[indices]
        self.random_flip = random_flip
        self.info = DatasetInfo(
            name=DIGITS_NAME, is_local=False, split=digits_split_text() if split == "train" else f"'{split}' split",
            num_images=len(indices), num_channels=1, resolution=resolution,
            labels=torch.from_numpy(load_digits().target)[indices].long(), label_column="target",
            class_names=tuple(str(digit) for digit in range(10)))

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        image = self.images[index]
        if self.random_flip and bool(torch.rand((), generator=item_generator(self.seed, self.epoch, index)) < 0.5):
            image = image.flip(-1)
        return image


def open_image(record: Any) -> Image.Image:
    """Decode one image from a `datasets` record: {'bytes', 'path'} dict, a path, raw bytes, or a PIL image."""
    if isinstance(record, Image.Image):
        image = record
    elif isinstance(record, dict) and record.get("bytes") is not None:
        image = Image.open(io.BytesIO(record["bytes"]))
    elif isinstance(record, dict) and record.get("path"):
        image = Image.open(record["path"])
    elif isinstance(record, str):
        image = Image.open(record)
    elif isinstance(record, (bytes, bytearray)):
        image = Image.open(io.BytesIO(record))
    else:
        raise TypeError(f"cannot read an image from a {type(record).__name__}")
    image.load()
    return image


_open_image = open_image  # the name of the first version, which the streaming code may still import


def build_train_dataset(config: DataConfig, seed: int = 0) -> TrainDataset:
    """The training dataset ``config`` asks for: the built-in digits' "train" split when it names no source.

    A `datasets` source (`ddpm_hf.dataset_sources.load_source`) is decoded lazily
    (`ddpm_hf.image_dataset.HFImageDataset`), less the images `ddpm_hf.eval_reference.holdout_indices` holds
    out for evaluation.

    Args:
        config: the data flags.
        seed: base seed of the random crops and flips.

    Returns:
        A `TrainDataset` whose items are ``(C, resolution, resolution)`` float tensors in [-1, 1]; with
        ``class_conditional``, a `LabelledDataset` of (image, label) `LabelledSample` items.

    Raises:
        ValueError: a bad source, or (class-conditional) labels that are missing or invalid, naming the column.
    """
    if config.dataset_name is None and config.train_data_dir is None:
        if config.num_channels not in (None, 1):
            raise ValueError(f"the built-in digits have 1 channel; --num_channels {config.num_channels} is not "
                             "possible")
        dataset = DigitsDataset(config.resolution, random_flip=config.random_flip, seed=seed)
    else:
        if config.dataset_name is not None and config.train_data_dir is not None:
            raise ValueError("give --dataset_name or --train_data_dir, not both")
        dataset = _image_source_dataset(config, seed)
    if not config.class_conditional:
        return dataset
    check_class_labels(dataset.info.labels, dataset.info.class_names, dataset.info.label_column)
    return LabelledDataset(dataset)


def _image_source_dataset(config: DataConfig, seed: int) -> TrainDataset:
    """The lazy training set of a `datasets` source, less its held-out images."""
    from .dataset_sources import is_local_source, load_source, source_name, source_text
    from .eval_reference import holdout_indices, training_split_text
    from .image_dataset import HFImageDataset

    source, name = source_text(config), source_name(config)
    hf_dataset = load_source(config)
    train, heldout = holdout_indices(config, hf_dataset)
    if len(heldout):
        hf_dataset = hf_dataset.select(train)
    transform = ImageTransform(config.resolution, center_crop=config.center_crop, random_flip=config.random_flip)
    return HFImageDataset(hf_dataset, config.image_column, transform, num_channels=config.num_channels, seed=seed,
                          source=source, name=name, is_local=is_local_source(config),
                          label_column=config.label_column if config.class_conditional else None,
                          split=training_split_text(source, len(train), len(heldout)), num_heldout=len(heldout))
