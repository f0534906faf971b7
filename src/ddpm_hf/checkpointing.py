"""Atomic training checkpoints on top of ``accelerate``'s ``save_state``/``load_state``.

A checkpoint is written to ``.checkpoint-N.partial`` and renamed to ``checkpoint-N`` only once every file
(accelerate's model/optimizer/RNG files plus ours, written by registered hooks) is on disk, and only a folder
holding our completion marker counts as a checkpoint. A kill mid-save therefore never leaves a folder that
``--resume_from_checkpoint latest`` would pick, and rotation (``--checkpoints_total_limit``) runs only after a
successful save and never removes the checkpoint just written.

Our files in each checkpoint (besides accelerate's ``model.safetensors``, ``optimizer.bin``,
``random_states_<rank>.pkl``): ``training_state.json`` (step, epoch, position in the epoch, wall time so far,
LR scheduler state, EMA counters), ``ema.safetensors`` (EMA weights), ``generator_<rank>.safetensors`` (the
noise/timestep RNG) and, when the training set keeps a state (`data_state_owner`: a stream's position, a lazy
dataset's count of skipped images), ``data_state_<rank>.json``.

Resuming checks every file first (``check_checkpoint_files``): a missing, truncated or corrupt file, or weights of
another model config, stop the run with a ValueError naming the file before any state is restored.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import zipfile
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch
from accelerate.utils import load as accelerate_load
from accelerate.utils.constants import RNG_STATE_NAME, SAFE_MODEL_NAME
from safetensors import safe_open
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

PREFIX = "checkpoint-"
MARKER = "ddpm_hf_checkpoint.json"
STATE_FILE = "training_state.json"
DATA_STATE_FILE = "data_state_{rank}.json"
EMA_FILE = "ema.safetensors"
_NAME = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainProgress:
    """Where training stands: optimizer steps done, the epoch, micro-batches consumed in that epoch, steps skipped
    for a non-finite loss, and the run's wall time up to the last checkpoint (all sessions together)."""

    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    skipped_nonfinite: int = 0
    wall_time_s: float = 0.0


class RunClock:
    """Wall time of a whole run across resumes: the time saved in the checkpoint plus this session's time.

    A session starts when the clock is made (at the start of the training script); `resume_from` adds what
    the checkpoint recorded. Time between the last checkpoint and a kill is lost with the rest of that work.
    """

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self._before = 0.0

    def resume_from(self, wall_time_s: float) -> None:
        """Count ``wall_time_s`` (the checkpoint's total) as done before this session."""
        self._before = float(wall_time_s)

    def session_s(self) -> float:
        """Seconds since this session started."""
        return time.perf_counter() - self.started

    def total_s(self) -> float:
        """Seconds of the whole run so far."""
        return self._before + self.session_s()


def is_complete(path: str) -> bool:
    """Whether ``path`` is a checkpoint whose save finished (it holds the completion marker)."""
    return os.path.isfile(os.path.join(path, MARKER))


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete ``checkpoint-N`` folders in ``output_dir`` as ``(N, path)``, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _NAME.match(name)
        path = os.path.join(output_dir, name)
        if match and is_complete(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_checkpoint(output_dir: str, spec: str | None) -> str | None:
    """Turn ``--resume_from_checkpoint`` into a folder: ``latest`` (None if there is none yet), or a path.

    A relative path that is not a folder is also looked up inside ``output_dir`` (as diffusers' example does).

    Raises:
        ValueError: a given path is missing or not a complete checkpoint.
    """
    if spec is None:
        return None
    if spec == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1][1] if checkpoints else None
    path = spec if os.path.isdir(spec) else os.path.join(output_dir, spec)
    if not os.path.isdir(path):
        raise ValueError(f"--resume_from_checkpoint {spec!r}: no such folder (use 'latest' or a checkpoint path)")
    if not is_complete(path):
        raise ValueError(f"--resume_from_checkpoint {spec!r}: {path} is not a complete checkpoint (no {MARKER})")
    return path


