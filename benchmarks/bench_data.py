#!/usr/bin/env python
"""Data pipeline at scale: peak RSS, images/s and the time a step waits for data, as the data grows 25x.

Writes synthetic 24x24 RGB PNGs (2k and 50k by default) to a temporary folder outside the repository, the same
images as parquet shards and as webdataset ``.tar`` shards, then trains `training/train.py` at its defaults
(tiny preset, 16x16, batch 64, no loader workers) on each for a fixed number of steps, one process per run:

    map-style   --train_data_dir <png folder>                 (the lazy image dataset)
    parquet     --streaming true --dataset_name <parquet dir>
    webdataset  --streaming true --dataset_name <tar dir>

Each run is ``python benchmarks/bench_data.py --child ...``: it wraps the torch DataLoader iterator's
``__next__`` to time every batch fetch, runs the script with runpy, and reports its own peak RSS
(``ru_maxrss``). Per step: interval = time between consecutive fetches, wait = the fetch itself; images/s =
batch / median interval after warm-up, wait share = total wait / total interval; start = process start to the
first fetch (imports, finding the files, building the dataset). Runs are interleaved over
``--rounds``; the temporary folder is deleted at the end.

    OMP_NUM_THREADS=1 python benchmarks/bench_data.py --sizes 2000 50000 --steps 40 --rounds 2
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import runpy
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_SCRIPT = os.path.join(ROOT, "training", "train.py")
RESULTS = os.path.join(ROOT, "benchmarks", "results")
WARMUP_STEPS = 5
SHARD_SIZE = 5000
IMAGE_SIDE = 24
PATHS = ("map-style", "parquet", "webdataset")


# ---- synthetic data ------------------------------------------------------------------------------------------------


def png_bytes(count: int, seed: int = 0) -> list[bytes]:
    """``count`` distinct small RGB PNGs (a random colour gradient each): cheap to write, real to decode."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, IMAGE_SIDE, dtype=np.float32)
    out = []
    for _ in range(count):
        a, b = rng.random(3, dtype=np.float32), rng.random(3, dtype=np.float32)
        pixels = (ramp[:, None, None] * a + ramp[None, :, None] * b) * 127 + rng.integers(0, 64, 3)
        buffer = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG", compress_level=1)
        out.append(buffer.getvalue())
    return out


