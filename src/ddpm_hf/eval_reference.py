"""The real images a model is evaluated against, and the images training holds out to make them.

One function, `build_eval_reference`, serves ``--eval`` at the end of training and ``python -m
ddpm_hf.evaluate`` on an export; both rebuild the same images from the run's data flags. In order:

1. ``--eval_data_dir``: a folder of images (datasets' imagefolder);
2. the built-in digits: their fixed, stratified "test" split, which training never sees;
3. the source's own test or validation split, if it has one;
4. else the images held out from the training source (`holdout_indices`): ``--eval_holdout`` of them, by
   default 10 % (at most 2,048) of a source of at least 100 images, chosen with a fixed seed and stratified by
   class when the source has labels, so every run on that source, whatever its seed, holds out the same ones.
   Training never sees them (as transformers' image-classification example holds out ``train_val_split``).
5. A smaller source holds nothing out: it is scored against its training images, and the card says so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .data import DataConfig, ImageTransform, digits_real_images

logger = logging.getLogger(__name__)

EVAL_SPLITS = ("test", "validation", "valid", "val")  # a source's own held-out splits, in order of preference
HOLDOUT_FRACTION = 0.1
HOLDOUT_MAX = 2048
HOLDOUT_MIN_SOURCE = 100  # smaller sources hold nothing out by default (an FID of a few dozen images says little)
HOLDOUT_SEED = 0
MIN_REFERENCE = 4  # evaluate_pipeline splits the reference into two halves of at least 2
REFERENCE_LIMIT = 2048  # reference images decoded at most


@dataclass(frozen=True)
class EvalReference:
    """Real images to score samples against.

    Args:
        images: ``(N, C, H, W)`` in [-1, 1].
        labels: the class of each image (int64, in the training's class ids), or None.
        description: what they are, in words (the model card's "against" text).
        heldout: whether training never saw them.
    """

    images: torch.Tensor
    labels: torch.Tensor | None
    description: str
    heldout: bool


def _is_digits(config: DataConfig) -> bool:
    return config.dataset_name is None and config.train_data_dir is None


def eval_split_name(config: DataConfig) -> str | None:
    """The source's own test/validation split (`EVAL_SPLITS`), or None. Not looked up for ``--eval_data_dir``."""
    from .dataset_sources import split_names

    if config.eval_data_dir is not None or _is_digits(config):
        return None
    names = split_names(config)
    return next((name for name in EVAL_SPLITS if name in names), None)


def holdout_count(config: DataConfig, num_images: int) -> int:
    """How many of the source's ``num_images`` training images are held out (see the module docstring).

    Raises:
        ValueError: a bad ``--eval_holdout``, or one given where the reference comes from elsewhere.
    """
    requested = config.eval_holdout
    if requested is not None and (not isinstance(requested, int) or isinstance(requested, bool) or requested < 0):
        raise ValueError(f"--eval_holdout must be an int >= 0, got {requested!r}")
    split = eval_split_name(config)
    elsewhere = ("--eval_data_dir is given" if config.eval_data_dir is not None else
                 f"the source has a {split!r} split" if split else None)
    if elsewhere:
        if requested:
            raise ValueError(f"--eval_holdout {requested} would hold out images for nothing: {elsewhere}, which "
                             "evaluation scores against")
        return 0
    if requested is None:
        return min(round(HOLDOUT_FRACTION * num_images), HOLDOUT_MAX) if num_images >= HOLDOUT_MIN_SOURCE else 0
    if requested and not MIN_REFERENCE <= requested < num_images:
        raise ValueError(f"--eval_holdout {requested} must be 0, or at least {MIN_REFERENCE} (an FID needs them) "
                         f"and below the source's {num_images} images")
    return requested


def _stratify_labels(config: DataConfig, dataset: Any) -> np.ndarray | None:
    """The labels to stratify the hold-out by (the training labels, else a ClassLabel column), if usable."""
    from .image_dataset import find_labels

    if config.class_conditional and config.label_column in dataset.column_names:
        labels = np.asarray(dataset[config.label_column])
    else:
        labels = find_labels(dataset, config.image_column)[1]
        labels = None if labels is None else np.asarray(labels)
    if labels is None or labels.dtype.kind not in "iu" or np.bincount(labels - labels.min()).min(initial=2) < 2:
        return None
    return labels


def holdout_indices(config: DataConfig, dataset: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(train, heldout)``: sorted indices into ``dataset`` (the source's train split), fixed by `HOLDOUT_SEED`.

    Args:
        config: the data flags (``eval_holdout``, ``eval_data_dir``, the label column).
        dataset: the source's `datasets.Dataset`.

    Returns:
        The indices training uses and those it holds out (empty when nothing is held out).
    """
    from sklearn.model_selection import train_test_split

    everything = np.arange(len(dataset))
    count = holdout_count(config, len(dataset))
    if count == 0:
        return everything, everything[:0]
    labels = _stratify_labels(config, dataset)
    classes = 0 if labels is None else len(np.unique(labels))
    stratify = labels if labels is not None and classes <= min(count, len(dataset) - count) else None
    train, heldout = train_test_split(everything, test_size=count, stratify=stratify, random_state=HOLDOUT_SEED)
    return np.sort(train), np.sort(heldout)


def training_split_text(source: str, num_train: int, num_heldout: int) -> str:
    """The training images in words, e.g. "1,843 of the 2,048 images of --train_data_dir 'x' (205 held out ...)"."""
    if not num_heldout:
        return f"the 'train' split of {source}"
    return (f"{num_train:,} of the {num_train + num_heldout:,} images of {source} ({num_heldout:,} held out for "
            f"evaluation, seed {HOLDOUT_SEED})")


def build_eval_reference(config: DataConfig, num_channels: int, class_names: tuple[str, ...] | None = None,
                         num_heldout: int | None = None, limit: int = REFERENCE_LIMIT) -> EvalReference:
    """The reference images of the module docstring's order, prepared like the training images (centre crop).

    Args:
        config: the run's data flags.
        num_channels: the model's channels.
        class_names: the training classes (class-conditional runs: reference labels are mapped to them by name).
        num_heldout: the hold-out the run recorded; a source that now gives another count is refused.
        limit: at most this many images are read.

    Returns:
        The `EvalReference`.

    Raises:
        ValueError: no usable reference, or the source changed since training, naming the flag.
    """
    from .dataset_sources import load_source, source_text

    if config.eval_data_dir is not None:
        where = f"--eval_data_dir {config.eval_data_dir!r}"
        try:
            folder = load_source(DataConfig(train_data_dir=config.eval_data_dir, cache_dir=config.cache_dir))
        except ValueError as err:  # name the flag the user gave
            raise ValueError(str(err).replace("--train_data_dir", "--eval_data_dir")) from None
        images, labels = _read(folder.select(range(min(limit, len(folder)))), where,
                               "image", "label" if config.class_conditional else None, config, num_channels,
                               class_names)
        return EvalReference(images, labels, f"{len(images):,} images of --eval_data_dir {config.eval_data_dir!r}",
                             True)
    if _is_digits(config):
        from .class_metrics import digits_real_labels

        images = digits_real_images("test", config.resolution, num_channels)
        return EvalReference(images, digits_real_labels("test"),
                             f"the {len(images):,} digits of the fixed test split (held out from training)", True)
    source, split = source_text(config), eval_split_name(config)
    label_column = config.label_column if config.class_conditional else None
    if split is not None:
        images, labels = _read(_first(config, split, limit), f"the {split!r} split of {source}",
                               config.image_column, label_column, config, num_channels, class_names)
        return EvalReference(images, labels, f"{len(images):,} images of the {split!r} split of {source} (held "
                                             "out from training)", True)
    if config.streaming:  # a stream holds nothing out: its first images, which training sees too
        images, labels = _read(_first(config, "train", limit), source, config.image_column, label_column, config,
                               num_channels, class_names)
        logger.warning("Evaluating against training images: --streaming holds nothing out and %s has no test split "
                       "(pass --eval_data_dir)", source)
        return EvalReference(images, labels, f"the first {len(images):,} training images (not held out)", False)
    return _heldout_reference(config, num_channels, class_names, num_heldout, limit)


def _heldout_reference(config: DataConfig, num_channels: int, class_names: tuple[str, ...] | None,
                       num_heldout: int | None, limit: int) -> EvalReference:
    """The images `holdout_indices` holds out of the training source (or, with none, training images)."""
    from .dataset_sources import load_source, source_text

    source = source_text(config)
    label_column = config.label_column if config.class_conditional else None
    dataset = load_source(config)
    train, heldout = holdout_indices(config, dataset)
    if num_heldout is not None and len(heldout) != num_heldout:
        raise ValueError(f"{source} now holds {len(dataset)} images, of which {len(heldout)} would be held out, but "
                         f"training held out {num_heldout}: the source changed; pass --eval_data_dir")
    chosen = heldout if len(heldout) else train
    images, labels = _read(dataset.select(chosen[:limit]), source, config.image_column, label_column, config,
                           num_channels, class_names)
    if len(heldout):
        return EvalReference(images, labels, f"the {len(images):,} images of {source} held out from training "
                                             f"(seed {HOLDOUT_SEED})", True)
    logger.warning("Evaluating against training images: %s holds fewer than %d images and no test split, so none "
                   "were held out (pass --eval_data_dir, or --eval_holdout when training)", source, HOLDOUT_MIN_SOURCE)
    return EvalReference(images, labels, f"{len(images):,} of the training images (not held out)", False)


def _first(config: DataConfig, split: str, limit: int) -> Any:
    """The first ``limit`` rows of ``split`` as a map-style `datasets.Dataset` (streamed with --streaming, so a
    large source is not downloaded whole)."""
    import datasets

    from .dataset_sources import load_source

    if config.streaming:
        stream = load_source(config, streaming=True, split=split)
        return datasets.Dataset.from_list(list(stream.take(limit)), features=stream.features)
    dataset = load_source(config, split=split)
    return dataset.select(range(min(limit, len(dataset))))


def _read(dataset: Any, where: str, column: str, label_column: str | None, config: DataConfig, num_channels: int,
          class_names: tuple[str, ...] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Decode every image of ``dataset`` (and, with ``label_column``, its labels in the training's class ids)."""
    from .image_dataset import HFImageDataset

    images = HFImageDataset(dataset, column, ImageTransform(config.resolution, center_crop=True),
                            num_channels=num_channels, source=where, label_column=label_column)
    if len(images) < MIN_REFERENCE:
        raise ValueError(f"{where} gives {len(images)} evaluation image(s); an FID needs at least {MIN_REFERENCE}")
    tensor = torch.stack([images[i] for i in range(len(images))])
    if label_column is None:
        return tensor, None
    return tensor, _to_training_ids(images.labels, images.info.class_names, class_names, where)


def _to_training_ids(labels: torch.Tensor, names: tuple[str, ...] | None, training: tuple[str, ...] | None,
                     where: str) -> torch.Tensor:
    """Reference labels in the training's class ids, matched by class name."""
    if training is None or names is None or tuple(names) == tuple(training):
        return labels
    unknown = sorted(set(names) - set(training))
    if unknown:
        raise ValueError(f"{where} has classes the model was not trained on: {unknown}; its classes: {list(training)}")
    return torch.tensor([training.index(names[int(label)]) for label in labels], dtype=torch.long)
