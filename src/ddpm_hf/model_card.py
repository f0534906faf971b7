"""Render the model card (``README.md``) of a training export from the repo-root ``model_card.md`` Jinja template.

Every sentence on the card is derived from two sources: the saved folder itself (``model_index.json``,
``scheduler/scheduler_config.json``, ``unet/config.json``: whether stock diffusers loads it, the scheduler, the
image size, a valid number of sampling steps) and the :class:`RunFacts` the training script records (data,
split, steps, whole-run wall time, license, the grid's sampler, what the evaluation was measured against).

The YAML header is produced by ``huggingface_hub.ModelCardData`` (``yaml.dump``), never by string templating,
so user-provided strings cannot break it; only a Hub dataset id goes into ``datasets:`` and a license only when
the user chose one. Strings placed in the Markdown body are flattened to one line and table-escaped; the repo id
in the usage snippets is a Python string literal. Secrets (``hub_token`` and anything named like a token,
password or key, plus any HF-token-shaped string) are removed from the training arguments before rendering,
and absolute local paths among them are reduced to their last component.

A class-conditional model's card (``RunFacts.class_names``, checked against the saved unet's ``num_class_embeds =
K + 1``) lists the classes, says the grid's rows and guidance scale, and shows ``class_labels=`` /
``guidance_scale=`` snippets; its evaluation is ``evaluate_conditional``'s per-class one. The facts themselves are
defined in `ddpm_hf.card_facts`.
"""

from __future__ import annotations

import json
import os
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

# The facts live in card_facts; they are imported from here too (the card's public interface).
from .card_evaluation import (COUNT_KEYS, CONTEXT_KEYS, EVAL_KEY, evaluation_notes, measured_on, metric_label,
                              model_index_results)
from .card_facts import SAMPLERS, EvalFacts, GridFacts, RunFacts  # noqa: F401
from .data import DIGITS_NAME
from .hub import scrub_secrets
from .shipped_files import shipped_file
from .validation import check_bool, check_int, is_finite_real, is_int

TEMPLATE_PATH = shipped_file("model_card.md", "model_card.md")
UNCONDITIONAL_TAG = "unconditional-image-generation"  # also the pipeline tag of an unconditional model
CONDITIONAL_TASK = "class-conditional-image-generation"  # the model-index task of a class-conditional model
TAGS = ("ddpm", "diffusers", "diffusers-ddpm", "ddpm_hf", UNCONDITIONAL_TAG)
CONDITIONAL_TAGS = TAGS[:-1] + ("class-conditional", "classifier-free-guidance")
SNIPPET_BATCH = 16  # images the usage snippets draw
STOCK_PIPELINE = "DDPMPipeline"
_SECRET_KEY = re.compile(r"token|password|passwd|secret|api[_-]?key|credential", re.IGNORECASE)
# Hub license identifiers are lower-case slugs such as apache-2.0, mit, cc-by-4.0, openrail++ or other.
LICENSE_PATTERN = re.compile(r"[a-z0-9][a-z0-9.+_-]*")  # Hub license ids: apache-2.0, mit, cc-by-4.0, other
# A reference described as held out (but not "not held out") while EvalFacts.heldout is False contradicts itself.
_HELD_OUT_WORDS = re.compile(r"(?<!not )held[\s-]*out|unseen|never seen|not trained on", re.IGNORECASE)
# Run bookkeeping the card states in its own words (the whole run's wall time comes from RunFacts.wall_time_s).
_BOOKKEEPING_KEY = re.compile(r"global_step|wall_time.*")
SKIPPED_KEY = "skipped_unreadable_images"  # the training loop's count, stated in the card's Training list


@dataclass(frozen=True)
class SavedFolder:
    """What the export folder itself says (read from its JSON files)."""

    stock: bool  # model_index names diffusers' DDPMPipeline (no remote-code file)
    scheduler_name: str
    scheduler_config: dict[str, Any]
    num_train_timesteps: int
    sample_size: int
    in_channels: int
    num_class_embeds: int | None


class _AsciiCardData(ModelCardData):
    """Card metadata dumped as ASCII YAML (non-ASCII characters as escapes).

    huggingface_hub dumps with ``allow_unicode=True``, which writes characters such as U+0085 (NEL) and
    U+2028 raw; YAML reads those back as line breaks, so a string containing one would not round-trip.
    """

    def to_yaml(self, line_break=None, original_order=None) -> str:
        del original_order  # we always dump in insertion order
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=False, line_break=line_break).strip()


