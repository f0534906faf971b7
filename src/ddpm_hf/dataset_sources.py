"""Where training images come from: ``--dataset_name`` / ``--train_data_dir`` resolved to a `datasets` dataset.

`load_source` accepts a local image folder (``--train_data_dir``, datasets' imagefolder), and for
``--dataset_name`` a local folder `datasets` can load (parquet, csv, images, ...), a folder written by
``Dataset.save_to_disk``, a single ``.parquet`` or webdataset ``.tar`` file, a glob of such shards, or a Hub
name; map-style or streaming. Local paths are checked first: a name that looks like a path but is none is an
error at once, and a Hub name is tried only after a two-second check that the Hub answers (otherwise
huggingface_hub retries for about 25 s and `datasets` ends in a bare ``ConnectionError``).
"""

from __future__ import annotations

import glob
import os
import socket
from typing import Any
from urllib.parse import urlparse

from .data import DataConfig

HUB_PROBE_TIMEOUT_S = 2.0
# datasets' packaged builder for each single-file or shard format --dataset_name may name.
FILE_BUILDERS = {".parquet": "parquet", ".tar": "webdataset"}
_GLOB_CHARS = set("*?[")


def source_text(config: DataConfig) -> str:
    """The flag and value the images come from, as error messages name it."""
    if config.train_data_dir is not None:
        return f"--train_data_dir {config.train_data_dir!r}"
    return f"--dataset_name {config.dataset_name!r}"


def source_name(config: DataConfig) -> str:
    """The source as the user named it (the folder or the dataset name)."""
    return config.train_data_dir if config.train_data_dir is not None else config.dataset_name


def is_local_source(config: DataConfig) -> bool:
    """Whether the source is a local folder, file or glob of files rather than a Hub name."""
    name = os.path.expanduser(source_name(config))
    return os.path.exists(name) or bool(_GLOB_CHARS & set(name) and glob.glob(name))


def image_extensions() -> tuple[str, ...]:
    """The file extensions datasets' imagefolder reads (one home: datasets' own list)."""
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    return tuple(ImageFolder.EXTENSIONS)


def _has_image_file(folder: str) -> bool:
    """Whether ``folder`` or a sub-folder holds a file with an image extension (stops at the first one)."""
    extensions = image_extensions()
    for _, _, files in os.walk(folder):
        if any(name.lower().endswith(extensions) for name in files):
            return True
    return False


def _is_saved_to_disk(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "dataset_dict.json")) or os.path.isfile(os.path.join(path, "state.json"))


