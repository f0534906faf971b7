"""Streaming training data (``--streaming``): `datasets.load_dataset(..., streaming=True)` over a Hub name or local
files (parquet shards, webdataset ``.tar`` shards, an image folder), decoded and transformed like the map-style
path (`ddpm_hf.data`), shuffled per epoch with the run's seed and split across processes.

Exact resume. The position a checkpoint records is *consumer side*: the epoch and how many raw records of this
process's stream the training loop has taken (`StreamingImageDataset.advance`), not what a prefetching loader
or its workers have read. Resuming re-iterates that epoch's stream, which the seed makes identical, and drops
the records already trained on without decoding them. This is exact even with a shuffle buffer; `datasets`'
own ``IterableDataset.state_dict()`` is not used because on resume it drops the buffer's content (its
docstring says so), which would skip up to ``--shuffle_buffer_size`` examples. The price: resuming reads (not
decodes) the part of the epoch already trained on again.

Batches are made here, from raw-record positions ``[k * batch, (k + 1) * batch)`` of a process's stream, so the
batches of a resumed run are those of an uninterrupted one; an unreadable image is left out of its batch and
counted (``num_skipped_seen``). With ``--dataloader_num_workers`` W, worker ``w`` decodes the batches
``k % W == w`` (it reads and drops the others), which is the order a `torch.utils.data.DataLoader` collects
them in: the batches are those of W = 0.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import tarfile
from itertools import islice
from typing import Any, Iterator, NamedTuple

import torch

from . import data as _data
from .data import DataConfig, DatasetInfo, ImageTransform, is_gray, item_generator, pil_to_float
from .dataset_sources import FILE_BUILDERS, load_source, source_name, source_text

logger = logging.getLogger(__name__)

# DATA may publish the decoder as `open_image`; until then it is `_open_image` (same signature).
_open_image = getattr(_data, "open_image", None) or _data._open_image


class StreamBatch(NamedTuple):
    """One batch of a process's stream, and where it leaves the stream.

    Args:
        images: ``(n, C, H, W)`` in [-1, 1], or None when none of its records could be read.
        epoch: the epoch it belongs to.
        end: the raw-record position in this process's epoch stream after it.
        skipped: records of this batch left out as unreadable.
    """

    images: torch.Tensor | None
    epoch: int
    end: int
    skipped: int


def collate_stream_batch(item: StreamBatch) -> StreamBatch:
    """The loader's collate function: batches are made by the dataset (a module function, so workers can pickle it)."""
    return item


# ---- sources -----------------------------------------------------------------------------------------------------


def local_shards(path: str) -> list[str] | None:
    """The parquet / webdataset shards a local ``--dataset_name`` names (a file, a glob or a folder), sorted.

    Returns:
        The shard paths, or None when ``path`` names no local shards (a Hub name, or a folder of images).

    Raises:
        ValueError: a glob or file of another type, or shards of two formats mixed.
    """
    if os.path.isdir(path):
        files = [os.path.join(path, name) for name in os.listdir(path)]
        files = [f for f in files if os.path.splitext(f)[1] in FILE_BUILDERS]
        if not files:
            return None  # an image folder
    elif any(char in path for char in "*?["):
        files = glob.glob(path)
        if not files:
            raise ValueError(f"--dataset_name {path!r}: the pattern matches no file")
    elif os.path.isfile(path):
        files = [path]
    else:
        return None
    kinds = {os.path.splitext(f)[1] for f in files}
    if not kinds <= FILE_BUILDERS.keys() or len(kinds) > 1:
        raise ValueError(f"--dataset_name {path!r}: --streaming reads shards of one format, "
                         f"{' or '.join(FILE_BUILDERS)}; found {', '.join(sorted(kinds))}")
    return sorted(files)


