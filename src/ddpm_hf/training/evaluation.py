"""``--eval``: the real images a finished run is scored against, and the evaluation of its final pipeline
(unconditional FID/KID and bits/dim, or per-class accuracy and FID), as the model card's `EvalFacts`."""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..class_labels import LabelledDataset
from ..data import DigitsDataset
from .components import TrainingRun

logger = logging.getLogger("ddpm_hf.train")


def _image_dataset(run: TrainingRun) -> Any:
    """The training set's images alone (a class-conditional run wraps them with their labels)."""
    return run.dataset.dataset if isinstance(run.dataset, LabelledDataset) else run.dataset


def evaluation_reference(run: TrainingRun, limit: int = 2048) -> tuple[torch.Tensor, str, bool]:
    """The real images ``--eval`` compares with: ``(images, what they are in words, held out from training?)``.

    The built-in digits are scored against their fixed "test" split, which training never sees; other data
    against (up to ``limit`` of) the training images themselves, and the card says so.
    """
    info = run.dataset.info
    images_only = _image_dataset(run)
    if isinstance(images_only, DigitsDataset):
        from ..evaluate import digits_real_images

        images = digits_real_images("test", info.resolution, info.num_channels)
        return images, f"the {len(images):,} digits of the fixed test split (held out from training)", True
    images = torch.stack([images_only[i] for i in range(min(limit, len(images_only)))])
    return images, f"{len(images):,} of the training images (not held out)", False


def evaluate_run(run: TrainingRun, sampler: Any, pipeline: Any) -> Any:
    """Run ``--eval`` on the final pipeline; returns the card's ``EvalFacts`` (its results hold the metrics)."""
    from ..evaluate import evaluate_pipeline
    from ..model_card import EvalFacts

    real, reference, heldout = evaluation_reference(run)
    steps, seed = run.model_args.ddpm_num_inference_steps, run.args.seed
    generator = torch.Generator().manual_seed(seed)
    guidance = run.model_args.guidance_scale if run.data_args.class_conditional else None
    if guidance is None:
        results = evaluate_pipeline(sampler, real, num_samples=run.args.eval_num_samples, num_inference_steps=steps,
                                    generator=generator, likelihood_pipeline=pipeline)
    else:  # per class, at the grid's guidance scale, half of the smallest class's reference images per class
        from ..evaluate import evaluate_conditional

        results = evaluate_conditional(sampler, real, evaluation_labels(run, len(real)), guidance_scale=guidance,
                                       num_inference_steps=steps, generator=generator)
    logger.info("Evaluation: %s", results)
    return EvalFacts(sampler=run.model_args.grid_sampler.upper(), num_inference_steps=steps,
                     weights="EMA" if run.ema is not None else "raw", seed=seed, reference=reference,
                     heldout=heldout, results=results, guidance_scale=guidance)


def evaluation_labels(run: TrainingRun, count: int) -> torch.Tensor:
    """The class of each of `evaluation_reference`'s ``count`` images: the digits' test labels, or the first
    ``count`` training labels."""
    if isinstance(_image_dataset(run), DigitsDataset):
        from ..class_metrics import digits_real_labels

        return digits_real_labels("test")
    return run.dataset.info.labels[:count]