def _looks_like_a_path(name: str) -> bool:
    """A name no Hub id can be: absolute, ./ ../ ~, a trailing slash, several slashes, or a file extension."""
    return (name.startswith((".", "/", "~")) or name.endswith(("/", os.sep)) or name.count("/") > 1
            or os.path.splitext(name)[1].lower() in FILE_BUILDERS or os.sep != "/" and os.sep in name)


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> tuple[bool, str]:
    """``(True, "")`` when the Hub endpoint accepts a TCP connection within ``timeout``, else ``(False, why)``."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False, "HF_HUB_OFFLINE is set"
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as err:
        return False, f"{constants.ENDPOINT} did not answer: {err}"
    return True, ""


def _pick_split(loaded: Any, split: str, source: str) -> Any:
    """One split of a `DatasetDict` (or the dataset itself), naming the splits there are when it is missing."""
    import datasets

    if not isinstance(loaded, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split != "train":
            raise ValueError(f"{source} has no {split!r} split (it is a single dataset, used as 'train')")
        return loaded
    if split not in loaded:
        raise ValueError(f"{source} has no {split!r} split; its splits: {sorted(loaded)}")
    return loaded[split]


def _load_arguments(config: DataConfig) -> tuple[str | None, dict[str, Any]]:
    """``(None, {"disk": path})`` for a save_to_disk folder, else datasets.load_dataset's path and keywords.

    Raises:
        ValueError: a path that does not exist or holds no images, naming the flag.
    """
    source = source_text(config)
    if config.train_data_dir is not None:
        if not os.path.isdir(config.train_data_dir):
            raise ValueError(f"{source} is not a directory")
        if not _has_image_file(config.train_data_dir):
            raise ValueError(f"{source} holds no image files (none of {', '.join(image_extensions()[:8])}, ... "
                             "in it or its sub-folders)")
        return "imagefolder", {"data_dir": config.train_data_dir}
    name = config.dataset_name
    if os.path.isdir(name):
        return (None, {"disk": name}) if _is_saved_to_disk(name) else (name, {"name": config.dataset_config_name})
    extension = os.path.splitext(name)[1].lower()
    if _GLOB_CHARS & set(name) or os.path.isfile(name):
        matches = sorted(glob.glob(os.path.expanduser(name)))
        if not matches:
            raise ValueError(f"{source} matches no file")
        extension = os.path.splitext(matches[0])[1].lower()
        if extension not in FILE_BUILDERS:
            raise ValueError(f"{source} names {matches[0]!r}: a single file must be one of "
                             f"{', '.join(FILE_BUILDERS)} (or give a folder)")
        return FILE_BUILDERS[extension], {"data_files": {"train": matches}}
    if _looks_like_a_path(name):
        raise ValueError(f"{source} is not a local path (no such file or folder from {os.getcwd()!r}), and not "
                         "a Hub dataset name")
    return name, {"name": config.dataset_config_name}


def load_source(config: DataConfig, streaming: bool = False, split: str = "train") -> Any:
    """The images of ``config``'s source as a `datasets.Dataset` (an `IterableDataset` when ``streaming``).

    Args:
        config: ``dataset_name`` (+ ``dataset_config_name``) or ``train_data_dir``, and ``cache_dir``.
        streaming: stream instead of loading (datasets' ``streaming=True``; a save_to_disk folder is read
            through ``to_iterable_dataset``).
        split: the split to load.

    Returns:
        The dataset.

    Raises:
        ValueError: one line naming the flag: no such path, no images, an unreachable Hub, no such split.
    """
    import datasets

    source = source_text(config)
    path, kwargs = _load_arguments(config)
    if path is None:
        loaded = _pick_split(datasets.load_from_disk(kwargs["disk"]), split, source)
        return loaded.to_iterable_dataset() if streaming and isinstance(loaded, datasets.Dataset) else loaded
    is_hub = config.train_data_dir is None and path == config.dataset_name and not os.path.isdir(path)
    if is_hub:
        reachable, why = hub_reachable()
        if not reachable and not _offline():  # offline, datasets reads its cache without the network: let it
            raise ValueError(f"{source} is not a local path, and the Hub is unreachable ({why}); check the path, "
                             "or set HF_HUB_OFFLINE=1 to use a copy in the datasets cache")
    try:
        return datasets.load_dataset(path, split=split, cache_dir=config.cache_dir, streaming=streaming, **kwargs)
    except ConnectionError as err:
        raise ValueError(f"{source} is not a local path, and the Hub is unreachable: {err}") from None
    except (FileNotFoundError, ValueError, datasets.exceptions.DataFilesNotFoundError,
            datasets.exceptions.DatasetNotFoundError) as err:
        raise ValueError(f"could not load images from {source}: {_one_line(err)}") from None


def _names_a_held_out_split(folder: str) -> bool:
    """Whether any name under ``folder`` contains a validation/test keyword of datasets' split inference (a
    superset of the names its patterns match, so False means the folder is a "train" split only)."""
    from datasets.data_files import SPLIT_KEYWORDS

    keywords = [word for split, words in SPLIT_KEYWORDS.items() if split != "train" for word in words]
    for _, dirs, files in os.walk(folder):
        if any(word in name.lower() for name in dirs + files for word in keywords):
            return True
    return False


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def split_names(config: DataConfig) -> tuple[str, ...]:
    """The splits ``config``'s source has (``("train",)`` for a single file or a folder without split folders).

    Raises:
        ValueError: as `load_source`.
    """
    import datasets

    path, kwargs = _load_arguments(config)
    if path is None:
        loaded = datasets.load_from_disk(kwargs["disk"])
        return tuple(loaded) if isinstance(loaded, datasets.DatasetDict) else ("train",)
    if "data_files" in kwargs:
        return tuple(kwargs["data_files"])
    folder = kwargs.get("data_dir") or (path if os.path.isdir(path) else None)
    if folder is not None and not _names_a_held_out_split(folder):
        return ("train",)  # datasets' pattern resolution globs every file: minutes for a folder of 50k images
    try:
        builder = datasets.load_dataset_builder(path, cache_dir=config.cache_dir, **kwargs)
    except ConnectionError as err:
        raise ValueError(f"{source_text(config)} is not a local path, and the Hub is unreachable: {err}") from None
    files = builder.config.data_files
    if files:
        return tuple(str(name) for name in files)
    return tuple(builder.info.splits or ("train",))
