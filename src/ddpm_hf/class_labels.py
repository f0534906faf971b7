"""Class labels for class-conditional training: reading and checking a label column, and the labelled items
(`LabelledSample`) a class-conditional training set yields.

The network embeds labels ``0..K-1`` and a learned null class ``K`` (classifier-free guidance, Ho & Salimans
2022; the null class last, as DiT does), so a label outside ``[0, K)`` or a set with fewer than 2 classes is
refused before training, naming the column and the value.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import torch

if TYPE_CHECKING:
    from .data import TrainDataset


class LabelledSample(NamedTuple):
    """An image and its class label, or (collated by the data loader, which keeps the type) a batch of both.

    ``shape`` is the images' shape, so code that counts images (``batch.shape[0]``) treats a labelled batch
    like an image tensor; accelerate moves and shards it field by field.
    """

    images: torch.Tensor
    class_labels: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        """The images' shape."""
        return self.images.shape


class LabelledDataset(torch.utils.data.Dataset):
    """A training set whose items are `LabelledSample` (image, label), for class-conditional training.

    Args:
        dataset: a `TrainDataset` whose ``info`` carries validated ``labels`` and ``class_names``.
    """

    def __init__(self, dataset: TrainDataset):
        info = dataset.info
        if info.labels is None or info.class_names is None:
            raise ValueError(f"{info.name!r} has no class labels to train on")
        self.dataset = dataset
        self.info = info

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> LabelledSample:
        return LabelledSample(self.dataset[index], self.info.labels[index])

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch``'s augmentation from now on."""
        self.dataset.set_epoch(epoch)


def read_label_column(dataset: Any, column: str, source: str) -> tuple[list[int], tuple[str, ...]]:
    """The labels and class names of ``column`` for class-conditional training.

    A ``ClassLabel`` feature gives the class names; an integer column gives ids ``0..K-1`` with K = its
    maximum + 1, named by their numbers. The values are checked by `check_class_labels`.

    Args:
        dataset: a `datasets.Dataset`.
        column: ``--label_column``.
        source: the flag and value the data came from, for error messages.

    Returns:
        ``(labels, class_names)``.

    Raises:
        ValueError: the column is missing or holds neither a ``ClassLabel`` nor integers (names it).
    """
    import datasets

    if column not in dataset.column_names:
        raise ValueError(
            f"--label_column {column!r} is not a column of {source}; columns: {dataset.column_names} (an image "
            "folder has a 'label' column when its images sit in one sub-folder per class)")
    feature = dataset.features[column]
    labels = list(dataset[column])
    if isinstance(feature, datasets.ClassLabel):
        return labels, tuple(feature.names)
    if not (isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint"))):
        raise ValueError(f"--label_column {column!r} of {source} holds {feature!r}, not class labels: it must be a "
                         "ClassLabel feature or integers 0..K-1")
    return labels, tuple(str(i) for i in range(max(labels, default=-1) + 1))


def check_class_labels(labels: torch.Tensor, class_names: tuple[str, ...], column: str) -> None:
    """Refuse labels a class-conditional network cannot embed: outside [0, K), or fewer than 2 classes.

    Args:
        labels: one int64 label per training image.
        class_names: the K class names.
        column: where the labels came from, for the messages.

    Raises:
        ValueError: naming the column, the bad value and its image index.
    """
    num_classes = len(class_names)
    bad = torch.nonzero((labels < 0) | (labels >= num_classes)).flatten()
    if bad.numel():
        index = int(bad[0])
        hint = " (datasets writes -1 for a missing label)" if int(labels[index]) == -1 else ""
        raise ValueError(f"label column {column!r} holds {int(labels[index])} at image {index}{hint}: class labels "
                         f"must be in [0, {num_classes}) for its {num_classes} classes")
    present = torch.unique(labels).numel()
    if num_classes < 2 or present < 2:
        raise ValueError(f"label column {column!r} has {present} class(es) present of {num_classes} declared: "
                         "class-conditional training needs at least 2")