def check_shards(files: list[str], image_column: str) -> list[str]:
    """Open every local shard's index (a parquet footer, a tar's headers) before training starts.

    Returns:
        The shards that hold records (an empty one is left out with a log line: `datasets` fails on it).

    Raises:
        ValueError: naming the first shard that is truncated, of another format, or lacks ``image_column``; or
            saying that every shard is empty.
    """
    kept = []
    for path in files:
        columns, records = _parquet_index(path) if path.endswith(".parquet") else _tar_index(path)
        if image_column not in columns and records:
            raise ValueError(f"shard {path} has no column {image_column!r} (--image_column); its columns: "
                             f"{sorted(columns)}")
        if records:
            kept.append(path)
        else:
            logger.warning("Shard %s holds no records: left out", path)
    if not kept:
        raise ValueError(f"an empty stream: none of the {len(files)} shard(s) ({files[0]}, ...) holds a record")
    return kept


def _parquet_index(path: str) -> tuple[set[str], int]:
    """The columns and row count of a parquet shard (its footer only)."""
    import pyarrow.parquet as pq

    try:
        metadata = pq.read_metadata(path)
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ... for a damaged file
        raise ValueError(f"shard {path} is not a readable parquet file (truncated or another format?): "
                         f"{type(err).__name__}: {err}") from err
    return set(metadata.schema.to_arrow_schema().names), metadata.num_rows


def _tar_index(path: str) -> tuple[set[str], int]:
    """The webdataset fields (file extensions after the sample key, as `datasets` names them) and the number of
    files in a tar."""
    try:
        with tarfile.open(path) as tar:
            names = [m.name for m in tar.getmembers() if m.isfile()]  # reads every header: finds a truncation
    except (tarfile.TarError, OSError, EOFError) as err:
        raise ValueError(f"shard {path} is not a readable tar file (truncated or another format?): "
                         f"{type(err).__name__}: {err}") from err
    bases = [os.path.basename(name) for name in names]
    return {base.split(".", 1)[1] for base in bases if "." in base}, len(names)


def open_stream(config: DataConfig) -> Any:
    """The ``train`` split as a `datasets.IterableDataset`; local shards are checked first.

    Local parquet / webdataset shards are streamed from the checked list (empty shards left out, which
    `datasets` would fail on); every other source goes through `ddpm_hf.dataset_sources.load_source`.

    Args:
        config: ``dataset_name`` (Hub name, shard file, glob or folder; ``dataset_config_name``) or
            ``train_data_dir`` (an image folder), ``image_column``, ``cache_dir``.

    Raises:
        ValueError: no source, both, a damaged local shard, a missing column, or a source `datasets` rejects.
    """
    import datasets

    if (config.dataset_name is None) == (config.train_data_dir is None):
        raise ValueError("--streaming needs exactly one of --dataset_name or --train_data_dir (the built-in digits "
                         "are not streamed)")
    source = source_text(config)
    shards = local_shards(config.dataset_name) if config.dataset_name is not None else None
    if shards is None:
        stream = load_source(config, streaming=True)
    else:
        shards = check_shards(shards, config.image_column)
        builder = FILE_BUILDERS[os.path.splitext(shards[0])[1]]
        try:
            stream = datasets.load_dataset(builder, data_files={"train": shards}, split="train", streaming=True,
                                           cache_dir=config.cache_dir)
        except (FileNotFoundError, ValueError) as err:
            raise ValueError(f"could not stream images from {source}: {err}") from err
    columns = stream.column_names
    if columns is not None and config.image_column not in columns:
        raise ValueError(f"--image_column {config.image_column!r} is not a column of {source}; columns: {columns}")
    return stream


# ---- the dataset -------------------------------------------------------------------------------------------------


