"""The facts a model card states about a training run (`RunFacts`) and about how its samples were drawn
(`SamplingFacts`: the grid's `GridFacts`, the evaluation's `EvalFacts`); `ddpm_hf.model_card` renders them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .validation import check_choice, check_int, is_finite_real, is_int

__all__ = ["SAMPLERS", "WEIGHTS", "EvalFacts", "GridFacts", "RunFacts", "SamplingFacts"]

SAMPLERS = ("DDPM", "DDIM")
WEIGHTS = ("EMA", "raw")


@dataclass(kw_only=True)
class SamplingFacts:
    """How a set of samples was drawn.

    Args:
        sampler: ``"DDPM"`` (ancestral) or ``"DDIM"``.
        num_inference_steps: sampling steps (at most the saved scheduler's ``num_train_timesteps``).
        weights: ``"EMA"`` or ``"raw"`` (the network weights the samples came from).
        seed: the ``torch.Generator`` seed.
        guidance_scale: the classifier-free guidance scale w of a class-conditional model, None otherwise.
    """

    sampler: str
    num_inference_steps: int
    weights: str
    seed: int
    guidance_scale: float | None = None

    def describe(self) -> str:
        guided = "" if self.guidance_scale is None else f", guidance scale w = {self.guidance_scale:g}"
        return f"{self.sampler}, {self.num_inference_steps} steps, {self.weights} weights, seed {self.seed}{guided}"

    def check(self, name: str, num_train_timesteps: int) -> None:
        check_choice(f"{name}.sampler", self.sampler, SAMPLERS)
        check_choice(f"{name}.weights", self.weights, WEIGHTS)
        steps = self.num_inference_steps
        if not is_int(steps) or not 1 <= steps <= num_train_timesteps:
            raise ValueError(f"{name}.num_inference_steps must be an int in [1, {num_train_timesteps}] (the saved "
                             f"scheduler's num_train_timesteps), got {steps!r}")
        check_int(f"{name}.seed", self.seed, 0)
        if self.guidance_scale is not None and not (is_finite_real(self.guidance_scale) and self.guidance_scale >= 0):
            raise ValueError(f"{name}.guidance_scale must be a finite number >= 0 or None, got {self.guidance_scale!r}")


@dataclass(kw_only=True)
class GridFacts(SamplingFacts):
    """The sample grid saved with the export.

    Args:
        filename: the grid's path relative to the export folder (must exist there).
        (and the :class:`SamplingFacts` fields: sampler, num_inference_steps, weights, seed)
    """

    filename: str


@dataclass(kw_only=True)
class EvalFacts(SamplingFacts):
    """What an evaluation measured and against what.

    Args:
        reference: the real images, in words (e.g. ``"the 450 digits of the fixed test split"``); FID compares
            with them and bits/dim is measured on images of the same set.
        heldout: True only if training never saw the reference images.
        results: ``ddpm_hf.evaluate.evaluate_pipeline``'s result (metrics and the sample counts behind them).
        (and the :class:`SamplingFacts` fields of the generated samples)
    """

    reference: str
    heldout: bool
    results: dict[str, Any]


@dataclass(kw_only=True)
class RunFacts:
    """Everything the card says about the run; the rest is read from the saved folder.

    Args:
        training_args: all arguments of the run (secrets are stripped by the card).
        dataset_name: as the user named it (a Hub id, a local path, or ``ddpm_hf.data.DIGITS_NAME``).
        dataset_is_local: ``dataset_name`` is a local path; the card then names only its last component.
        train_split: the images trained on, in words (e.g. ``"1,347 of the 1,797 digits ..."``).
        global_step: optimizer steps done.
        wall_time_s: the whole run's wall time (all resumed stretches, export and evaluation included).
        license: the license the user chose (a Hub license id), or None: no license is claimed.
        repo_id: the Hub repo id for the usage snippets; None shows the folder as ``./<name>``.
        grid: the sample grid, or None when none was saved.
        metrics: training statistics (evaluation results in it are not shown: the card takes them from
            ``evaluation``, and refuses them when that is None).
        evaluation: the evaluation, or None when none was run.
        class_names: a class-conditional model's class names (id k = ``class_names[k]``); None: unconditional.
            The saved network must embed them plus the null class (``num_class_embeds = K + 1``).
        loss_plot: the training-loss plot's path relative to the export folder (must exist there), or None.
    """

    training_args: dict[str, Any]
    dataset_name: str
    dataset_is_local: bool
    train_split: str
    global_step: int
    wall_time_s: float
    license: str | None = None
    repo_id: str | None = None
    grid: GridFacts | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    evaluation: EvalFacts | None = None
    class_names: tuple[str, ...] | None = None
    loss_plot: str | None = None