class _Card(ModelCard):
    card_data_class = _AsciiCardData


def strip_secrets(training_args: dict[str, Any]) -> dict[str, Any]:
    """Return ``training_args`` without secret-named keys and with token-shaped strings masked.

    Args:
        training_args: the run's arguments (flat or nested; nested dicts are cleaned recursively).

    Returns:
        A new dict safe to publish.
    """
    if not isinstance(training_args, dict):
        raise TypeError(f"training_args must be a dict, got {type(training_args).__name__}")
    clean: dict[str, Any] = {}
    for key, value in training_args.items():
        if _SECRET_KEY.search(str(key)):
            continue
        if isinstance(value, dict):
            value = strip_secrets(value)
        elif isinstance(value, str):
            value = scrub_secrets(value)
        clean[str(key)] = value
    return clean


def _without_local_paths(value: Any) -> Any:
    """Absolute local paths reduced to their last component (a published card must not show a user's folders)."""
    if isinstance(value, dict):
        return {k: _without_local_paths(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_without_local_paths(v) for v in value]
    if isinstance(value, str) and (os.path.isabs(value) or value.startswith("~")):
        return os.path.basename(os.path.normpath(value))
    return value


def _inline(text: Any) -> str:
    """One Markdown line: whitespace runs (newlines included) collapsed, table pipes and backticks escaped."""
    flat = " ".join(str(text).split())
    return flat.replace("\\", "\\\\").replace("|", "\\|").replace("`", "\\`")


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, float) for v in value):
        return "[" + ", ".join(f"{v:.4g}" for v in value) + "]"  # per-class metrics: readable in a table cell
    if isinstance(value, (list, tuple, dict)):
        value = json.dumps(value, default=str)
    return _inline(value)


def _format_duration(seconds: float) -> str:
    if not is_finite_real(seconds) or seconds < 0:
        raise ValueError(f"wall_time_s must be a finite number of seconds >= 0, got {seconds!r}")
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min {secs:02d} s" if hours else f"{minutes} min {secs:02d} s"


# ---- the saved folder --------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {str(path)!r} of the saved pipeline: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object")
    return data


def read_saved_folder(output_dir: str | os.PathLike) -> SavedFolder:
    """Read the facts the card states from a saved ``DDPMPipeline`` folder.

    Args:
        output_dir: the folder ``save_pretrained`` wrote.

    Returns:
        A :class:`SavedFolder`.

    Raises:
        ValueError: a JSON file is missing or malformed (named), or the scheduler entry is not ``[lib, class]``.
    """
    out = Path(output_dir)
    index = _read_json(out / "model_index.json")
    entry = index.get("scheduler")
    if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str)):
        raise ValueError(f"model_index.json in {str(out)!r} has no [library, class] scheduler entry, got {entry!r}")
    scheduler_config = _read_json(out / "scheduler" / "scheduler_config.json")
    unet = _read_json(out / "unet" / "config.json")
    size = unet.get("sample_size")
    return SavedFolder(
        stock=index.get("_class_name") == STOCK_PIPELINE and not (out / "pipeline_ddpm_hf.py").exists(),
        scheduler_name=entry[1],
        scheduler_config=scheduler_config,
        num_train_timesteps=int(scheduler_config.get("num_train_timesteps", 1000)),
        sample_size=int(size[0] if isinstance(size, (list, tuple)) else size),
        in_channels=int(unet.get("in_channels", 3)),
        num_class_embeds=unet.get("num_class_embeds"),
    )


def _saved_scheduler(folder: SavedFolder):
    """ddpm_hf's (or diffusers') scheduler class the folder names, built from its saved config."""
    from .schedulers.registry import scheduler_class

    return scheduler_class(folder.scheduler_name).from_config(folder.scheduler_config)


def default_sampling_steps(folder: SavedFolder) -> int:
    """Steps the card's diffusers snippet uses: the scheduler contract's default (DDPM: its full chain of
    ``num_train_timesteps``; DDIM and multistep solvers: min(50, T)), so never more than the scheduler takes."""
    from .schedulers.registry import contract_for

    return contract_for(_saved_scheduler(folder)).default_num_inference_steps()


def remote_code_reasons(folder: SavedFolder) -> list[str]:
    """Why stock diffusers would sample the saved scheduler differently (the scheduler contract's answer)."""
    from .schedulers.registry import contract_for

    return contract_for(_saved_scheduler(folder)).stock_divergences()


