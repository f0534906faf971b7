"""A map-style training set over a `datasets` image column that decodes each image when it is asked for.

Construction reads no image data but a few images to choose the channel count, so memory does not grow with
the number of images (the Arrow table stays memory-mapped). An unreadable image is met during training, not in
a pre-pass: it is replaced by the next readable image (of the same class when training on labels), so every
batch keeps its size and a resumed run sees exactly the images an uninterrupted one sees, and it is counted in
``num_skipped_seen`` (saved in checkpoints through ``state_dict``).

Counting rule: an unreadable image is counted when it is met in the first epoch, in which every image is met
exactly once across all processes (except the few images accelerate repeats to even out the last batch across
processes: an unreadable one among them is counted by each process that meets it); later epochs meet the same
files again and replace them without counting.
The per-image state lives in a shared-memory tensor, so ``--dataloader_num_workers`` worker processes update
the count the training process reads.

Why not datasets' ``set_transform``: it decodes whole batches in one call, so one unreadable file fails the
access, and it cannot see the (seed, epoch, index) the augmentation is a function of.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from .class_labels import read_label_column
from .data import DatasetInfo, EpochDataset, ImageTransform, is_gray, item_generator, open_image, pil_to_float

logger = logging.getLogger(__name__)

PROBE_READABLE = 16  # readable images decoded at construction to choose the channel count
PROBE_ATTEMPTS = 64  # records tried at most for them
NAMED_SKIPS = 5  # unreadable images named in the log (per process); the rest are counted only
# PIL modes of a datasets.Image(mode=...) feature that have one channel.
_GRAY_FEATURE_MODES = {"1", "L", "LA", "I", "I;16", "F"}
_UNKNOWN, _UNREADABLE, _COUNTED = 0, 1, 2  # per-image state: readable or not met yet / unreadable / counted


def find_labels(dataset: Any, image_column: str) -> tuple[str | None, list[int] | None, tuple[str, ...] | None]:
    """The first class-label column of a `datasets.Dataset` (a ``ClassLabel`` feature, e.g. imagefolder's
    ``label``): ``(column, labels, class_names)``, or three Nones. What unconditional training records (and
    reports as ignored)."""
    import datasets

    for name, feature in dataset.features.items():
        if name != image_column and isinstance(feature, datasets.ClassLabel):
            labels = list(dataset[name])
            # imagefolder with train/ and test/ folders declares their names as classes, every label None
            if None not in labels:
                return name, labels, tuple(feature.names)
    return None, None, None


def check_image_column(dataset: Any, image_column: str, source: str) -> None:
    """Refuse a missing column, or one that holds no images (an ``Image`` feature, file paths or bytes).

    Raises:
        ValueError: naming ``--image_column``, the source, the column's type and the image columns there are.
    """
    import datasets

    features = dataset.features
    if image_column not in features:
        raise ValueError(f"--image_column {image_column!r} is not a column of {source}; columns: "
                         f"{list(features)}")
    feature = features[image_column]
    if isinstance(feature, datasets.Image):
        return
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string", "binary", "large_binary"):
        return
    if isinstance(feature, dict) and ("bytes" in feature or "path" in feature):
        return
    images = [name for name, f in features.items() if isinstance(f, datasets.Image)]
    raise ValueError(f"--image_column {image_column!r} of {source} holds {feature}, not images (an Image feature, "
                     f"file paths or bytes); image columns there: {images or 'none'}")


def record_name(record: Any, index: int) -> str:
    """A file path for the log, or ``#<index>`` for embedded bytes."""
    if isinstance(record, dict) and record.get("path"):
        return repr(record["path"])
    return repr(record) if isinstance(record, str) else f"#{index}"


