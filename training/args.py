"""Command-line / JSON configuration of `training/train.py`, parsed with `transformers.HfArgumentParser`.

Flag names follow diffusers' ``examples/unconditional_image_generation/train_unconditional.py`` where the
concept is the same. Defaults are ours: tuned for the built-in digits on a small CPU (evidence in
``benchmarks/training_defaults.md``).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field

from ddpm_hf.models.presets import UNET_PRESETS

# The network presets shared with the UNet tests and benchmarks; the data decides size and channels. The DDPM
# paper trained its CIFAR-10 network with dropout 0.1, so that preset trains with it too.
MODEL_PRESETS = {name: dict(config) for name, config in UNET_PRESETS.items()}
MODEL_PRESETS["ddpm-cifar10"]["dropout"] = 0.1
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
MIXED_PRECISION = ("no", "fp16", "bf16")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned_range")
GRID_SAMPLERS = ("ddim", "ddpm")


@dataclass
class DataArguments:
    """Where the images come from and how they are prepared."""

    dataset_name: str | None = field(default=None, metadata={"help": "A `datasets` name or local path. Neither this "
                                     "nor --train_data_dir: the built-in sklearn digits (no download)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset's config name."})
    train_data_dir: str | None = field(default=None, metadata={"help": "A folder of images (datasets' imagefolder)."})
    image_column: str = field(default="image", metadata={"help": "The dataset column holding the images."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where `datasets` caches downloads."})
    resolution: int = field(default=16, metadata={"help": "Side of the square training images."})
    center_crop: bool = field(default=False, metadata={"help": "Centre crop (default: random crop)."})
    random_flip: bool = field(default=False, metadata={"help": "Random horizontal flips."})
    num_channels: int | None = field(default=None, metadata={"help": "1 or 3; default: from the data."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes."})


@dataclass
class ModelArguments:
    """The network and the diffusion process."""

    model_preset: str = field(default="tiny", metadata={"help": f"One of {tuple(MODEL_PRESETS)}."})
    model_config_name_or_path: str | None = field(default=None, metadata={"help": "A UNet2DModel config (folder or "
                                                  "config.json); overrides --model_preset."})
    prediction_type: str = field(default="epsilon", metadata={"help": "epsilon, sample or v_prediction."})
    variance_type: str = field(default="fixed_small", metadata={"help": f"One of {VARIANCE_TYPES}; learned_range "
                               "doubles the output channels and trains with the improved-DDPM hybrid loss."})
    ddpm_num_steps: int = field(default=1000, metadata={"help": "Diffusion steps T."})
    ddpm_beta_schedule: str = field(default="linear", metadata={"help": "linear, scaled_linear, squaredcos_cap_v2, "
                                    "sigmoid."})
    ddpm_num_inference_steps: int = field(default=50, metadata={"help": "Sampling steps for grids and --eval."})
    grid_sampler: str = field(default="ddim", metadata={"help": f"One of {GRID_SAMPLERS}: the sampler of grids."})


@dataclass
class TrainingArguments:
    """Optimisation, checkpoints, logging, the Hub and evaluation."""

    output_dir: str = field(default="ddpm-digits", metadata={"help": "The export folder; checkpoints and logs "
                            "go inside it."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Delete an existing --output_dir first."})
    seed: int = field(default=0, metadata={"help": "Seed of weights, data order, noise and timesteps."})
    train_batch_size: int = field(default=64, metadata={"help": "Images per process per micro-batch."})
    eval_batch_size: int = field(default=64, metadata={"help": "Images in each sample grid."})
    num_epochs: int = field(default=36, metadata={"help": "Epochs, unless --max_train_steps is set (36 epochs of "
                            "the digits at batch 64 = 1,044 steps: 6-9 minutes on a 2-core CPU)."})
    max_train_steps: int | None = field(default=None, metadata={"help": "Optimizer steps; overrides --num_epochs."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    learning_rate: float = field(default=2e-3, metadata={"help": "Peak learning rate."})
    lr_scheduler: str = field(default="cosine", metadata={"help": f"One of {LR_SCHEDULERS}."})
    lr_warmup_steps: int = field(default=100, metadata={"help": "Warmup length in optimizer steps."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    adam_weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "Gradient clipping norm (None: off)."})
    use_ema: bool = field(default=True, metadata={"help": "Keep an EMA of the weights and export it."})
    ema_max_decay: float = field(default=0.999, metadata={"help": "EMA decay once warmed up."})
    ema_warmup: bool = field(default=True, metadata={"help": "Warm the EMA decay up (else constant)."})
    ema_inv_gamma: float = field(default=1.0, metadata={"help": "EMA warmup time scale."})
    ema_power: float = field(default=2 / 3, metadata={"help": "EMA warmup exponent."})
    snr_gamma: float | None = field(default=5.0, metadata={"help": "Min-SNR-gamma loss weighting; 0 turns it off."})
    mixed_precision: str | None = field(default=None, metadata={"help": f"One of {MIXED_PRECISION}; default: "
                                        "accelerate's config."})
    num_threads: int | None = field(default=None, metadata={"help": "torch CPU threads per process; default: "
                                    "OMP_NUM_THREADS if set, else 1 (see docs/training.md)."})
    skip_nonfinite_steps: bool = field(default=False, metadata={"help": "Skip optimizer steps whose loss is NaN/inf "
                                       "instead of stopping."})
    checkpointing_steps: int = field(default=500, metadata={"help": "Save a resumable checkpoint every N steps."})
    checkpoints_total_limit: int | None = field(default=None, metadata={"help": "Keep at most N checkpoints."})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "'latest' or a checkpoint folder."})
    save_images_steps: int | None = field(default=None, metadata={"help": "Write a sample grid every N steps "
                                          "(always at the end)."})
    save_model_steps: int | None = field(default=None, metadata={"help": "Export (and push) every N steps "
                                         "(always at the end)."})
    logger: str = field(default="tensorboard", metadata={"help": "tensorboard, wandb, ..., or none."})
    logging_dir: str = field(default="logs", metadata={"help": "Inside --output_dir."})
    logging_steps: int = field(default=10, metadata={"help": "Log scalars every N optimizer steps."})
    push_to_hub: bool = field(default=False, metadata={"help": "Push the export folder to the Hub."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Repo id (default: the output folder name)."})
    hub_private_repo: bool = field(default=False, metadata={"help": "Create the repo as private."})
    hub_token: str | None = field(default=None, metadata={"help": "Hub token (default: HF_TOKEN / login)."})
    eval: bool = field(default=False, metadata={"help": "Compute FID and bits/dim at the end."})
    eval_num_samples: int = field(default=512, metadata={"help": "Generated images for --eval."})


def validate(data: DataArguments, model: ModelArguments, train: TrainingArguments) -> None:
    """Reject bad values with a ValueError (TypeError for a wrong type) naming the flag and what it accepts."""
    for group in (data, model, train):
        _check_types(group)
    positive = {"--resolution": data.resolution, "--ddpm_num_steps": model.ddpm_num_steps,
                "--ddpm_num_inference_steps": model.ddpm_num_inference_steps,
                "--train_batch_size": train.train_batch_size, "--eval_batch_size": train.eval_batch_size,
                "--num_epochs": train.num_epochs, "--gradient_accumulation_steps": train.gradient_accumulation_steps,
                "--checkpointing_steps": train.checkpointing_steps, "--logging_steps": train.logging_steps,
                "--eval_num_samples": train.eval_num_samples}
    optional_positive = {"--max_train_steps": train.max_train_steps, "--save_images_steps": train.save_images_steps,
                         "--save_model_steps": train.save_model_steps, "--num_threads": train.num_threads,
                         "--checkpoints_total_limit": train.checkpoints_total_limit}
    for name, value in list(positive.items()) + [(k, v) for k, v in optional_positive.items() if v is not None]:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    _check_choice("--model_preset", model.model_preset, tuple(MODEL_PRESETS))
    _check_choice("--prediction_type", model.prediction_type, ("epsilon", "sample", "v_prediction"))
    _check_choice("--variance_type", model.variance_type, VARIANCE_TYPES)
    _check_choice("--ddpm_beta_schedule", model.ddpm_beta_schedule,
                  ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"))
    _check_choice("--grid_sampler", model.grid_sampler, GRID_SAMPLERS)
    _check_choice("--lr_scheduler", train.lr_scheduler, LR_SCHEDULERS)
    if train.mixed_precision is not None:
        _check_choice("--mixed_precision", train.mixed_precision, MIXED_PRECISION)
    if data.num_channels not in (None, 1, 3):
        raise ValueError(f"--num_channels must be 1 or 3, got {data.num_channels!r}")
    if data.dataloader_num_workers < 0:
        raise ValueError(f"--dataloader_num_workers must be >= 0, got {data.dataloader_num_workers!r}")
    if model.ddpm_num_inference_steps > model.ddpm_num_steps:
        raise ValueError(f"--ddpm_num_inference_steps ({model.ddpm_num_inference_steps}) must not exceed "
                         f"--ddpm_num_steps ({model.ddpm_num_steps})")
    # accelerate's set_seed seeds numpy, whose seeds are 32-bit.
    _check_range("--seed", train.seed, 0, 2**32 - 1)
    _check_range("--learning_rate", train.learning_rate, 0, None, low_open=True)
    _check_range("--lr_warmup_steps", train.lr_warmup_steps, 0, None)
    _check_range("--adam_beta1", train.adam_beta1, 0, 1, high_open=True)
    _check_range("--adam_beta2", train.adam_beta2, 0, 1, high_open=True)
    _check_range("--adam_weight_decay", train.adam_weight_decay, 0, None)
    _check_range("--adam_epsilon", train.adam_epsilon, 0, None, low_open=True)
    _check_range("--ema_max_decay", train.ema_max_decay, 0, 1, low_open=True, high_open=True)
    _check_range("--ema_inv_gamma", train.ema_inv_gamma, 0, None, low_open=True)
    _check_range("--ema_power", train.ema_power, 0, None, low_open=True)
    if train.max_grad_norm is not None:
        _check_range("--max_grad_norm", train.max_grad_norm, 0, None, low_open=True)
    if train.snr_gamma is not None:
        _check_range("--snr_gamma", train.snr_gamma, 0, None)


def _type_options(hint: object) -> tuple[type, ...]:
    """``int | None`` -> (int, NoneType); ``float`` -> (float,)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _fits(value: object, option: type) -> bool:
    # bool is an int subclass but never a count; an int is a fine float. HfArgumentParser converts flags, but
    # a JSON config reaches the dataclasses as parsed: {"use_ema": "false"} must not mean True.
    if option is bool or isinstance(value, bool):
        return option is bool and isinstance(value, bool)
    if option is float:
        return isinstance(value, (int, float))
    return isinstance(value, option)


def _check_types(arguments: object) -> None:
    hints = typing.get_type_hints(type(arguments))
    for f in dataclasses.fields(arguments):
        value, options = getattr(arguments, f.name), _type_options(hints[f.name])
        if not any(_fits(value, option) for option in options):
            names = " or ".join("None" if o is type(None) else o.__name__ for o in options)
            raise TypeError(f"--{f.name} must be {names}, got {value!r} ({type(value).__name__})")


def _check_choice(name: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _check_range(name: str, value: object, low: float, high: float | None, low_open: bool = False,
                 high_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low)
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {'inf)' if high is None else str(high) + (')' if high_open else ']')}"
        raise ValueError(f"{name} must be a finite number in {interval}, got {value!r}")