# ---- the run -----------------------------------------------------------------------------------------------------


def _check_run(run: RunFacts, folder: SavedFolder, out: Path) -> None:
    """Validate the run facts up front, naming the field."""
    if not isinstance(run, RunFacts):
        raise TypeError(f"run must be a RunFacts, got {type(run).__name__}")
    if run.repo_id is not None:
        validate_repo_id(run.repo_id)  # raises HFValidationError (a ValueError) naming the bad id
    for name in ("dataset_name", "train_split"):
        value = getattr(run, name)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"RunFacts.{name} must be a non-empty string, got {value!r}")
    if not isinstance(run.metrics, dict):
        raise TypeError(f"RunFacts.metrics must be a dict, got {type(run.metrics).__name__}")
    check_int("RunFacts.global_step", run.global_step, 0)
    if run.license is not None and (not isinstance(run.license, str) or not LICENSE_PATTERN.fullmatch(run.license)):
        raise ValueError(f"RunFacts.license must be a Hub license id (e.g. 'apache-2.0', 'mit') or None, "
                         f"got {run.license!r}")
    if run.grid is not None:
        run.grid.check("RunFacts.grid", folder.num_train_timesteps)
        if not (out / run.grid.filename).is_file():
            raise ValueError(f"RunFacts.grid.filename {run.grid.filename!r} is not a file in {str(out)!r}")
    if run.loss_plot is not None and not (out / run.loss_plot).is_file():
        raise ValueError(f"RunFacts.loss_plot {run.loss_plot!r} is not a file in {str(out)!r}")
    skipped = run.metrics.get(SKIPPED_KEY)
    if skipped is not None:
        check_int(f"RunFacts.metrics[{SKIPPED_KEY!r}]", skipped, 0)
    stray = sorted(k for k in run.metrics if EVAL_KEY.fullmatch(k))
    if run.evaluation is None and stray:
        raise ValueError(f"RunFacts.metrics holds evaluation results {stray} but RunFacts.evaluation is None: pass "
                         "an EvalFacts saying what they were measured against")
    if run.evaluation is not None:
        _check_evaluation(run.evaluation, folder)
    _check_classes(run, folder)


def _check_classes(run: RunFacts, folder: SavedFolder) -> None:
    """Class names only for a network that embeds them plus the null class; a grid then states its guidance."""
    names = run.class_names
    if names is None:
        if folder.num_class_embeds is not None:
            raise ValueError(f"the saved unet is class-conditional (num_class_embeds={folder.num_class_embeds}) but "
                             "RunFacts.class_names is None")
        return
    if not (isinstance(names, tuple) and len(names) >= 2 and all(isinstance(n, str) and n.strip() for n in names)
            and len(set(names)) == len(names)):
        raise ValueError(f"RunFacts.class_names must be a tuple of at least 2 distinct non-empty strings, got {names!r}")
    if folder.num_class_embeds != len(names) + 1:
        raise ValueError(f"RunFacts.class_names has {len(names)} classes, so the saved unet needs num_class_embeds="
                         f"{len(names) + 1} (with the null class), but it has {folder.num_class_embeds}")
    if run.grid is not None and run.grid.guidance_scale is None:
        raise ValueError("RunFacts.grid.guidance_scale must say the guidance scale a class-conditional grid used")


def _check_evaluation(evaluation: EvalFacts, folder: SavedFolder) -> None:
    evaluation.check("RunFacts.evaluation", folder.num_train_timesteps)
    if not isinstance(evaluation.reference, str) or not evaluation.reference.strip():
        raise ValueError("RunFacts.evaluation.reference must name the real images evaluated against")
    check_bool("RunFacts.evaluation.heldout", evaluation.heldout)
    if not evaluation.heldout and _HELD_OUT_WORDS.search(evaluation.reference):
        raise ValueError(f"RunFacts.evaluation.reference {evaluation.reference!r} calls the images held out, but "
                         "heldout is False")
    results = evaluation.results
    if not isinstance(results, dict) or not any(EVAL_KEY.fullmatch(k) for k in results):
        raise ValueError("RunFacts.evaluation.results must be evaluate_pipeline's result (no metric found in it)")
    needed = {name for key in results for _, name, _, _ in string.Formatter().parse(measured_on(key, results))
              if name}
    missing = sorted(k for k in needed if not is_int(results.get(k)))
    if missing:
        raise ValueError(f"RunFacts.evaluation.results lacks the sample counts {missing} behind its metrics")


