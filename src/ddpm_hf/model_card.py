"""Render the model card (``README.md``) of a training export from the repo-root ``model_card.md`` Jinja template.

The YAML header is produced by ``huggingface_hub.ModelCardData`` (``yaml.dump``), never by string templating,
so user-provided strings (dataset names, repo ids, text with ``---``, quotes, colons, newlines) cannot break
it. Strings placed in the Markdown body are flattened to one line and table-escaped; the repo id in the
usage snippets is a Python string literal. Secrets (``hub_token`` and anything named like a token, password
or key, plus any HF-token-shaped string) are removed from the training arguments before rendering.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.utils import validate_repo_id

from .hub import scrub_secrets
from .shipped_files import shipped_file

TEMPLATE_PATH = shipped_file("model_card.md", "model_card.md")
TAGS = ("ddpm", "diffusers", "diffusers-ddpm", "ddpm_hf", "unconditional-image-generation")
_SECRET_KEY = re.compile(r"token|password|passwd|secret|api[_-]?key|credential", re.IGNORECASE)
_METRIC_LABELS = {
    "fid_digits": "FID, digits-classifier features",
    "fid_digits_floor": "FID floor (real vs real), digits-classifier features",
    "fid_inception": "FID, Inception features",
    "fid_inception_floor": "FID floor (real vs real), Inception features",
    "bits_per_dim": "Bits/dim on held-out images",
    "class_balance": "Class balance of samples (normalised entropy, 1 = uniform)",
    "classifier_confidence": "Mean classifier confidence on samples",
}


class _AsciiCardData(ModelCardData):
    """Card metadata dumped as ASCII YAML (non-ASCII characters as escapes).

    huggingface_hub dumps with ``allow_unicode=True``, which writes characters such as U+0085 (NEL) and
    U+2028 raw; YAML reads those back as line breaks, so a dataset name containing one would not round-trip.
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


def _inline(text: Any) -> str:
    """One Markdown line: whitespace runs (newlines included) collapsed, table pipes and backticks escaped."""
    flat = " ".join(str(text).split())
    return flat.replace("\\", "\\\\").replace("|", "\\|").replace("`", "\\`")


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple, dict)):
        value = json.dumps(value, default=str)
    return _inline(value)


def _format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "not recorded"
    if not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"wall_time_s must be a finite number of seconds >= 0 or None, got {seconds!r}")
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min {secs:02d} s" if hours else f"{minutes} min {secs:02d} s"


def write_model_card(
    output_dir: str,
    training_args: dict[str, Any],
    metrics: dict[str, Any],
    repo_id: str | None,
    dataset_name: str,
    grid_filename: str | None,
    *,
    global_step: int | None = None,
    wall_time_s: float | None = None,
    license: str = "apache-2.0",  # noqa: A002 - the Hub metadata field's name
    num_inference_steps: int = 1000,
    template_path: str | Path = TEMPLATE_PATH,
) -> str:
    """Render ``README.md`` into ``output_dir`` and return its path.

    Args:
        output_dir: the export folder (the card is written as ``output_dir/README.md``).
        training_args: every argument of the run; secret-named keys are dropped, token-shaped values masked.
        metrics: evaluation results by name (``fid_digits``, ``fid_digits_floor``, ``bits_per_dim``, ...).
        repo_id: the Hub repo id used in the usage snippets; ``None`` shows a local path instead.
        dataset_name: dataset name or description; recorded in the YAML ``datasets`` list and in the body.
        grid_filename: the sample grid's path relative to ``output_dir``, or ``None`` when there is none.
        global_step: optimizer steps done.
        wall_time_s: training wall time in seconds.
        license: the card's license identifier.
        num_inference_steps: steps shown in the stock diffusers snippet (the DDPM sampler's training length).
        template_path: the Jinja template; defaults to ``model_card.md`` at the repository root.

    Returns:
        The path of the written ``README.md``.
    """
    out = Path(output_dir)
    if not out.is_dir():
        raise ValueError(f"output_dir must be an existing directory, got {output_dir!r}")
    if repo_id is not None:
        validate_repo_id(repo_id)  # raises HFValidationError (a ValueError) naming the bad id
    if not isinstance(dataset_name, str) or not dataset_name.strip():
        raise ValueError(f"dataset_name must be a non-empty string, got {dataset_name!r}")
    if not isinstance(metrics, dict):
        raise TypeError(f"metrics must be a dict, got {type(metrics).__name__}")
    if global_step is not None and (not isinstance(global_step, int) or global_step < 0):
        raise ValueError(f"global_step must be an int >= 0 or None, got {global_step!r}")
    template = Path(template_path)
    if not template.is_file():
        raise FileNotFoundError(f"model card template {str(template)!r} not found (template_path)")

    card_data = _AsciiCardData(
        library_name="diffusers",
        pipeline_tag="unconditional-image-generation",
        license=license,
        tags=list(TAGS),
        datasets=[dataset_name],
    )
    card = _Card.from_template(
        card_data,
        template_path=str(template),
        model_title=_inline(repo_id.split("/")[-1] if repo_id else "DDPM"),
        dataset_text=_inline(dataset_name),
        repo_literal=repr(repo_id if repo_id is not None else f"./{out.name}"),
        num_inference_steps=int(num_inference_steps),
        grid_url=quote(grid_filename) if grid_filename else None,
        grid_caption=_inline(f"Samples ({grid_filename}) drawn with a fixed seed at the end of training."),
        steps_text=str(global_step) if global_step is not None else "not recorded",
        wall_time_text=_format_duration(wall_time_s),
        hyperparameters=[(_inline(k), _format_value(v)) for k, v in sorted(strip_secrets(training_args).items())],
        metrics=[(_inline(_METRIC_LABELS.get(k, k)), _format_value(v)) for k, v in metrics.items()],
    )
    path = out / "README.md"
    card.save(path)
    return str(path)
