"""Where class-conditional training gets its labels (the built-in digits, a `datasets` label column, an image
folder's sub-folders) and the clear errors for labels it cannot train on."""

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_hf.class_labels import LabelledDataset, LabelledSample, check_class_labels
from ddpm_hf.data import DataConfig, build_train_dataset, digits_split_indices


def conditional(**options):
    return DataConfig(class_conditional=True, **{"resolution": 8, "center_crop": True, **options})


def local_dataset(tmp_path, labels, feature=None, column="label"):
    """A parquet dataset folder whose image i is uniformly grey at level 20 * label(i) (or 20 * i if no label)."""
    files = []
    tmp_path.mkdir(parents=True, exist_ok=True)
    for i, label in enumerate(labels):
        path = tmp_path / f"{i}.png"
        level = 20 * (label if isinstance(label, int) and label >= 0 else i)
        Image.fromarray(np.full((8, 8), level, np.uint8)).save(path)
        files.append(str(path))
    data = {"image": files, column: labels}
    features = datasets.Features({"image": datasets.Image(), column: feature}) if feature is not None else None
    ds = datasets.Dataset.from_dict(data, features=features) if features else datasets.Dataset.from_dict(data)
    if features is None:
        ds = ds.cast_column("image", datasets.Image())
    (tmp_path / "local").mkdir()
    ds.to_parquet(str(tmp_path / "local" / "train.parquet"))
    return str(tmp_path / "local")


def test_the_digits_give_their_ten_labels_and_batches_keep_them():
    from sklearn.datasets import load_digits

    ds = build_train_dataset(conditional(resolution=16))
    assert isinstance(ds, LabelledDataset) and ds.info.class_names == tuple("0123456789")
    expected = torch.from_numpy(load_digits().target[digits_split_indices("train")])
    item = ds[5]
    assert isinstance(item, LabelledSample) and item.images.shape == (1, 16, 16) and item.class_labels == expected[5]
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=7)))
    assert isinstance(batch, LabelledSample) and batch.shape == (7, 1, 16, 16)  # shape: the images'
    assert torch.equal(batch.class_labels, expected[:7])


def test_an_image_folders_sub_folders_are_the_classes(tmp_path):
    levels = {"ant": 10, "bee": 120, "cat": 250}
    for name, level in levels.items():
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((8, 8), level, np.uint8)).save(tmp_path / "imgs" / name / f"{i}.png")
    ds = build_train_dataset(conditional(train_data_dir=str(tmp_path / "imgs")))
    assert ds.info.class_names == ("ant", "bee", "cat") and ds.info.label_column == "label"
    for i in range(len(ds)):
        image, label = ds[i]
        expected = levels[ds.info.class_names[int(label)]] / 255 * 2 - 1
        assert torch.allclose(image, torch.full_like(image, expected), atol=1e-6)


def test_a_classlabel_column_gives_names_and_an_integer_column_gives_ids(tmp_path):
    named = local_dataset(tmp_path / "a", [1, 0, 1, 2],
                          datasets.ClassLabel(names=["zero", "one", "two"]), column="kind")
    ds = build_train_dataset(conditional(dataset_name=named, label_column="kind"))
    assert ds.info.class_names == ("zero", "one", "two") and ds.info.labels.tolist() == [1, 0, 1, 2]
    assert [round(float(ds[i].images.mean()), 4) for i in range(4)] == [
        round(20 * label / 255 * 2 - 1, 4) for label in (1, 0, 1, 2)]
    ints = local_dataset(tmp_path / "b", [3, 0, 1, 3])
    ds = build_train_dataset(conditional(dataset_name=ints))
    assert ds.info.class_names == ("0", "1", "2", "3") and ds.info.labels.tolist() == [3, 0, 1, 3]


def test_label_columns_are_reported_but_unused_when_training_unconditionally(tmp_path):
    named = local_dataset(tmp_path, [1, 0], datasets.ClassLabel(names=["a", "b"]))
    ds = build_train_dataset(DataConfig(dataset_name=named, resolution=8))
    assert not isinstance(ds, LabelledDataset) and ds.info.label_column == "label"
    assert isinstance(ds[0], torch.Tensor)


@pytest.mark.parametrize("labels,feature,column,message", [
    ([0, 1], None, "kind", r"--label_column 'label' is not a column of --dataset_name .*columns: \['image', 'kind'\]"),
    ([0.5, 1.0], None, "label", r"--label_column 'label' .*holds Value\(.*float.*not class labels"),
    (["a", "b"], None, "label", r"--label_column 'label' .*holds Value\(.*string.*not class labels"),
    ([0, -1, 1], datasets.ClassLabel(names=["a", "b"]), "label", r"holds -1 at image 1 \(datasets writes -1"),
    ([0, -2, 1], None, "label", r"holds -2 at image 1: class labels must be in \[0, 2\)"),
    ([0, 0, 0], None, "label", r"has 1 class\(es\) present of 1 declared: .*at least 2"),
    ([1, 1], datasets.ClassLabel(names=["a", "b"]), "label", r"1 class\(es\) present of 2 declared"),
])
def test_labels_it_cannot_train_on_are_clear_errors(tmp_path, labels, feature, column, message):
    path = local_dataset(tmp_path, labels, feature, column=column)
    with pytest.raises(ValueError, match=message):
        build_train_dataset(conditional(dataset_name=path))


def test_a_label_at_or_past_the_number_of_classes_is_refused():
    with pytest.raises(ValueError, match=r"label column 'y' holds 3 at image 2: class labels must be in \[0, 3\)"):
        check_class_labels(torch.tensor([0, 1, 3]), ("a", "b", "c"), "y")


def test_an_image_folder_without_class_sub_folders_names_the_missing_column(tmp_path):
    (tmp_path / "flat").mkdir()
    for i in range(2):
        Image.fromarray(np.full((8, 8), 9 * i, np.uint8)).save(tmp_path / "flat" / f"{i}.png")
    with pytest.raises(ValueError, match="--label_column 'label' is not a column .*one sub-folder per class"):
        build_train_dataset(conditional(train_data_dir=str(tmp_path / "flat")))


def test_the_log_says_the_labels_are_trained_on(caplog):
    import logging

    from ddpm_hf.training.components import log_dataset

    with caplog.at_level(logging.INFO, logger="ddpm_hf.train"):
        log_dataset(build_train_dataset(conditional()))
    assert "Class-conditional: 10 classes from label column 'target' (0, 1, 2, 3, 4, 5, 6, 7, 8, 9); the null " \
           "class is 10" in caplog.text
    assert "ignored" not in caplog.text