def remove_partial(output_dir: str) -> None:
    """Delete leftovers of interrupted saves (``.checkpoint-*.partial`` / ``.old``)."""
    if not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        if name.startswith(f".{PREFIX}") and name.endswith((".partial", ".old")):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def rotate(output_dir: str, total_limit: int | None, keep: str) -> list[str]:
    """Remove the oldest complete checkpoints beyond ``total_limit``, never ``keep``; returns removed paths.

    Not accelerate's ``ProjectConfiguration(automatic_checkpoint_naming=True, total_limit=N)``: accelerate 1.15
    deletes the oldest folder *before* writing the new one (a kill mid-save leaves one complete checkpoint
    fewer) and counts every folder, partial ones included, under its own ``checkpoints/checkpoint_<i>`` names.
    """
    if total_limit is None:
        return []
    candidates = [path for _, path in list_checkpoints(output_dir) if os.path.abspath(path) != os.path.abspath(keep)]
    excess = len(candidates) + 1 - total_limit
    removed = candidates[: max(0, excess)]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
        logger.info("Removed old checkpoint %s (--checkpoints_total_limit %d)", path, total_limit)
    return removed


def read_marker(path: str) -> dict[str, Any] | None:
    """The completion marker of checkpoint ``path`` (step, and the run's identity where recorded), or None."""
    try:
        with open(os.path.join(path, MARKER)) as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def save_checkpoint(accelerator: Any, output_dir: str, step: int, total_limit: int | None = None,
                    identity: dict[str, Any] | None = None) -> str:
    """Save the accelerator's state as ``output_dir/checkpoint-{step}``, atomically; call on every process.

    Args:
        accelerator: the run's accelerator (its save hooks add our files).
        output_dir: where checkpoints go.
        step: the optimizer step saved.
        total_limit: keep at most this many checkpoints (None: all).
        identity: the run's identity (`ddpm_hf.training.output_folder.run_identity`), recorded in the marker.

    Returns:
        The checkpoint folder.

    Raises:
        OSError: the save failed (disk full, permissions); the message names the path. Earlier checkpoints
            are left untouched.
    """
    final = os.path.join(output_dir, f"{PREFIX}{step}")
    partial = os.path.join(output_dir, f".{PREFIX}{step}.partial")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(partial)
    except OSError as err:
        shutil.rmtree(partial, ignore_errors=True)
        raise OSError(f"could not write checkpoint {final} (via {partial}): {err}") from err
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        try:
            with open(os.path.join(partial, MARKER), "w") as f:
                json.dump({"step": step, **(identity or {})}, f, indent=2, sort_keys=True)
            _replace_dir(partial, final)
        except OSError as err:
            shutil.rmtree(partial, ignore_errors=True)
            raise OSError(f"could not write checkpoint {final}: {err}") from err
        rotate(output_dir, total_limit, keep=final)
        logger.info("Saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def _replace_dir(src: str, dst: str) -> None:
    # os.replace cannot overwrite a non-empty folder: move the old one aside first, then drop it.
    if os.path.exists(dst):
        old = os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


class StateHooks:
    """Save/load hooks that put our training state beside accelerate's files in every checkpoint.

    Args:
        progress: the `TrainProgress` to save and restore in place.
        lr_scheduler: stepped once per optimizer step by the training loop (not by accelerate).
        generator: the per-process RNG for noise and timesteps.
        ema: the `EMA`, or None.
        process_index: this process's rank.
        clock: the run's `RunClock`: its total is saved as ``progress.wall_time_s`` and restored on load.
        data: the training set's state keeper (`data_state_owner`), or None.
    """

    def __init__(self, progress: TrainProgress, lr_scheduler: Any, generator: torch.Generator, ema: Any,
                 process_index: int, clock: RunClock | None = None, data: Any = None):
        self.data = data
        self.progress = progress
        self.lr_scheduler = lr_scheduler
        self.generator = generator
        self.ema = ema
        self.process_index = process_index
        self.clock = clock

    def register(self, accelerator: Any) -> None:
        """Install `save` and `load` as the accelerator's save/load-state pre-hooks."""
        accelerator.register_save_state_pre_hook(lambda models, weights, path: self.save(path))
        accelerator.register_load_state_pre_hook(
            lambda models, path: self.load(path, [accelerator.unwrap_model(m) for m in models]))

    def _generator_file(self, path: str) -> str:
        return os.path.join(path, f"generator_{self.process_index}.safetensors")

    def _data_file(self, path: str) -> str:
        return os.path.join(path, DATA_STATE_FILE.format(rank=self.process_index))

    def save(self, path: str) -> None:
        """Write our state into checkpoint folder ``path``: every rank its generator (and its data state), rank 0
        the progress (with the run's wall time so far), LR schedule and EMA."""
        os.makedirs(path, exist_ok=True)
        save_file({"state": self.generator.get_state()}, self._generator_file(path))
        if self.data is not None:
            with open(self._data_file(path), "w") as f:
                json.dump(self.data.state_dict(), f, indent=2, sort_keys=True)
        if self.process_index != 0:
            return
        if self.clock is not None:
            self.progress.wall_time_s = self.clock.total_s()
        state = {"progress": asdict(self.progress), "lr_scheduler": _jsonable(self.lr_scheduler.state_dict())}
        if self.ema is not None:
            ema_state = self.ema.state_dict()
            save_file(ema_state["tensors"], os.path.join(path, EMA_FILE))
            state["ema"] = ema_state["meta"]
        with open(os.path.join(path, STATE_FILE), "w") as f:
            json.dump(state, f, indent=2)

    def load(self, path: str, models: Sequence[torch.nn.Module] = ()) -> None:
        """Restore our state from checkpoint ``path``, first checking the files accelerate reads after this hook.

        Args:
            path: the checkpoint folder.
            models: the (unwrapped) models accelerate will load, to check the saved weights' shapes against.

        Raises:
            ValueError: a file is missing, unreadable (truncated, corrupt) or holds weights of another model
                config; the message names the file. Nothing has been restored then.
        """
        check_checkpoint_files(path, self.process_index, models)
        if self.data is not None:
            self._load_data(path)
        state_file = os.path.join(path, STATE_FILE)
        state = _read(state_file, _load_json)
        generator_state = _read(self._generator_file(path), load_file).get("state")
        if not (isinstance(state, dict) and isinstance(state.get("progress"), dict) and "lr_scheduler" in state
                and generator_state is not None):
            raise ValueError(f"checkpoint {path} is from another program: {state_file} or "
                             f"{self._generator_file(path)} lacks the training state")
        for key, value in state["progress"].items():
            setattr(self.progress, key, value)
        if self.clock is not None:
            self.clock.resume_from(self.progress.wall_time_s)
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.generator.set_state(generator_state)
        if self.ema is not None:
            self._load_ema(path, state)

    def _load_data(self, path: str) -> None:
        """Restore the training set's state (first: it checks that the checkpoint's data state fits this run)."""
        data_file = self._data_file(path)
        state = _read(data_file, _load_json, " (the training set keeps a state: a checkpoint of a run without it, "
                      "or of fewer processes, cannot continue this one)")
        try:
            self.data.load_state_dict(state)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"checkpoint file {data_file} does not fit this run's training data: {err}") from err

    def _load_ema(self, path: str, state: dict) -> None:
        if "ema" not in state:
            raise ValueError(f"checkpoint {path} has no EMA weights but --use_ema is set")
        ema_file = os.path.join(path, EMA_FILE)
        try:
            self.ema.load_state_dict({"tensors": _read(ema_file, load_file), "meta": state["ema"]})
        except (KeyError, ValueError) as err:
            raise ValueError(f"checkpoint file {ema_file} does not fit this model (another model config?): "
                             f"{err}") from err


