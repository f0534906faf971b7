"""One run per output folder: a run's identity, the checks before anything is written, and what overwriting removes.

A run's identity is every argument that changes the trained weights (all but ``RESULT_NEUTRAL_ARGS`` of
`ddpm_hf.training.args`), with the network file and the precision replaced by their effect (the network
config, the precision in force), plus the classes, the process count and the data's size; how it is executed
(torch.compile) is recorded beside it, outside the hash, since it changes the rounding, not the recipe. It is written to
``ddpm_hf_run.json`` in the output folder at the start and into every checkpoint's completion marker, and
compared before a run touches the folder:

- a new run (no ``--resume_from_checkpoint``) into a folder holding checkpoints or an export is refused,
  naming them (``--overwrite_output_dir true`` replaces them, ``--resume_from_checkpoint latest`` continues);
- resuming a checkpoint, or a folder, of another identity is refused, naming the keys that differ.

Overwriting removes only what a run of ours writes, known by name (`run_outputs`); other files stay.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from typing import Any

from ..checkpointing import PREFIX, read_marker, resolve_checkpoint
from .args import EXECUTION_ARGS, RESULT_NEUTRAL_ARGS, RESUMABLE_CHANGES, public_args
from .components import TrainingRun, compile_settings
from .export import GRID_FILENAME
from .loss_history import HISTORY_FILENAME, PLOT_FILENAME

logger = logging.getLogger("ddpm_hf.train")

RUN_FILE = "ddpm_hf_run.json"
# Arguments of evaluation only, recorded beside the identity (the evaluate CLI rebuilds the reference from them)
# but outside its hash: adding --eval_data_dir to a resumed run is fine.
EVALUATION_ARGS = ("eval_data_dir",)
# Besides the pipeline's component folders (named in its model_index.json) and the checkpoints.
_EXPORT_ENTRIES = ("model_index.json", "unet_raw", "README.md", GRID_FILENAME, HISTORY_FILENAME, PLOT_FILENAME,
                   ".export.partial", RUN_FILE)
_CHECKPOINT_ENTRY = re.compile(rf"^(\.)?{PREFIX}\d+(\.partial|\.old)?$")
# What a run recorded before executions were recorded: accelerate's default, no compilation.
_EAGER = {"dynamo_backend": "no", "dynamo_mode": None}


def run_identity(run: TrainingRun) -> dict[str, Any]:
    """The run's identity: ``{"config_hash", "seed", "config", "length", "evaluation", "execution"}`` (JSON
    values).

    ``config_hash`` is the SHA-256 of ``config`` as sorted JSON (with the data's image count, channels and
    images held out for evaluation); ``length`` holds the `RESUMABLE_CHANGES` arguments, ``evaluation`` the
    `EVALUATION_ARGS` and ``execution`` the torch.compile backend and mode in force (`EXECUTION_ARGS`, or
    accelerate's config), all outside the hash.
    """
    args = public_args(run.data_args, run.model_args, run.args)
    outside = RESULT_NEUTRAL_ARGS | RESUMABLE_CHANGES | EXECUTION_ARGS | set(EVALUATION_ARGS)
    config = {key: value for key, value in args.items() if key not in outside}
    unet_config = run.accelerator.unwrap_model(run.model).config
    config.update(
        unet_config={k: v for k, v in unet_config.items() if not k.startswith("_")},
        mixed_precision=str(run.accelerator.mixed_precision),
        classes=[f"{c.__module__}.{c.__qualname__}" for c in (run.classes.unet, run.classes.ddpm_scheduler)],
        num_processes=run.accelerator.num_processes,
        num_images=run.dataset.info.num_images,
        num_channels=run.dataset.info.num_channels,
        num_heldout=run.dataset.info.num_heldout,
    )
    config = json.loads(json.dumps(config, sort_keys=True, default=str))  # tuples -> lists, as read back
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    length = {key: args[key] for key in sorted(RESUMABLE_CHANGES)}
    evaluation = {key: args[key] for key in EVALUATION_ARGS}
    return {"config_hash": digest, "seed": run.args.seed, "config": config, "length": length,
            "evaluation": evaluation, "execution": compile_settings(run.accelerator)}



def differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"key: saved -> current"`` for each config key that differs (network config keys as ``unet_config.key``)."""
    out = []
    for key in sorted(saved.keys() | current.keys()):
        old, new = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            out += [f"{key}.{line}" for line in differences(old, new)]
        else:
            out.append(f"{key}: {old!r} -> {new!r}")
    return out


def run_outputs(output_dir: str, logging_dir: str = "logs") -> list[str]:
    """The entries of ``output_dir`` that a run of ours wrote, by name: the export (the components its
    ``model_index.json`` names, ``unet_raw``, card, grid, run file), checkpoints and partial saves, and
    ``logs`` (and ``logging_dir`` when it is a name inside the folder)."""
    if not os.path.isdir(output_dir):
        return []
    names = set(_EXPORT_ENTRIES) | {"logs", os.path.normpath(logging_dir)} | _components(output_dir)
    return sorted(n for n in os.listdir(output_dir) if n in names or _CHECKPOINT_ENTRY.match(n))


def _components(output_dir: str) -> set[str]:
    try:
        with open(os.path.join(output_dir, "model_index.json")) as f:
            index = json.load(f)
    except (OSError, ValueError):
        return set()
    return {key for key, value in index.items() if not key.startswith("_") and isinstance(value, list)}


def check_output_dir(run: TrainingRun, identity: dict[str, Any]) -> None:
    """Refuse a folder that is a file, holds another run's outputs, or a checkpoint of another identity.

    Read-only, so every process can call it before anything is written.

    Raises:
        ValueError: naming the folder or checkpoint, what is there, the differing keys and what to do.
    """
    args = run.args
    out = args.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--output_dir {out!r} is an existing file, not a folder: give a folder path")
    if args.overwrite_output_dir:
        return
    if args.resume_from_checkpoint is None:
        held = [name for name in run_outputs(out) if name == "model_index.json" or _CHECKPOINT_ENTRY.match(name)]
        if held:
            raise ValueError(
                f"--output_dir {out} holds another run's export or checkpoints ({', '.join(held)}): pass "
                "--resume_from_checkpoint latest to continue that run, --overwrite_output_dir true to replace it, "
                "or another --output_dir")
        return
    checkpoint = resolve_checkpoint(out, args.resume_from_checkpoint)
    if checkpoint is not None:
        _check_identity(f"cannot resume from {checkpoint}", read_marker(checkpoint), identity)
    folder_run = read_run_file(out)
    inside = checkpoint is not None and os.path.samefile(os.path.dirname(os.path.abspath(checkpoint)), out)
    if folder_run is not None and not inside:  # a checkpoint from elsewhere, or none yet: the folder's run counts
        _check_identity(f"cannot continue the run in --output_dir {out}", folder_run, identity)


def _check_identity(what: str, saved: dict[str, Any] | None, identity: dict[str, Any]) -> None:
    if saved is None or "config_hash" not in saved:
        logger.warning("%s: it records no run identity (written by an older ddpm_hf): cannot check that it is this "
                       "run's", what.replace("cannot ", "about to ", 1))
        return
    if saved["config_hash"] == identity["config_hash"]:
        changed = differences(saved.get("length", {}), identity["length"])
        if changed:
            logger.warning("The run's length changed (%s): the LR schedule is rebuilt for the new length, so the "
                           "result differs from an uninterrupted run of either length", "; ".join(changed))
        executed = differences(saved.get("execution", _EAGER), identity["execution"])
        if executed:
            logger.warning("The run's execution changed (%s): the same recipe, but compiled kernels round floats "
                           "differently, so the result is close to, not bit-identical with, an uninterrupted run",
                           "; ".join(executed))
        return
    diff = differences(saved.get("config", {}), identity["config"])
    raise ValueError(f"{what}: it belongs to another run; these settings differ (there -> now): "
                     f"{'; '.join(diff) or 'the config hash'}. Rerun with its settings, or start a new run with "
                     "another --output_dir (or --overwrite_output_dir true)")


def read_run_file(output_dir: str) -> dict[str, Any] | None:
    """The identity `write_run_file` recorded in ``output_dir``, or None when there is none.

    Raises:
        ValueError: the file is unreadable, naming it.
    """
    path = os.path.join(output_dir, RUN_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is unreadable ({err}): remove it or pass --overwrite_output_dir true") from err


def write_run_file(output_dir: str, identity: dict[str, Any]) -> None:
    """Record the run's identity in ``output_dir`` (written to a temporary name, then renamed)."""
    path = os.path.join(output_dir, RUN_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(identity, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)


def clear_run_outputs(output_dir: str, logging_dir: str = "logs") -> list[str]:
    """Remove what a run of ours wrote in ``output_dir`` (`run_outputs`); returns the names removed."""
    removed = run_outputs(output_dir, logging_dir)
    for name in removed:
        path = os.path.join(output_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    return removed
