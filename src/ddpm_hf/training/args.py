"""The configuration of a training run: three dataclasses that `transformers.HfArgumentParser` reads from flags
or from one JSON file, and `validate`, which both paths go through.

Flag names follow diffusers' ``examples/unconditional_image_generation/train_unconditional.py`` where the
concept is the same. Defaults are ours: tuned for the built-in digits on a small CPU (evidence in
``benchmarks/training_defaults.md``). Every list of accepted values has one home: the diffusion ones live in
`ddpm_hf.diffusion_math`, the LR schedules in diffusers, the precisions in accelerate; the fields name them in
``metadata["choices"]``, so the parser enforces them for flags, its help lists them, and `validate` checks the
same lists for JSON configs (which reach the dataclasses without the parser's conversion).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib.util
import json
import os
import types
import typing
from dataclasses import asdict, dataclass, field
from typing import Any

from accelerate.utils import LoggerType, PrecisionType
from diffusers.optimization import SchedulerType
from transformers import HfArgumentParser

from .. import diffusion_math as dm
from ..data import DataConfig
from ..model_card import LICENSE_PATTERN, SAMPLERS
from ..models.presets import UNET_PRESETS
from ..validation import check_choice, check_int, check_real, is_bool, is_int, is_real

# The network presets shared with the UNet tests and benchmarks; the data decides size and channels. The DDPM
# paper trained its CIFAR-10 network with dropout 0.1, so that preset trains with it too.
MODEL_PRESETS = {name: dict(config) for name, config in UNET_PRESETS.items()}
MODEL_PRESETS["ddpm-cifar10"]["dropout"] = 0.1
# piecewise_constant needs step rules, which no flag gives.
LR_SCHEDULERS = tuple(t.value for t in SchedulerType if t is not SchedulerType.PIECEWISE_CONSTANT)
# fp8 needs TransformerEngine or MS-AMP kernels, which this network does not use.
MIXED_PRECISION = tuple(p.value for p in PrecisionType if p is not PrecisionType.FP8)
# "learned" (the raw log-variance) has no training loss here; "learned_range" trains the improved-DDPM hybrid loss.
TRAINABLE_VARIANCE_TYPES = tuple(v for v in dm.VARIANCE_TYPES if v != "learned")
GRID_SAMPLERS = tuple(name.lower() for name in SAMPLERS)  # the card names them in capitals
# torch.compile's documented modes (torch._inductor.list_mode_options() holds them; importing it here would add
# seconds to every start).
TORCH_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _choices(values: tuple[str, ...], help_text: str) -> dict:
    return {"choices": values, "help": help_text}


@dataclass
class DataArguments(DataConfig):
    """Where the images come from and how they are prepared (`ddpm_hf.data.DataConfig`), plus the loader."""

    dataloader_num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes."})


@dataclass
class ModelArguments:
    """The network and the diffusion process."""

    model_preset: str = field(default="tiny", metadata=_choices(tuple(MODEL_PRESETS), "The network preset."))
    model_config_name_or_path: str | None = field(default=None, metadata={"help": "A UNet2DModel config (folder or "
                                                  "config.json); overrides --model_preset."})
    prediction_type: str = field(default="epsilon", metadata=_choices(dm.PREDICTION_TYPES, "What the net predicts."))
    variance_type: str = field(default="fixed_small", metadata=_choices(
        TRAINABLE_VARIANCE_TYPES, "learned_range doubles the output channels and trains with the improved-DDPM "
        "hybrid loss."))
    ddpm_num_steps: int = field(default=1000, metadata={"help": "Diffusion steps T."})
    ddpm_beta_schedule: str = field(default="linear", metadata=_choices(dm.BETA_SCHEDULES, "The beta schedule."))
    ddpm_num_inference_steps: int = field(default=50, metadata={"help": "Sampling steps for grids and --eval."})
    grid_sampler: str = field(default="ddim", metadata=_choices(GRID_SAMPLERS, "The sampler of grids and --eval."))
    guidance_scale: float = field(default=1.25, metadata={"help": "Classifier-free guidance scale w of the grid and "
                                  "--eval of a class-conditional model (1: the conditional model alone; 1.25: the "
                                  "best of benchmarks/results/cfg_sweep.md)."})


@dataclass
class TrainingArguments:
    """Optimisation, checkpoints, logging, the Hub and evaluation."""

    output_dir: str = field(default="ddpm-digits", metadata={"help": "The export folder; checkpoints and logs "
                            "go inside it."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Delete an existing --output_dir first."})
    seed: int = field(default=0, metadata={"help": "Seed of weights, data order, noise and timesteps."})
    train_batch_size: int = field(default=64, metadata={"help": "Images per process per micro-batch."})
    eval_batch_size: int = field(default=64, metadata={"help": "Images in each sample grid."})
    num_epochs: int = field(default=48, metadata={"help": "Epochs, unless --max_train_steps is set (48 epochs of the "
                            "1,347 training digits at batch 64 = 1,056 steps, the budget the defaults were tuned at)."})
    max_train_steps: int | None = field(default=None, metadata={"help": "Optimizer steps; overrides --num_epochs."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    learning_rate: float = field(default=2e-3, metadata={"help": "Peak learning rate."})
    lr_scheduler: str = field(default="cosine", metadata=_choices(LR_SCHEDULERS, "The LR schedule."))
    lr_warmup_steps: int = field(default=100, metadata={"help": "Warmup length in optimizer steps."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    adam_weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "Gradient clipping norm (None: off)."})
    use_ema: bool = field(default=True, metadata={"help": "Keep an EMA of the weights and export it."})
    ema_max_decay: float = field(default=0.999, metadata={"help": "EMA decay once warmed up (its upper clamp)."})
    ema_min_decay: float = field(default=0.0, metadata={"help": "Lower clamp of the EMA decay; equal to "
                                 "--ema_max_decay: a constant decay from the second update on."})
    ema_warmup: bool = field(default=True, metadata={"help": "Warm the EMA decay up as 1 - (1 + k / inv_gamma)^-power "
                             "(else diffusers' (1 + k) / (10 + k) ramp), as diffusers' EMAModel does."})
    ema_inv_gamma: float = field(default=1.0, metadata={"help": "EMA warmup time scale."})
    ema_power: float = field(default=2 / 3, metadata={"help": "EMA warmup exponent."})
    snr_gamma: float | None = field(default=5.0, metadata={"help": "Min-SNR-gamma loss weighting; 0 turns it off."})
    cond_drop_prob: float = field(default=0.1, metadata={"help": "With --class_conditional: the probability that a "
                                  "label is trained as the null class (classifier-free guidance)."})
    mixed_precision: str | None = field(default=None, metadata=_choices(MIXED_PRECISION, "Default: accelerate's "
                                        "config."))
    num_threads: int | None = field(default=None, metadata={"help": "torch CPU threads per process; default: "
                                    "OMP_NUM_THREADS if set, else 1 (see docs/training.md)."})
    torch_compile: bool = field(default=False, metadata={"help": "Compile the network with torch.compile (Inductor) "
                                "through accelerate; the first optimizer step pays the compilation (logged as the "
                                "time to first step). Default: accelerate's config (--dynamo_backend)."})
    torch_compile_mode: str = field(default="default", metadata=_choices(TORCH_COMPILE_MODES, "torch.compile's mode "
                                    "with --torch_compile."))
    ddp_timeout: int = field(default=1800, metadata={"help": "Seconds a process waits for the others in a "
                             "collective (gradient all-reduce, barrier) before it fails: a rank that stops answering "
                             "ends the run after this long instead of hanging it (torch's and transformers' default "
                             "1800)."})
    skip_nonfinite_steps: bool = field(default=False, metadata={"help": "Skip optimizer steps whose loss is NaN/inf "
                                       "instead of stopping."})
    checkpointing_steps: int = field(default=500, metadata={"help": "Save a resumable checkpoint every N steps."})
    checkpointing_minutes: float | None = field(default=None, metadata={"help": "Also save a checkpoint once N "
                                                "minutes have passed since the last one (for pre-emptible machines)."})
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
    license: str | None = field(default=None, metadata={"help": "The license the model card declares (a Hub "
                                "identifier such as apache-2.0 or mit); default: none is claimed."})
    eval: bool = field(default=False, metadata={"help": "Compute FID and bits/dim at the end."})
    eval_num_samples: int = field(default=512, metadata={"help": "Generated images for --eval."})


ARGUMENT_GROUPS = (DataArguments, ModelArguments, TrainingArguments)

# The arguments that leave the trained weights and training state unchanged: where outputs go, how often they are
# written, logging, the Hub, evaluation and sampling for the grid, threads. Every other argument is part of a
# run's identity (`ddpm_hf.training.output_folder.run_identity`): a checkpoint of another identity is not resumed.
# The network file and the precision enter the identity by their effect (the network config, the precision in
# force), not by their spelling.
RESULT_NEUTRAL_ARGS = frozenset({
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "checkpointing_steps", "checkpointing_minutes",
    "checkpoints_total_limit", "save_images_steps", "save_model_steps", "logger", "logging_dir", "logging_steps",
    "push_to_hub", "hub_model_id", "hub_private_repo", "hub_token", "license", "eval", "eval_num_samples",
    "eval_batch_size", "grid_sampler", "ddpm_num_inference_steps", "guidance_scale", "num_threads",
    "dataloader_num_workers", "ddp_timeout",
    "cache_dir", "skip_nonfinite_steps", "model_config_name_or_path", "mixed_precision",
})
# The run's length may change on resume (to train longer), with a warning: the LR schedule is rebuilt for the new
# length, so the result is not that of an uninterrupted run of that length.
RESUMABLE_CHANGES = frozenset({"max_train_steps", "num_epochs"})
# How the same recipe is executed: compiling changes the float rounding (fused kernels), not what is trained. These
# stay outside the identity, are recorded beside it (what is in force: accelerate's config may compile too), and a
# resume that changes them is allowed with a warning (its result is close to, not bit-identical with, an
# uninterrupted run).
EXECUTION_ARGS = frozenset({"torch_compile", "torch_compile_mode"})


def public_args(*arg_groups: object) -> dict[str, Any]:
    """All arguments as one dict, minus the token (what trackers and the model card record)."""
    merged: dict[str, Any] = {}
    for group in arg_groups:
        merged.update(asdict(group))
    merged.pop("hub_token", None)
    return merged


def parse_args(argv: list[str]) -> tuple[DataArguments, ModelArguments, TrainingArguments]:
    """Parse flags, or a single JSON file holding the same keys, and `validate` them.

    Args:
        argv: the command line after the script name.

    Returns:
        The three argument groups.

    Raises:
        ValueError: a bad value (or TypeError, a JSON value of the wrong type), naming the flag.
    """
    parser = HfArgumentParser(ARGUMENT_GROUPS, exit_on_error=False)
    try:
        if argv and argv[0].endswith(".json"):
            parsed = _parse_json(parser, argv)
        else:
            _check_flag_names(parser, argv)
            parsed = parser.parse_args_into_dataclasses(args=argv)
    except argparse.ArgumentError as err:  # a flag the parser rejects: its message names the flag and the choices
        raise ValueError(str(err)) from None
    data_args, model_args, train_args = parsed
    validate(data_args, model_args, train_args)
    return data_args, model_args, train_args


def _parse_json(parser: HfArgumentParser, argv: list[str]) -> tuple:
    """The argument groups from the JSON file ``argv[0]``; errors name the file."""
    path = argv[0]
    if len(argv) > 1:
        raise ValueError(f"a JSON config ({path}) cannot be combined with flags ({' '.join(argv[1:])}): put them "
                         "into the file, or give flags only")
    try:
        return parser.parse_json_file(os.path.abspath(path))
    except FileNotFoundError:
        raise ValueError(f"config file {path!r} does not exist") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"config file {path} is not valid JSON: {err}") from None
    except ValueError as err:  # keys that are no flag
        raise ValueError(f"config file {path}: {err}") from None


def _check_flag_names(parser: HfArgumentParser, argv: list[str]) -> None:
    """An unknown ``--flag`` is named with the closest known ones (argparse would only list it as unused)."""
    known = [option for option in parser._option_string_actions if option.startswith("--")]
    for token in argv:
        name = token.split("=", 1)[0]
        if name.startswith("--") and name not in known:
            close = difflib.get_close_matches(name, [k for k in known if "-" not in k[2:]], n=2)  # no dash aliases
            hint = f" (did you mean {' or '.join(close)}?)" if close else " (see --help)"
            raise ValueError(f"unknown flag {name}{hint}")


def _check_logger(name: str) -> None:
    """``--logger`` names an accelerate tracker whose package is installed (accelerate would only warn)."""
    check_choice("--logger", name, ("none",) + tuple(t.value for t in LoggerType))
    if name not in ("none", "all") and importlib.util.find_spec(name) is None:
        raise ValueError(f"--logger {name} needs the {name} package, which is not installed: pip install {name} "
                         "(or pass --logger none)")


def validate(data: DataArguments, model: ModelArguments, train: TrainingArguments) -> None:
    """Reject bad values with a ValueError (TypeError for a wrong type) naming the flag and what it accepts.

    Args:
        data, model, train: the three argument groups.
    """
    for group in (data, model, train):
        _check_types(group)
        _check_choices(group)
    counts = {"--resolution": data.resolution, "--ddpm_num_steps": model.ddpm_num_steps,
              "--ddpm_num_inference_steps": model.ddpm_num_inference_steps,
              "--train_batch_size": train.train_batch_size, "--eval_batch_size": train.eval_batch_size,
              "--num_epochs": train.num_epochs, "--gradient_accumulation_steps": train.gradient_accumulation_steps,
              "--checkpointing_steps": train.checkpointing_steps, "--logging_steps": train.logging_steps,
              "--eval_num_samples": train.eval_num_samples, "--max_train_steps": train.max_train_steps,
              "--save_images_steps": train.save_images_steps, "--save_model_steps": train.save_model_steps,
              "--num_threads": train.num_threads, "--checkpoints_total_limit": train.checkpoints_total_limit,
              "--ddp_timeout": train.ddp_timeout}
    for name, value in counts.items():
        if value is not None:
            check_int(name, value, 1)
    check_int("--dataloader_num_workers", data.dataloader_num_workers, 0)
    _check_logger(train.logger)
    if train.checkpointing_minutes is not None:
        check_real("--checkpointing_minutes", train.checkpointing_minutes, 0, float("inf"), high_open=True)
    if train.overwrite_output_dir and train.resume_from_checkpoint is not None:
        # Overwriting would delete the very checkpoints a resume reads: refuse before anything is touched.
        raise ValueError(f"--overwrite_output_dir true deletes the checkpoints that --resume_from_checkpoint "
                         f"{train.resume_from_checkpoint!r} would continue from: give one of them, not both")
    check_int("--lr_warmup_steps", train.lr_warmup_steps, 0)
    if data.num_channels not in (None, 1, 3):
        raise ValueError(f"--num_channels must be 1 or 3, got {data.num_channels!r}")
    if model.ddpm_num_inference_steps > model.ddpm_num_steps:
        raise ValueError(f"--ddpm_num_inference_steps ({model.ddpm_num_inference_steps}) must not exceed "
                         f"--ddpm_num_steps ({model.ddpm_num_steps})")
    check_real("--guidance_scale", model.guidance_scale, 0, float("inf"), low_open=False, high_open=True)
    check_int("--seed", train.seed, 0)
    if train.seed > 2**32 - 1:  # accelerate's set_seed seeds numpy, whose seeds are 32-bit
        raise ValueError(f"--seed must be at most 2**32 - 1 = {2**32 - 1}, got {train.seed}")
    if train.license is not None and not LICENSE_PATTERN.fullmatch(train.license):
        raise ValueError(f"--license must be a Hub license identifier such as 'apache-2.0', 'mit' or 'other' "
                         f"(lower case, no spaces), got {train.license!r}")
    _check_optimisation(train)
    _check_streaming(data, train)


def _check_streaming(data: DataArguments, train: TrainingArguments) -> None:
    """``--streaming``: a source to stream, a length in optimizer steps (a stream's is unknown), and the parts
    that read the whole training set up front turned off."""
    check_int("--shuffle_buffer_size", data.shuffle_buffer_size, 1)
    if not data.streaming:
        return
    if data.dataset_name is None and data.train_data_dir is None:
        raise ValueError("--streaming needs --dataset_name or --train_data_dir (the built-in digits are not streamed)")
    if train.max_train_steps is None:
        raise ValueError("--streaming needs --max_train_steps: a stream's length is unknown, so --num_epochs cannot "
                         "set the run's length (the LR schedule, progress bar and checkpoints count optimizer steps)")
    for flag, value in (("--class_conditional", data.class_conditional), ("--eval", train.eval)):
        if value:
            raise ValueError(f"--streaming cannot be combined with {flag} yet (it reads the labels or reference "
                             "images of the whole training set up front)")


def _check_optimisation(train: TrainingArguments) -> None:
    """The real-valued flags: each inside its interval (inf means unbounded)."""
    inf = float("inf")
    check_real("--learning_rate", train.learning_rate, 0, inf, high_open=True)
    check_real("--adam_beta1", train.adam_beta1, 0, 1, low_open=False, high_open=True)
    check_real("--adam_beta2", train.adam_beta2, 0, 1, low_open=False, high_open=True)
    check_real("--adam_weight_decay", train.adam_weight_decay, 0, inf, low_open=False, high_open=True)
    check_real("--adam_epsilon", train.adam_epsilon, 0, inf, high_open=True)
    check_real("--ema_max_decay", train.ema_max_decay, 0, 1, high_open=True)
    check_real("--ema_min_decay", train.ema_min_decay, 0, train.ema_max_decay, low_open=False)
    check_real("--ema_inv_gamma", train.ema_inv_gamma, 0, inf, high_open=True)
    check_real("--ema_power", train.ema_power, 0, inf, high_open=True)
    if train.max_grad_norm is not None:
        check_real("--max_grad_norm", train.max_grad_norm, 0, inf, high_open=True)
    if train.snr_gamma is not None:
        check_real("--snr_gamma", train.snr_gamma, 0, inf, low_open=False, high_open=True)
    check_real("--cond_drop_prob", train.cond_drop_prob, 0, 1, low_open=False, high_open=True)


def _check_choices(arguments: object) -> None:
    """Every field declaring ``metadata["choices"]`` holds one of them (None where the type allows None)."""
    for f in dataclasses.fields(arguments):
        value = getattr(arguments, f.name)
        if "choices" in f.metadata and value is not None:
            check_choice(f"--{f.name}", value, f.metadata["choices"])


def _type_options(hint: object) -> tuple[type, ...]:
    """``int | None`` -> (int, NoneType); ``float`` -> (float,)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _fits(value: object, option: type) -> bool:
    # bool is an int subclass but never a count; an int is a fine float. HfArgumentParser converts flags, but
    # a JSON config reaches the dataclasses as parsed: {"use_ema": "false"} must not mean True.
    if option is bool:
        return is_bool(value)
    if option is int:
        return is_int(value)
    if option is float:
        return is_real(value)
    return isinstance(value, option) and not is_bool(value)


def _check_types(arguments: object) -> None:
    hints = typing.get_type_hints(type(arguments))
    for f in dataclasses.fields(arguments):
        value, options = getattr(arguments, f.name), _type_options(hints[f.name])
        if not any(_fits(value, option) for option in options):
            names = " or ".join("None" if o is type(None) else o.__name__ for o in options)
            raise TypeError(f"--{f.name} must be {names}, got {value!r} ({type(value).__name__})")