def data_state_owner(dataset: Any) -> Any:
    """What keeps a training set's state: the dataset (or the images inside a class-conditional
    ``LabelledDataset``, its ``.dataset``) if it has ``state_dict()`` and ``load_state_dict(state)``, else None."""
    inner = getattr(dataset, "dataset", dataset)
    for candidate in (dataset, inner):
        if callable(getattr(candidate, "state_dict", None)) and callable(getattr(candidate, "load_state_dict", None)):
            return candidate
    return None


def _load_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def _open_safetensors(path: str) -> dict[str, tuple[int, ...]]:
    """Parse the header only (it checks that the file is complete): tensor names and shapes."""
    with safe_open(path, framework="pt") as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}


def _open_zip(path: str) -> None:
    # torch.save writes a zip whose directory is at the end: a truncated file cannot be opened.
    with zipfile.ZipFile(path):
        pass


def _read(path: str, reader: Callable[[str], Any], note: str = "") -> Any:
    """``reader(path)``, with any failure re-raised as a ValueError naming the file (and ``note``)."""
    try:
        return reader(path)
    except Exception as err:  # safetensors, zipfile, pickle and json each raise their own error types
        reason = "missing" if isinstance(err, FileNotFoundError) else "unreadable (truncated or corrupt?)"
        raise ValueError(f"checkpoint file {path} is {reason}{note}: {type(err).__name__}: {err}") from err