def _dataset(run: RunFacts, resolution: int) -> tuple[list[str] | None, str]:
    """The YAML ``datasets`` list (a Hub dataset id only) and the body's description of the data."""
    name = run.dataset_name.strip()
    if run.dataset_is_local:
        base = os.path.basename(os.path.normpath(name)) or name
        return None, f'a local folder named "{_inline(base)}"'
    if name == DIGITS_NAME:
        scale = f"upscaled bilinearly to {resolution}x{resolution}" if resolution != 8 else "at their 8x8 size"
        return None, f"scikit-learn's built-in 8x8 digits (`sklearn.datasets.load_digits`, 1,797 images), {scale}"
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ValueError(f"RunFacts.dataset_name {name!r} is neither a Hub dataset id nor the built-in "
                         f"{DIGITS_NAME!r}; set dataset_is_local=True for a local path") from None
    return [name], f"the Hub dataset `{name}`"


# ---- the evaluation section --------------------------------------------------------------------------------------


def _evaluation_vars(evaluation: EvalFacts | None) -> dict[str, Any]:
    if evaluation is None:
        return {"evaluated": False}
    r = evaluation.results
    heldout = ("These images were held out: training never saw them." if evaluation.heldout else
               "These are training data: the model trained on them, so the numbers do not measure generalisation.")
    rows = [(_inline(metric_label(k)), _format_value(v), _inline(measured_on(k, r).format(**r)))
            for k, v in r.items() if k not in COUNT_KEYS + CONTEXT_KEYS]
    return {
        "evaluated": True,
        "eval_reference": _inline(f"{evaluation.reference.strip().rstrip('.')}. {heldout}"),
        "eval_sampler": _inline(evaluation.describe()),
        "eval_rows": rows,
        "eval_notes": [_inline(n) for n in evaluation_notes(evaluation)],
    }


# ---- rendering ---------------------------------------------------------------------------------------------------


def _usage_vars(run: RunFacts, folder: SavedFolder, out: Path) -> dict[str, Any]:
    steps = default_sampling_steps(folder)
    stock_text = (f"the full {steps}-step ancestral DDPM chain" if steps == folder.num_train_timesteps
                  and folder.scheduler_name == "DDPMScheduler" else f"{steps} steps of the saved {folder.scheduler_name}")
    grid = run.grid
    saved_sampler = folder.scheduler_name.removesuffix("Scheduler")
    return {
        **_class_vars(run),
        "stock": folder.stock,
        "remote_reasons": [] if folder.stock else [_inline(r) for r in remote_code_reasons(folder)],
        "repo_literal": repr(run.repo_id if run.repo_id is not None else f"./{out.name}"),
        "stock_steps": steps,
        "stock_text": stock_text,
        "ours_text": f"the grid's sampler: {grid.describe()}" if grid else stock_text,
        "ours_scheduler": f"{grid.sampler}Scheduler" if grid and grid.sampler != saved_sampler else None,
        "ours_steps": grid.num_inference_steps if grid else steps,
        "ours_seed": grid.seed if grid else 0,
        "fast_recipe": _dpm_solver_fits(folder),
        "fast_steps": FAST_RECIPE_STEPS,
    }


# The fewest DPM-Solver++ steps whose 500 digits reached the real-vs-real FID band on the default recipe's export
# (benchmarks/time_to_quality.py; the README's speed table).
FAST_RECIPE_STEPS = 6


def _dpm_solver_fits(folder: SavedFolder) -> bool:
    """Whether diffusers' DPMSolverMultistepScheduler can sample this folder's schedule (the card's fast recipe):
    it has no sigmoid betas, and it cuts a learned variance to 3 channels whatever the image has."""
    from diffusers import DPMSolverMultistepScheduler

    if folder.scheduler_config.get("variance_type") in ("learned", "learned_range"):
        return False
    try:
        DPMSolverMultistepScheduler.from_config(folder.scheduler_config)
    except (NotImplementedError, ValueError):
        return False
    return True


def _class_vars(run: RunFacts) -> dict[str, Any]:
    """The classes and the class-conditional arguments of the usage snippets (a Python literal of a class name)."""
    names = run.class_names
    if names is None:
        return {"conditional": False, "cond_args": ""}
    example = names[min(7, len(names) - 1)]  # "7" for the digits
    scale = run.grid.guidance_scale if run.grid is not None else 1.0
    return {
        "conditional": True,
        "num_classes": len(names),
        "null_class": len(names),
        "class_rows": [(k, _inline(name)) for k, name in enumerate(names)],
        "example_class": _inline(repr(example)),
        "cond_args": f"class_labels=[{example!r}] * {SNIPPET_BATCH}, guidance_scale={scale!r}, ",
    }


