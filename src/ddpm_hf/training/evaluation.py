"""``--eval``: the real images a finished run is scored against (`ddpm_hf.eval_reference`), and the evaluation of
its final pipeline (unconditional FID/KID and bits/dim, or per-class accuracy and FID), as the card's `EvalFacts`."""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..eval_reference import EvalReference, build_eval_reference
from .components import TrainingRun

logger = logging.getLogger("ddpm_hf.train")


def evaluation_reference(run: TrainingRun) -> EvalReference:
    """The real images ``--eval`` compares with (`ddpm_hf.eval_reference.build_eval_reference`: --eval_data_dir,
    the digits' test split, the source's test split, or the images training held out)."""
    info = run.dataset.info
    names = info.class_names if run.data_args.class_conditional else None
    return build_eval_reference(run.data_args, info.num_channels, class_names=names, num_heldout=info.num_heldout)


def evaluate_run(run: TrainingRun, sampler: Any, pipeline: Any) -> Any:
    """Run ``--eval`` on the final pipeline; returns the card's ``EvalFacts`` (its results hold the metrics)."""
    from ..evaluate import evaluate_pipeline
    from ..model_card import EvalFacts

    reference = evaluation_reference(run)
    real = reference.images
    steps, seed = run.model_args.ddpm_num_inference_steps, run.args.seed
    generator = torch.Generator().manual_seed(seed)
    guidance = run.model_args.guidance_scale if run.data_args.class_conditional else None
    if guidance is None:
        results = evaluate_pipeline(sampler, real, num_samples=run.args.eval_num_samples, num_inference_steps=steps,
                                    generator=generator, likelihood_pipeline=pipeline)
    else:  # per class, at the grid's guidance scale, half of the smallest class's reference images per class
        from ..evaluate import evaluate_conditional

        results = evaluate_conditional(sampler, real, reference.labels, guidance_scale=guidance,
                                       num_inference_steps=steps, generator=generator)
    logger.info("Evaluation: %s", results)
    return EvalFacts(sampler=run.model_args.grid_sampler.upper(), num_inference_steps=steps,
                     weights="EMA" if run.ema is not None else "raw", seed=seed, reference=reference.description,
                     heldout=reference.heldout, results=results, guidance_scale=guidance)