def check_checkpoint_files(path: str, process_index: int, models: Sequence[torch.nn.Module] = ()) -> None:
    """Check that resuming from ``path`` can read every file, before anything is restored.

    accelerate names no file when one is truncated, and skips an unreadable ``random_states_<rank>.pkl``
    with an info log, which silently loses exact resume (the data order and dropout RNGs live there).

    Args:
        path: the checkpoint folder.
        process_index: this process's rank (whose RNG file must load).
        models: the models accelerate will load, in order; their weights must have the saved shapes.

    Raises:
        ValueError: naming the first missing, unreadable or mismatched file.
    """
    shapes = {}
    for name in sorted(os.listdir(path)):
        file = os.path.join(path, name)
        if name.endswith(".safetensors"):
            shapes[name] = _read(file, _open_safetensors)
        elif name.endswith(".bin"):
            _read(file, _open_zip)
    _read(os.path.join(path, f"{RNG_STATE_NAME}_{process_index}.pkl"), accelerate_load,
          " (without its RNG states the resumed run would not repeat the uninterrupted one)")
    for i, model in enumerate(models):
        name = f"{SAFE_MODEL_NAME}.safetensors" if i == 0 else f"{SAFE_MODEL_NAME}_{i}.safetensors"
        if name in shapes:
            _check_shapes(os.path.join(path, name), shapes[name], model)


def _check_shapes(file: str, saved: dict[str, tuple[int, ...]], model: torch.nn.Module) -> None:
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    differ = [name for name in saved if name in expected and saved[name] != expected[name]]
    missing, unexpected = expected.keys() - saved.keys(), saved.keys() - expected.keys()
    if not (differ or missing or unexpected):
        return
    first = f"; first: {differ[0]} has shape {saved[differ[0]]} there, {expected[differ[0]]} here" if differ else ""
    raise ValueError(f"checkpoint file {file} holds weights of another model config: {len(differ)} tensor(s) "
                     f"differ in shape, {len(missing)} missing, {len(unexpected)} unexpected{first}")


def _jsonable(obj: Any) -> Any:
    """LR-scheduler state as JSON: numbers and lists stay exact, callables (lambdas) become None."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (int, float, str, bool)) or obj is None:
        return obj
    if torch.is_tensor(obj):
        return obj.tolist()
    return None