def write_sources(root: str, images: list[bytes]) -> dict[str, list[str]]:
    """The images as a PNG folder, parquet shards and webdataset shards; returns each path's data flags."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folders = {name: os.path.join(root, name) for name in PATHS}
    for folder in folders.values():
        os.makedirs(folder)
    for i, data in enumerate(images):
        with open(os.path.join(folders["map-style"], f"{i:06d}.png"), "wb") as f:
            f.write(data)
    # datasets' Image feature as parquet stores it: a struct of bytes and path, named in the schema metadata
    features = json.dumps({"info": {"features": {"image": {"_type": "Image"}}}})
    for shard, start in enumerate(range(0, len(images), SHARD_SIZE)):
        chunk = images[start:start + SHARD_SIZE]
        table = pa.table({"image": [{"bytes": b, "path": f"{start + i:06d}.png"} for i, b in enumerate(chunk)]})
        table = table.replace_schema_metadata({"huggingface": features})
        pq.write_table(table, os.path.join(folders["parquet"], f"train-{shard:05d}.parquet"))
        with tarfile.open(os.path.join(folders["webdataset"], f"train-{shard:05d}.tar"), "w") as tar:
            for i, data in enumerate(chunk):
                member = tarfile.TarInfo(f"{start + i:06d}.png")
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    return {"map-style": ["--train_data_dir", folders["map-style"]],
            "parquet": ["--streaming", "true", "--dataset_name", folders["parquet"]],
            "webdataset": ["--streaming", "true", "--dataset_name", folders["webdataset"], "--image_column", "png"]}


# ---- one measured run (the child) ---------------------------------------------------------------------------------


def child(report: str, train_args: list[str]) -> None:
    """Run train.py with every DataLoader fetch timed; write fetch times and peak RSS to ``report``."""
    import psutil
    import torch.utils.data.dataloader as dl

    starts, ends = [], []
    original = dl._BaseDataLoaderIter.__next__

    def timed_next(self):
        starts.append(time.perf_counter())
        try:
            return original(self)
        finally:
            ends.append(time.perf_counter())

    dl._BaseDataLoaderIter.__next__ = timed_next
    sys.argv = [TRAIN_SCRIPT] + train_args
    code = 0
    try:
        runpy.run_path(TRAIN_SCRIPT, run_name="__main__")
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    rank = int(os.environ.get("RANK", "0"))
    born = psutil.Process().create_time()  # wall clock at process start: startup includes the imports
    with open(f"{report}.{rank}", "w") as f:
        json.dump({"rank": rank, "exit": code, "starts": starts, "ends": ends,
                   "startup_s": starts[0] - (born - time.time() + time.perf_counter()) if starts else None,
                   "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}, f)


def summarize(record: dict, batch: int) -> dict:
    """images/s, the share of each step spent waiting for data, and peak RSS, after ``WARMUP_STEPS`` steps."""
    starts, ends = record["starts"][WARMUP_STEPS:], record["ends"][WARMUP_STEPS:]
    intervals = [b - a for a, b in zip(starts, starts[1:])]
    waits = [e - s for s, e in zip(starts, ends)][:len(intervals)]
    return {"images_per_s": batch / statistics.median(intervals),
            "wait_share": sum(waits) / sum(intervals),
            "wait_ms_median": 1000 * statistics.median(waits),
            "step_ms_median": 1000 * statistics.median(intervals),
            "peak_rss_mb": record["peak_rss_mb"], "startup_s": record["startup_s"]}


def measure(launch: list[str], data_flags: list[str], steps: int, batch: int, work: str, env: dict,
            workers: int = 0) -> list[dict]:
    """One run of train.py (``launch`` starts this file's ``--child``); returns each rank's summary."""
    out = tempfile.mkdtemp(dir=work, prefix="out-")
    report = os.path.join(out, "report")
    train_args = data_flags + ["--output_dir", os.path.join(out, "run"), "--max_train_steps", str(steps),
                               "--train_batch_size", str(batch), "--checkpointing_steps", str(10 * steps),
                               "--save_images_steps", str(10 * steps), "--save_model_steps", str(10 * steps),
                               "--logger", "none", "--logging_steps", str(10 * steps),
                               "--dataloader_num_workers", str(workers)]
    command = launch + [os.path.abspath(__file__), "--child", report, "--"] + train_args
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    records = []
    for name in sorted(os.listdir(out)):
        if name.startswith("report."):
            with open(os.path.join(out, name)) as f:
                records.append(json.load(f))
    shutil.rmtree(out, ignore_errors=True)
    if result.returncode != 0 or not records or any(r["exit"] for r in records):
        tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return [{"error": tail}]
    return [summarize(r, batch) for r in records]


# ---- the parent -----------------------------------------------------------------------------------------------------


def bench_env(work: str) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HOME=os.path.join(work, "hf_home"),
                HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
                PYTHONPATH=os.path.join(ROOT, "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))


def print_machine() -> dict:
    """CPU model and flags, torch threads, dtype, load: printed and returned for the JSON."""
    import torch

    from ddpm_hf.hardware import describe_hardware

    machine = {"hardware": str(describe_hardware()), "torch_threads": 1, "dtype": "float32",
               "torch": torch.__version__, "cpus": os.cpu_count(), "loadavg_start": os.getloadavg()}
    for key, value in machine.items():
        print(f"{key}: {value}")
    return machine


def median_of(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if key in r]
    return statistics.median(values) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 50000])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=64, help="train.py's default --train_batch_size")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=0, help="--dataloader_num_workers (train.py's default: 0)")
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    parser.add_argument("--json", default=os.path.join(RESULTS, "bench_data.json"))
    args = parser.parse_args()
    machine = print_machine()
    work = tempfile.mkdtemp(prefix="ddpm_hf-bench-data-")
    try:
        started = time.perf_counter()
        images = png_bytes(max(args.sizes))
        sources = {}
        for size in args.sizes:
            sources[size] = write_sources(os.path.join(work, f"data-{size}"), images[:size])
        print(f"wrote {len(args.sizes)} x 3 sources in {time.perf_counter() - started:.1f} s")
        del images
        runs = {(path, size): [] for path in args.paths for size in args.sizes}
        for round_ in range(args.rounds):  # interleaved: the shared machine's load hits every configuration alike
            for (path, size), results in runs.items():
                result = measure([sys.executable], sources[size][path], args.steps, args.batch, work, bench_env(work),
                                 args.workers)
                results.extend(result)
                print(f"round {round_} {path:10s} {size:6d}: {result[0]}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(runs, args, machine)


def report(runs: dict, args: argparse.Namespace, machine: dict) -> None:
    """The table (medians over rounds), the three checks of the issue, and the JSON file."""
    table = {f"{path} {size}": {key: median_of(results, key) for key in
                                ("images_per_s", "wait_share", "wait_ms_median", "step_ms_median", "peak_rss_mb",
                                            "startup_s")}
             | {"errors": [r["error"] for r in results if "error" in r]}
             for (path, size), results in runs.items()}
    print(f"\n{'path':24s} {'images/s':>9s} {'step ms':>8s} {'wait ms':>8s} {'wait %':>7s} {'peak RSS MB':>12s} {'start s':>8s}")
    for name, row in table.items():
        if row["images_per_s"] is None:
            print(f"{name:24s} failed: {row['errors'][:1]}")
            continue
        print(f"{name:24s} {row['images_per_s']:9.0f} {row['step_ms_median']:8.1f} {row['wait_ms_median']:8.2f} "
              f"{100 * row['wait_share']:6.1f}% {row['peak_rss_mb']:12.0f} {row['startup_s']:8.1f}")
    small, large = min(args.sizes), max(args.sizes)
    checks = {}
    for path in args.paths:
        a, b = table[f"{path} {small}"], table[f"{path} {large}"]
        if a["peak_rss_mb"] and b["peak_rss_mb"]:
            checks[f"{path}: peak RSS {large} / {small}"] = b["peak_rss_mb"] / a["peak_rss_mb"]
        if path != "map-style" and b["images_per_s"] and table[f"map-style {large}"]["images_per_s"]:
            checks[f"{path} / map-style images/s at {large}"] = \
                b["images_per_s"] / table[f"map-style {large}"]["images_per_s"]
    for name, value in checks.items():
        print(f"{name}: {value:.3f}")
    machine["loadavg_end"] = os.getloadavg()
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"machine": machine, "settings": vars(args), "table": table, "checks": checks}, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[4:])
    else:
        main()
