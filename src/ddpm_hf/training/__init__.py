"""The training recipe of ``training/train.py`` as importable parts.

- `args`: the three argument dataclasses, `parse_args`, `validate`, the presets and accepted values.
- `components`: `setup_accelerator`, `build_run` (network, scheduler, objective, optimiser, LR schedule, EMA,
  loader) and the `TrainingRun` they fill; `PipelineClasses` picks the classes built and exported.
- `objective`: `DiffusionObjective`, one micro-batch's loss (``model(x_t, t, **model_kwargs)``).
- `loop`: `prepare_output_dir`, `resume`, `start_trackers`, `train_loop`, `ThroughputMeter`.
- `export`: the export folder, grid, evaluation, model card and Hub push (`write_outputs`, `finish`).
"""

from .args import (ARGUMENT_GROUPS, GRID_SAMPLERS, LR_SCHEDULERS, MIXED_PRECISION, MODEL_PRESETS,
                   TRAINABLE_VARIANCE_TYPES, DataArguments, ModelArguments, TrainingArguments, parse_args, public_args,
                   validate)
from .components import PipelineClasses, TrainingRun, build_run, log_dataset, setup_accelerator, unet_config
from .export import GRID_FILENAME, PeriodicOutputs, finish, make_grid, start_pusher, write_outputs
from .loop import (NonFiniteLossError, StepObserver, ThroughputMeter, prepare_output_dir, resume, start_trackers,
                   train_loop)
from .objective import DiffusionObjective

__all__ = [
    "ARGUMENT_GROUPS", "GRID_FILENAME", "GRID_SAMPLERS", "LR_SCHEDULERS", "MIXED_PRECISION", "MODEL_PRESETS",
    "TRAINABLE_VARIANCE_TYPES", "DataArguments", "DiffusionObjective", "ModelArguments", "NonFiniteLossError",
    "PeriodicOutputs", "PipelineClasses", "StepObserver", "ThroughputMeter", "TrainingArguments", "TrainingRun",
    "build_run", "finish", "log_dataset", "make_grid", "parse_args", "prepare_output_dir", "public_args", "resume",
    "setup_accelerator", "start_pusher", "start_trackers", "train_loop", "unet_config", "validate",
]