def _training_vars(run: RunFacts) -> dict[str, Any]:
    stats = [(_inline(k), _format_value(v)) for k, v in run.metrics.items()
             if not (EVAL_KEY.fullmatch(k) or _BOOKKEEPING_KEY.fullmatch(k) or k in COUNT_KEYS + CONTEXT_KEYS
                     or k == SKIPPED_KEY)]
    return {
        "split_text": _inline(run.train_split),
        "steps_text": str(run.global_step),
        "wall_time_text": _format_duration(run.wall_time_s),
        "license_text": _inline(run.license) if run.license else "none chosen (no license is claimed for this model)",
        "hyperparameters": [(_inline(k), _format_value(v))
                            for k, v in sorted(_without_local_paths(strip_secrets(run.training_args)).items())],
        "train_stats": stats,
        "skipped_images": run.metrics.get(SKIPPED_KEY),
    }


def _model_index(run: RunFacts, title: str, datasets: list[str] | None) -> dict[str, Any]:
    """``ModelCardData``'s ``model_name`` and ``eval_results`` (the YAML ``model-index``); nothing unevaluated."""
    if run.evaluation is None:
        return {}
    name = run.dataset_name.strip()
    dataset_type = datasets[0] if datasets else os.path.basename(os.path.normpath(name)) or name
    task = CONDITIONAL_TASK if run.class_names is not None else UNCONDITIONAL_TAG
    results = model_index_results(run.evaluation, task, dataset_type, run.evaluation.reference.strip())
    return {"model_name": title, "eval_results": results} if results else {}


def _grid_caption(run: RunFacts) -> str:
    grid = run.grid
    rows = ""
    if run.class_names is not None:
        rows = f" One row per class, top to bottom: {', '.join(run.class_names)} (classifier-free guidance)."
    return f"Samples drawn at optimizer step {run.global_step} with {grid.describe()} ({grid.filename}).{rows}"


def write_model_card(output_dir: str | os.PathLike, run: RunFacts, template_path: str | Path = TEMPLATE_PATH) -> str:
    """Render ``README.md`` into the saved pipeline folder ``output_dir`` and return its path.

    Args:
        output_dir: the export folder, already holding the saved pipeline (``model_index.json``,
            ``scheduler/``, ``unet/``) and the grid named by ``run.grid``.
        run: the facts of the run (see :class:`RunFacts`).
        template_path: the Jinja template; defaults to ``model_card.md`` at the repository root.

    Returns:
        The path of the written ``README.md``.
    """
    out = Path(output_dir)
    if not out.is_dir():
        raise ValueError(f"output_dir must be an existing directory, got {str(output_dir)!r}")
    template = Path(template_path)
    if not template.is_file():
        raise FileNotFoundError(f"model card template {str(template)!r} not found (template_path)")
    folder = read_saved_folder(out)
    _check_run(run, folder, out)
    datasets, dataset_text = _dataset(run, folder.sample_size)
    conditional = run.class_names is not None
    title = _inline(run.repo_id.split("/")[-1] if run.repo_id else "DDPM")
    card_data = _AsciiCardData(library_name="diffusers", pipeline_tag=None if conditional else UNCONDITIONAL_TAG,
                               license=run.license, datasets=datasets,
                               tags=list(CONDITIONAL_TAGS if conditional else TAGS),
                               **_model_index(run, title, datasets))
    channels = {1: "grey", 3: "RGB"}.get(folder.in_channels, f"{folder.in_channels}-channel")
    grid = run.grid
    card = _Card.from_template(
        card_data,
        template_path=str(template),
        model_title=title,
        dataset_text=dataset_text,
        image_text=f"{folder.sample_size}x{folder.sample_size} {channels}",
        scheduler_name=_inline(folder.scheduler_name),
        num_train_timesteps=folder.num_train_timesteps,
        grid_url=quote(grid.filename) if grid else None,
        grid_caption=_inline(_grid_caption(run)) if grid else None,
        loss_plot_url=quote(run.loss_plot) if run.loss_plot else None,
        snippet_batch=SNIPPET_BATCH,
        **_usage_vars(run, folder, out),
        **_training_vars(run),
        **_evaluation_vars(run.evaluation),
    )
    path = out / "README.md"
    card.save(path)
    return str(path)