class StreamingImageDataset(torch.utils.data.IterableDataset):
    """Batches of transformed images from a `datasets.IterableDataset`, with a consumer-side position.

    Call `configure` (the batch size and this process's rank) before iterating; `build_run` does. Each pass
    yields the `StreamBatch` es of epoch ``epoch`` from ``position``; the training loop calls `advance` with
    every batch it takes and `next_epoch` when a pass ends.

    Args:
        stream: the source (``image_column`` undecoded or decoded).
        image_column: the column holding the images.
        transform: the map-style path's `ImageTransform`.
        num_channels: 1 or 3.
        seed: the run's seed (shuffling and random crops/flips).
        shuffle_buffer_size: `datasets`' shuffle buffer in examples; 1 shuffles the shard order only.
        name, is_local, source: for ``info`` and messages.
    """

    def __init__(self, stream: Any, image_column: str, transform: ImageTransform, num_channels: int,
                 seed: int = 0, shuffle_buffer_size: int = 1000, name: str = "dataset", is_local: bool = True,
                 source: str = "the stream"):
        import datasets

        features = stream.features
        if features is not None and isinstance(features.get(image_column), datasets.Image):
            stream = stream.cast_column(image_column, datasets.Image(decode=False))  # we decode (and skip) ourselves
        # One input shard at a time: datasets' default interleaves 10 in threads, and its parquet reader then
        # sleeps 5 s at the end of every pass (apache/arrow#45214), once per epoch.
        self._stream = stream.select_columns([image_column]).shuffle(seed=seed, buffer_size=shuffle_buffer_size,
                                                                     max_buffer_input_shards=1)
        self._rank_stream = self._stream
        self.image_column, self.transform, self.seed = image_column, transform, int(seed)
        self.shuffle_buffer_size, self.source = int(shuffle_buffer_size), source
        self.batch_size, self.rank, self.world_size = 1, 0, 1
        self.epoch, self.position, self.num_skipped_seen = 0, 0, 0
        self.info = DatasetInfo(name=name, is_local=is_local, num_images=0, num_channels=num_channels,
                                resolution=transform.resolution,
                                split=f"the 'train' split of {source}, streamed (size unknown; shuffle buffer "
                                      f"{shuffle_buffer_size}, seed {seed})")

    def configure(self, batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        """Batch size and this process's share: `datasets.distributed.split_dataset_by_node` (whole shards per
        rank when their number divides by ``world_size``, else every ``world_size``-th example)."""
        from datasets.distributed import split_dataset_by_node

        self.batch_size, self.rank, self.world_size = int(batch_size), int(rank), int(world_size)
        self._rank_stream = (split_dataset_by_node(self._stream, rank=rank, world_size=world_size)
                             if world_size > 1 else self._stream)

    # -- position ------------------------------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Iterate epoch ``epoch`` from its start next."""
        self.epoch, self.position = int(epoch), 0

    def advance(self, batch: StreamBatch) -> None:
        """The loop took ``batch``: move the position past it and count its unreadable records."""
        self.epoch, self.position = batch.epoch, batch.end
        self.num_skipped_seen += batch.skipped

    def next_epoch(self) -> None:
        """The pass ended: the next one is the following epoch, from its start."""
        self.set_epoch(self.epoch + 1)

    def state_dict(self) -> dict[str, Any]:
        """The consumer-side position and the skip count, and what they are only valid for (JSON-able)."""
        return {"epoch": self.epoch, "position": self.position, "num_skipped_seen": self.num_skipped_seen,
                **self._layout()}

    def _layout(self) -> dict[str, Any]:
        return {"rank": self.rank, "world_size": self.world_size, "batch_size": self.batch_size, "seed": self.seed,
                "shuffle_buffer_size": self.shuffle_buffer_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (from `state_dict` of the same rank, process count, batch size and shuffling).

        Raises:
            ValueError: a state of another layout or shape (names the keys that differ).
        """
        if not isinstance(state, dict) or not {"epoch", "position", "num_skipped_seen"} <= state.keys():
            raise ValueError("it is not a stream position (needs epoch, position, num_skipped_seen)")
        differ = [f"{key} {state.get(key)} there, {value} here" for key, value in self._layout().items()
                  if state.get(key) != value]
        if differ:
            raise ValueError("its stream position belongs to another layout: " + "; ".join(differ))
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.num_skipped_seen = int(state["num_skipped_seen"])

    # -- iteration -----------------------------------------------------------------------------------------------

    def _raw_batches(self, epoch: int) -> Iterator[list[Any]]:
        """This process's epoch stream in raw batches of ``batch_size`` records (images not decoded)."""
        self._rank_stream.set_epoch(epoch)  # datasets reshuffles shards and buffer with seed + epoch
        # `.iter` rather than `for x in stream`: the latter re-shards by DataLoader worker on its own.
        for batch in self._rank_stream.iter(batch_size=self.batch_size):
            yield batch[self.image_column]

    def __iter__(self) -> Iterator[StreamBatch]:
        epoch, position = self.epoch, self.position  # fixed for this pass, whatever `advance` does meanwhile
        worker = torch.utils.data.get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        first = -(-position // self.batch_size)  # a position is a batch boundary or the end of the epoch
        with self._named_errors(epoch, position):
            for offset, records in enumerate(islice(self._raw_batches(epoch), first, None)):
                if offset % num_workers == worker_id:
                    yield self._decode(records, epoch, (first + offset) * self.batch_size)

    @contextlib.contextmanager
    def _named_errors(self, epoch: int, position: int) -> Iterator[None]:
        """Re-raise a failure of the source as a ValueError naming it and where the stream stood."""
        try:
            yield
        except Exception as err:  # datasets, pyarrow and fsspec raise many types for a damaged or vanished shard
            raise ValueError(f"streaming {self.source} failed in epoch {epoch} after record {position} of process "
                             f"{self.rank}: {type(err).__name__}: {err}") from err

    def _decode(self, records: list[Any], epoch: int, start: int) -> StreamBatch:
        """Decode and transform one raw batch; unreadable records are left out and counted."""
        images = []
        needs_rng = self.transform.random_flip or not self.transform.center_crop
        for i, record in enumerate(records):
            try:
                image = pil_to_float(_open_image(record), self.info.num_channels)
            except Exception as err:  # any decoder failure means "unreadable": PIL raises many types
                logger.debug("skipping unreadable image at record %d of epoch %d: %s", start + i, epoch, err)
                continue
            index = (start + i) * self.world_size + self.rank  # unique over processes: their own crops
            images.append(self.transform(image, item_generator(self.seed, epoch, index) if needs_rng else None))
        skipped = len(records) - len(images)
        if skipped:
            logger.warning("Skipped %d unreadable image(s) in a batch of %s", skipped, self.source)
        return StreamBatch(torch.stack(images) if images else None, epoch, start + len(records), skipped)

    def first_share(self) -> int:
        """Raw records of this process's first epoch, counted up to one batch (no image decoded)."""
        with self._named_errors(0, 0):
            return len(next(self._raw_batches(0), []))


def _first_channels(stream: Any, image_column: str, source: str) -> int:
    """1 if the stream's first readable image is grey, else 3 (the stream cannot be scanned in full)."""
    import datasets

    if isinstance((stream.features or {}).get(image_column), datasets.Image):
        stream = stream.cast_column(image_column, datasets.Image(decode=False))
    for record in islice((row[image_column] for row in stream), 64):
        try:
            return 1 if is_gray(_open_image(record)) else 3
        except Exception:  # an unreadable first image: try the next
            continue
    raise ValueError(f"{source}: none of its first 64 images could be read (or it holds none); pass "
                     "--num_channels to skip this check, or check the data")


def build_streaming_dataset(config: DataConfig, seed: int = 0) -> StreamingImageDataset:
    """The ``--streaming`` training set ``config`` asks for (unconfigured: `build_run` sets batch and rank).

    Args:
        config: the data flags (``shuffle_buffer_size`` included).
        seed: the run's seed.

    Raises:
        ValueError: a bad source or shard (named), or no readable image where the channels are detected.
    """
    if config.class_conditional:
        raise ValueError("--streaming with --class_conditional is not supported: the labels are read up front")
    stream = open_stream(config)
    source = source_text(config)
    num_channels = config.num_channels or _first_channels(stream, config.image_column, source)
    name = source_name(config)
    transform = ImageTransform(config.resolution, center_crop=config.center_crop, random_flip=config.random_flip)
    return StreamingImageDataset(stream, config.image_column, transform, num_channels, seed=seed,
                                 shuffle_buffer_size=config.shuffle_buffer_size, name=name,
                                 is_local=os.path.exists(name), source=source)
