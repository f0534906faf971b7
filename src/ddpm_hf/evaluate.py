"""Sample-quality and likelihood metrics for an unconditional pipeline; ``python -m ddpm_hf.evaluate PIPELINE_DIR``.

FID (Heusel et al. 2017) is the Frechet distance between Gaussians fitted to features of generated and real
images; the feature extractors (the offline digits classifier, the standard Inception network) are in
``ddpm_hf.features``, and any ``{name: images -> features}`` mapping works too.

FID and KID are computed by torchmetrics from the features (float64 running sums).

Every FID comes with its floor: the same distance between two halves of the real images, the score of a perfect
model at that sample size. Generated samples are compared with the second half B; as many are drawn as the
first half A holds unless asked otherwise, and with fewer the floor uses as many of A's images, so FID and
floor share their sample counts (returned beside them). The CLI evaluates against the images the export's
training held out (`export_reference`): the built-in digits' "test" split for a digits model.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import inspect
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from .class_metrics import digits_real_labels, evaluate_conditional
from .data import DataConfig, digits_real_images, digits_split_indices
from .features import (FEATURE_EXTRACTORS, INCEPTION_ENV, DigitsClassifier, FeatureFn, batched, feature_fns,
                       load_digits_classifier, phase, progress)
from .fid import distances, load_reference_stats, save_reference_stats

logger = logging.getLogger(__name__)
# The digits' split helpers are part of this module's interface (docs/training.md names them here).
__all__ = ["bits_per_dim", "class_statistics", "digits_real_images", "digits_split_indices", "evaluate_pipeline",
           "export_reference", "fid_from_features", "generate", "main"]

def fid_from_features(fake: torch.Tensor, real: torch.Tensor) -> float:
    """FID between two feature sets ``(N, D)`` and ``(M, D)`` (torchmetrics' float64 statistics, clamped at 0)."""
    return distances(fake, real, kid=False)["fid"]


def class_statistics(logits: torch.Tensor) -> dict[str, Any]:
    """Class histogram, balance (entropy / log 10: 1 = uniform) and mean max-softmax confidence."""
    probs = logits.double().softmax(-1)
    hist = torch.bincount(probs.argmax(-1), minlength=10).double() / len(probs)
    entropy = -(hist[hist > 0] * hist[hist > 0].log()).sum().item()
    return {
        "class_histogram": [round(v, 4) for v in hist.tolist()],
        "class_balance": entropy / math.log(10) + 0.0,  # + 0.0 turns the -0.0 of a single class into 0.0
        "classifier_confidence": probs.max(-1).values.mean().item(),
    }


# ---- the pipeline side -------------------------------------------------------------------------------------------


def generate(pipeline, num_samples: int, batch_size: int, num_inference_steps: int | None,
             generator: torch.Generator) -> torch.Tensor:
    """Draw ``num_samples`` images as ``(N, C, H, W)`` in [-1, 1] through the diffusers call convention."""
    if hasattr(pipeline, "set_progress_bar_config"):
        pipeline.set_progress_bar_config(disable=True)
    kwargs = {} if num_inference_steps is None else {"num_inference_steps": num_inference_steps}
    batches = []
    for start in progress(range(0, num_samples, batch_size), "sampling"):
        out = pipeline(batch_size=min(batch_size, num_samples - start), generator=generator, output_type="np", **kwargs)
        images = torch.from_numpy(np.asarray(out.images, dtype=np.float32))
        batches.append(images.permute(0, 3, 1, 2) * 2 - 1)
    return torch.cat(batches)


def bits_per_dim(pipeline, images: torch.Tensor, batch_size: int, generator: torch.Generator) -> float | None:
    """Mean bits/dim of ``images`` (in [-1, 1]) through ``pipeline.log_likelihood``, or None (logged) if it has none.

    ``log_likelihood`` receives NCHW images in [0, 1], the range of the pipeline's own outputs (as
    ``ddpm_hf.DDPMPipeline.log_likelihood`` takes them; it quantises to 8 bits itself).
    """
    log_likelihood = getattr(pipeline, "log_likelihood", None)
    if log_likelihood is None:
        logger.info("%s has no log_likelihood method: bits/dim skipped.", type(pipeline).__name__)
        return None
    images01 = (images.clamp(-1, 1) + 1) / 2  # log_likelihood takes pipeline-output range and quantises itself
    takes_generator = "generator" in inspect.signature(log_likelihood).parameters
    values = []
    for start in progress(range(0, len(images01), batch_size), "bits/dim"):
        batch = images01[start : start + batch_size]
        result = log_likelihood(batch, generator=generator) if takes_generator else log_likelihood(batch)
        values.append(torch.as_tensor(getattr(result, "bits_per_dim", result)).double().reshape(-1).cpu())
    return torch.cat(values).mean().item()


@torch.no_grad()
def evaluate_pipeline(
    pipeline,
    real_images: torch.Tensor,
    num_samples: int | None = None,
    batch_size: int = 128,
    num_inference_steps: int | None = 100,
    generator: torch.Generator | None = None,
    feature_extractor: str | Mapping[str, FeatureFn] = "auto",
    *,
    heldout_images: torch.Tensor | None = None,
    num_bpd_images: int = 64,
    inception_weights: str | None = None,
    likelihood_pipeline=None,
    reference_cache: str | None = None,
) -> dict[str, Any]:
    """Sample from ``pipeline`` and measure FID (+ floor), digit class balance and confidence, and bits/dim.

    Args:
        pipeline: a diffusers-style pipeline: ``pipeline(batch_size=, generator=, num_inference_steps=,
            output_type="np").images`` in [0, 1]; bits/dim needs a ``log_likelihood(images)`` method too.
        real_images: ``(N, C, H, W)`` real images in [-1, 1], N >= 4; split into two fixed halves A and B.
        num_samples: images to generate; ``None`` draws as many as half A holds. With fewer, the floor uses
            that many of half A's images, so FID and floor always share their sample counts (with more, the
            floor is at half A's size, and a warning says so).
        batch_size: batch size for sampling, features and likelihood.
        num_inference_steps: sampler steps; ``None`` uses the pipeline's default.
        generator: seeds sampling and the real-image split; ``None`` uses ``torch.Generator().manual_seed(0)``.
        feature_extractor: ``"digits"``, ``"inception"`` (packaged or local weights), ``"auto"`` (digits, plus
            Inception when a weights file is named), or a mapping ``{name: images -> (N, D) features}``.
        heldout_images: images for bits/dim (``None``: the first ``num_bpd_images`` of half A).
        num_bpd_images: images for bits/dim; 0 skips it.
        inception_weights: a local Inception TorchScript file (else ``$DDPM_HF_INCEPTION_WEIGHTS``, else the
            weights packaged with the ``fid`` extra).
        likelihood_pipeline: the pipeline whose ``log_likelihood`` gives bits/dim (default ``pipeline``). Pass
            the DDPM-scheduler pipeline when ``pipeline`` samples with DDIM: a DDIM config has no
            ``variance_type``, so a learned-variance model's bound needs the DDPM one.
        reference_cache: a folder for the reference (half B) statistics as ``.npz``: computed once, then read
            (KID is then skipped: it needs the features themselves).

    Returns:
        ``fid_<name>``, ``fid_<name>_floor``, ``kid_<name>`` and ``kid_<name>_std`` per feature extractor,
        ``class_histogram``, ``class_balance``,
        ``classifier_confidence`` (and ``classifier_confidence_real`` for reference), ``bits_per_dim`` when the
        pipeline has ``log_likelihood``, and the counts behind them: ``num_generated`` (samples),
        ``num_real_a`` (half A images in the floor), ``num_real_b`` (half B, the reference of both) and
        ``num_bpd_images``. Each phase is logged with its duration; progress bars show on a terminal.
    """
    _check_eval_args(real_images, batch_size, num_bpd_images, num_samples)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    classifier = load_digits_classifier()
    fns = feature_fns(feature_extractor, classifier, inception_weights)

    real = real_images.float().cpu()[torch.randperm(len(real_images), generator=generator)]
    half_a, half_b = real[: len(real) // 2], real[len(real) // 2 :]
    num_generated = num_samples or len(half_a)
    with phase(f"sampling {num_generated} images"):
        fake = generate(pipeline, num_generated, batch_size, num_inference_steps, generator)
    with phase(f"features of {len(fake)} generated and {len(real)} real images"):
        metrics = _sample_metrics(fns, classifier, fake, half_a, half_b, batch_size, reference_cache)
    if num_bpd_images:
        heldout = (heldout_images if heldout_images is not None else half_a)[:num_bpd_images]
        with phase(f"bits/dim of {len(heldout)} images"):
            bpd = bits_per_dim(likelihood_pipeline or pipeline, heldout, batch_size, generator)
        if bpd is not None:
            metrics.update(bits_per_dim=bpd, num_bpd_images=len(heldout))
    logger.info("Evaluation: %s", ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                            for k, v in metrics.items() if isinstance(v, (int, float))))
    return metrics


def _check_eval_args(real_images: Any, batch_size: Any, num_bpd_images: Any, num_samples: Any) -> None:
    if not torch.is_tensor(real_images) or real_images.ndim != 4 or len(real_images) < 4:
        shape = tuple(real_images.shape) if torch.is_tensor(real_images) else type(real_images).__name__
        raise ValueError(f"real_images must be a (N, C, H, W) tensor with N >= 4, got {shape}")
    for name, value, low in (("batch_size", batch_size, 1), ("num_bpd_images", num_bpd_images, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if num_samples is not None and (not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 2):
        raise ValueError(f"num_samples must be an int >= 2 or None, got {num_samples!r}")


def _reference(name: str, fn: FeatureFn, images: torch.Tensor, batch_size: int,
               cache_dir: str | None) -> dict[str, Any]:
    """The reference set for ``distances``: its features, or its statistics cached as ``.npz`` in ``cache_dir``
    (keyed by the extractor and the exact images, so a changed split or network never reuses a stale file)."""
    if cache_dir is None:
        return {"real": batched(fn, images, batch_size)}
    key = hashlib.sha1(f"{name}:{getattr(fn, 'cache_key', '')}".encode() + images.numpy().tobytes()).hexdigest()
    path = Path(cache_dir) / f"reference_{name}_{key[:16]}.npz"
    if path.is_file():
        logger.info("Evaluation: %s reference statistics of %d images from %s", name, len(images), path)
        return {"real_stats": load_reference_stats(path)}
    features = batched(fn, images, batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_reference_stats(path, features)
    return {"real": features}


def _sample_metrics(fns: Mapping[str, FeatureFn], classifier: DigitsClassifier, fake: torch.Tensor,
                    half_a: torch.Tensor, half_b: torch.Tensor, batch_size: int,
                    reference_cache: str | None = None) -> dict[str, Any]:
    """FID and floor per extractor at matched counts, and the digit class statistics of the samples."""
    # FID is biased upward at small N, so the floor is only a floor at the FID's own count: with fewer samples
    # than half A holds, the floor uses as many of A's (randomly permuted) images as there are samples.
    floor_a = half_a[: len(fake)]
    if len(fake) > len(half_a):
        logger.warning("Evaluation: %d samples but only %d real images for the floor; the FID floor is at the "
                       "smaller count.", len(fake), len(half_a))
    metrics: dict[str, Any] = {"num_generated": len(fake), "num_real_a": len(floor_a), "num_real_b": len(half_b)}
    for name, fn in fns.items():
        reference = _reference(name, fn, half_b, batch_size, reference_cache)
        sample = distances(batched(fn, fake, batch_size), **reference)
        metrics[f"fid_{name}"] = sample["fid"]
        if "kid" in sample:  # KID needs the reference features themselves, not cached statistics
            metrics.update({f"kid_{name}": sample["kid"], f"kid_{name}_std": sample["kid_std"]})
        metrics[f"fid_{name}_floor"] = distances(batched(fn, floor_a, batch_size), **reference, kid=False)["fid"]
    metrics.update(class_statistics(batched(classifier, fake, batch_size)))
    metrics["classifier_confidence_real"] = class_statistics(batched(classifier, half_b, batch_size))["classifier_confidence"]
    return metrics


# ---- command line ------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ddpm_hf.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("pipeline_dir", help="a saved pipeline folder (or Hub repo id) that ddpm_hf.DDPMPipeline loads")
    p.add_argument("--num_samples", type=int, default=None,
                   help="images to generate (default: half the real set, 225 of the test split)")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--num_inference_steps", type=int, default=None,
                   help="steps of the saved scheduler (default: 100, at most its num_train_timesteps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--feature_extractor", choices=FEATURE_EXTRACTORS, default="auto")
    p.add_argument("--inception_weights", default=None, help=f"TorchScript Inception file (default: ${INCEPTION_ENV}, else the packaged weights)")
    p.add_argument("--eval_data_dir", default=None,
                   help="a folder of real images to score against (default: what the export's ddpm_hf_run.json says "
                        "training held out; the built-in digits' test split for a digits model)")
    p.add_argument("--real_split", choices=("all", "train", "test"), default=None,
                   help="digits models only: digits used as the real set for FID (default: the held-out test split)")
    p.add_argument("--bpd_split", choices=("all", "train", "test"), default=None,
                   help="digits models only: digits used for bits/dim (held out only if training left them out)")
    p.add_argument("--num_bpd_images", type=int, default=64, help="0 skips bits/dim")
    p.add_argument("--reference_cache", default=None,
                   help="folder for the reference statistics (.npz): computed once, read on later runs")
    p.add_argument("--output", default=None, help="also write the metrics JSON to this file")
    p.add_argument("--guidance_scale", type=float, default=1.0,
                   help="class-conditional exports: classifier-free guidance scale w (1 = the conditional model)")
    p.add_argument("--num_per_class", type=int, default=None,
                   help="class-conditional exports: samples per class (default: half of the smallest real class)")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Load a pipeline, evaluate it against its reference (`export_reference`), print the metrics as JSON and
    return them."""
    args = _parser().parse_args(argv)
    from .pipeline import DDPMPipeline

    pipeline = DDPMPipeline.from_pretrained(args.pipeline_dir)
    config = pipeline.unet.config
    size = config.sample_size if isinstance(config.sample_size, int) else config.sample_size[0]
    steps = args.num_inference_steps or min(100, pipeline.scheduler.config.num_train_timesteps)
    generator = torch.Generator().manual_seed(args.seed)
    conditional = config.get("num_class_embeds") is not None
    reference, bpd_images = export_reference(args, size, config.in_channels, pipeline.id2label if conditional else None)
    if conditional:  # class-conditional export: the per-class metrics
        metrics = evaluate_conditional(
            pipeline, reference.images, reference.labels, guidance_scale=args.guidance_scale,
            num_per_class=args.num_per_class, num_inference_steps=steps, batch_size=args.batch_size,
            generator=generator, feature_extractor=args.feature_extractor, inception_weights=args.inception_weights)
    else:
        metrics = evaluate_pipeline(
            pipeline, reference.images, num_samples=args.num_samples, batch_size=args.batch_size,
            num_inference_steps=steps, generator=generator, feature_extractor=args.feature_extractor,
            heldout_images=bpd_images, num_bpd_images=args.num_bpd_images, inception_weights=args.inception_weights,
            reference_cache=args.reference_cache)
    # What the numbers were measured with and against (the facts a model card states beside them).
    metrics.update(sampler=type(pipeline.scheduler).__name__, num_inference_steps=steps, seed=args.seed,
                   real_split=args.real_split, bpd_split=args.bpd_split, reference=reference.description,
                   reference_heldout=reference.heldout)
    text = json.dumps(metrics, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n", encoding="utf-8")
    return metrics


def export_reference(args: argparse.Namespace, size: int, channels: int,
                     id2label: dict[int, str] | None) -> tuple[Any, torch.Tensor]:
    """The reference an export is scored against, and the images of its bits/dim.

    The export's ``ddpm_hf_run.json`` (written by training/train.py) gives the data flags, from which
    `ddpm_hf.eval_reference.build_eval_reference` rebuilds the images training held out; ``--eval_data_dir``
    replaces them. The built-in digits (``--real_split``, ``--bpd_split``) are used only for a digits model:
    one the run file says was trained on them, or, without a run file, a 1-channel one.

    Raises:
        ValueError: the digits asked for an export trained on other data, or no reference is known.
    """
    from .eval_reference import EvalReference, build_eval_reference
    from .training.output_folder import read_run_file

    run = read_run_file(args.pipeline_dir) if Path(args.pipeline_dir).is_dir() else None
    recorded = dict(run["config"]) if run and "config" in run else None
    names = tuple(id2label[i] for i in sorted(id2label)) if id2label else None
    if recorded is not None:
        fields = {f.name for f in dataclasses.fields(DataConfig)}
        data = DataConfig(**{k: v for k, v in recorded.items() if k in fields})
        data.eval_data_dir = args.eval_data_dir or (run.get("evaluation") or {}).get("eval_data_dir")
    else:
        data = DataConfig(resolution=size, eval_data_dir=args.eval_data_dir, class_conditional=id2label is not None)
    digits = data.dataset_name is None and data.train_data_dir is None
    if digits and data.eval_data_dir is None and recorded is None and channels != 1:
        raise ValueError(f"{args.pipeline_dir} has no ddpm_hf_run.json saying what it was trained on, and its "
                         f"{channels} channels rule out the built-in digits: pass --eval_data_dir FOLDER (real "
                         "images it never saw)")
    if not digits or data.eval_data_dir is not None:
        given = [flag for flag, value in (("--real_split", args.real_split), ("--bpd_split", args.bpd_split)) if value]
        if given:
            raise ValueError(f"{' and '.join(given)} choose digits, but {args.pipeline_dir} was not trained on the "
                             "built-in digits (or --eval_data_dir is given): drop them; the reference is "
                             "--eval_data_dir, else the images its training held out")
        reference = build_eval_reference(data, channels, class_names=names,
                                         num_heldout=recorded.get("num_heldout") if recorded else None)
        return reference, reference.images
    args.real_split, args.bpd_split = args.real_split or "test", args.bpd_split or "test"
    real = digits_real_images(args.real_split, size, channels)
    held = " (held out from training)" if args.real_split == "test" else ""
    reference = EvalReference(real, digits_real_labels(args.real_split),
                              f"the {len(real):,} digits of the {args.real_split!r} split{held}", bool(held))
    return reference, digits_real_images(args.bpd_split, size, channels)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    try:
        main()
    except ValueError as err:  # no usable reference, a bad folder: the message names the flag
        sys.exit(f"ValueError: {err}")