class HFImageDataset(EpochDataset):
    """Images of a `datasets.Dataset` column, decoded lazily; unreadable ones replaced and counted as met.

    Args:
        dataset: a `datasets.Dataset`.
        image_column: the column that holds the images.
        transform: the `ImageTransform` to apply.
        num_channels: 1 or 3, or None: the ``Image`` feature's mode if it declares one, else 1 when the first
            `PROBE_READABLE` readable images are all grey and 3 otherwise.
        seed: base seed of the random crops and flips.
        source: where the images come from (a flag and its value), for messages.
        name: the source as the user named it, for ``info``.
        is_local: whether ``name`` is a local path.
        label_column: the column whose labels class-conditional training needs (missing or bad labels are an
            error; an unreadable image is then replaced by one of its class); None records the first
            ``ClassLabel`` column, if any, without using it.
        split: which images these are, in words (``info.split``).
        num_heldout: images of the source held out for evaluation (``info.num_heldout``).
    """

    def __init__(self, dataset: Any, image_column: str, transform: ImageTransform,
                 num_channels: int | None = None, seed: int = 0, source: str = "the dataset",
                 name: str = "dataset", is_local: bool = True, label_column: str | None = None,
                 split: str | None = None, num_heldout: int = 0):
        super().__init__(seed)
        import datasets

        check_image_column(dataset, image_column, source)
        if len(dataset) == 0:
            raise ValueError(f"{source} holds no images")
        feature = dataset.features[image_column]
        if isinstance(feature, datasets.Image):
            dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        self.match_labels = label_column is not None
        if label_column is not None:
            labels, class_names = read_label_column(dataset, label_column, source)
        else:
            label_column, labels, class_names = find_labels(dataset, image_column)
        self.images = dataset.select_columns([image_column])  # rows are read from the Arrow table on demand
        self.image_column = image_column
        self.transform = transform
        self.source = source
        self.labels = torch.tensor(labels, dtype=torch.long) if labels is not None else None
        # Shared memory: DataLoader worker processes mark images in the tensor the training process reads.
        self.state = torch.zeros(len(dataset), dtype=torch.int8).share_memory_()
        self._errors: dict[int, str] = {}  # the decode error of each unreadable image met by this process
        mode = getattr(feature, "mode", None)
        probed = self._probe()
        if num_channels is None:
            num_channels = (1 if mode in _GRAY_FEATURE_MODES else 3) if mode else (1 if all(probed) else 3)
        self.info = DatasetInfo(
            name=name, is_local=is_local, split=split or f"the 'train' split of {source}", num_images=len(dataset),
            num_channels=num_channels, resolution=transform.resolution, labels=self.labels,
            label_column=label_column, class_names=class_names, num_heldout=num_heldout)

    def _record(self, index: int) -> Any:
        return self.images[index][self.image_column]

    def _probe(self) -> list[bool]:
        """Decode the first readable images (at most `PROBE_ATTEMPTS` tried): whether each is grey.

        Raises:
            ValueError: none of those tried could be read, with the first error.
        """
        grey: list[bool] = []
        first_error = None
        tried = min(PROBE_ATTEMPTS, len(self.state))
        for index in range(tried):
            try:
                grey.append(is_gray(open_image(self._record(index))))
            except Exception as err:  # any decoder failure means "unreadable": PIL raises many types
                self._mark_unreadable(index, err)
                first_error = first_error or err
                continue
            if len(grey) == PROBE_READABLE:
                break
        if not grey:
            what = f"none of the {tried} images" if tried == len(self.state) else f"none of the first {tried} images"
            raise ValueError(f"{what} in {self.source} (column {self.image_column!r}) could be read; the first "
                             f"error: {type(first_error).__name__}: {first_error}")
        return grey

    @property
    def num_skipped_seen(self) -> int:
        """Unreadable images this process has met (and replaced) so far; the training loop sums the processes."""
        return int((self.state == _COUNTED).sum())

    def state_dict(self) -> dict[str, Any]:
        """The count and which images are known to be unreadable, as JSON values (saved per process)."""
        return {"num_skipped_seen": self.num_skipped_seen,
                "counted": torch.nonzero(self.state == _COUNTED).flatten().tolist(),
                "unreadable": torch.nonzero(self.state == _UNREADABLE).flatten().tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict`'s values (in place: worker processes keep sharing the tensor).

        Raises:
            ValueError: the state names images this dataset does not have.
        """
        indices = list(state.get("counted", [])) + list(state.get("unreadable", []))
        if any(not isinstance(i, int) or not 0 <= i < len(self.state) for i in indices):
            raise ValueError(f"the saved data state names images outside the {len(self.state)} of {self.source}")
        self.state.zero_()
        self.state[torch.tensor(state.get("unreadable", []), dtype=torch.long)] = _UNREADABLE
        self.state[torch.tensor(state.get("counted", []), dtype=torch.long)] = _COUNTED

    def __len__(self) -> int:
        return len(self.state)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = pil_to_float(self._readable(index), self.info.num_channels)
        needs_rng = self.transform.random_flip or not self.transform.center_crop
        generator = item_generator(self.seed, self.epoch, index) if needs_rng else None
        return self.transform(image, generator)

    def _readable(self, index: int) -> Any:
        """Image ``index`` decoded, or the next readable one (cyclically; of the same class with labels)."""
        count = len(self.state)
        for step in range(count):
            candidate = (index + step) % count
            if self.state[candidate] != _UNKNOWN:
                continue
            if step and self.match_labels and self.labels[candidate] != self.labels[index]:
                continue
            try:
                image = open_image(self._record(candidate))
            except Exception as err:  # any decoder failure means "unreadable": PIL raises many types
                self._mark_unreadable(candidate, err)
                continue
            if step:
                self._count(index)
            return image
        same = f" of class {int(self.labels[index])}" if self.match_labels else ""
        raise ValueError(f"no readable image{same} is left in {self.source} to stand in for unreadable image {index}")

    def _mark_unreadable(self, index: int, err: Exception) -> None:
        self.state[index] = _UNREADABLE
        self._errors[index] = f"{type(err).__name__}: {err}"

    def _count(self, index: int) -> None:
        """Count unreadable image ``index`` if this is the first epoch (see the module's counting rule)."""
        if self.epoch != 0 or self.state[index] == _COUNTED:
            return
        self.state[index] = _COUNTED
        counted = self.num_skipped_seen
        if counted <= NAMED_SKIPS:
            logger.warning("Unreadable image %s in %s (%s): the next readable image is trained in its place%s",
                           record_name(self._record(index), index), self.source,
                           self._errors.get(index, "unreadable"),
                           "; further ones are counted, not named" if counted == NAMED_SKIPS else "")
