"""Class-conditional evaluation on the digits: conditional accuracy, FID overall and per class with their floors.

``evaluate_conditional`` asks the pipeline for ``num_per_class`` images of every class of the real set (with
``class_labels`` and ``guidance_scale``) and measures

* **conditional accuracy**: how often the digits classifier (``features.load_digits_classifier``) names the
  requested class (class index = digit), beside the classifier's accuracy on the real images, the reference (guided samples can score above
  it: guidance pushes samples towards the classifier-easy centre of each class);
* **FID** overall and per class against the real images, each with its **floor** (the same distance between two
  halves of the real images at the same counts): the real set is split per class into halves A and B, samples
  are compared with B, and as many of A's images of each class as there are samples of that class give the floor;
* **network evaluations per sample**: unet forward rows per generated image, counted by a hook (a classifier-free
  guidance step evaluates the network on both halves: 2 per step).

``python -m ddpm_hf.evaluate EXPORT`` runs this for class-conditional exports.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import numpy as np
import torch

from .data import digits_split_indices
from .features import FeatureFn, batched, feature_fns, load_digits_classifier, phase, progress
from .fid import distances

logger = logging.getLogger(__name__)


def digits_real_labels(split: str) -> torch.Tensor:
    """The digit labels of ``split``, in the order of ``evaluate.digits_real_images(split, ...)``."""
    from sklearn.datasets import load_digits

    return torch.from_numpy(load_digits().target[digits_split_indices(split)]).long()


def split_per_class(labels: torch.Tensor, generator: torch.Generator) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Indices of halves A and B of every class (a random permutation from ``generator``, A the first half)."""
    halves = {}
    for c in sorted(set(labels.tolist())):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        halves[c] = (idx[: len(idx) // 2], idx[len(idx) // 2 :])
    return halves


class _RowCounter:
    """Counts the rows of every unet forward call (the network evaluations), via a forward pre-hook."""

    def __init__(self, unet: Any):
        self.rows, self._handle = 0, None
        if isinstance(unet, torch.nn.Module):
            self._handle = unet.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        self.rows += len(sample)

    def close(self) -> bool:
        if self._handle is None:
            return False
        self._handle.remove()
        return True


def generate_classes(pipeline, labels: torch.Tensor, batch_size: int, generator: torch.Generator,
                     **call_kwargs: Any) -> torch.Tensor:
    """Images ``(N, C, H, W)`` in [-1, 1] of the requested ``labels`` through the pipeline's call convention."""
    if hasattr(pipeline, "set_progress_bar_config"):
        pipeline.set_progress_bar_config(disable=True)
    batches = []
    for start in progress(range(0, len(labels), batch_size), "sampling"):
        y = labels[start : start + batch_size]
        out = pipeline(batch_size=len(y), generator=generator, output_type="np", class_labels=y, **call_kwargs)
        batches.append(torch.from_numpy(np.asarray(out.images, dtype=np.float32)).permute(0, 3, 1, 2) * 2 - 1)
    return torch.cat(batches)


def _check(real_images: Any, real_labels: Any, num_per_class: Any, batch_size: Any) -> None:
    if not torch.is_tensor(real_images) or real_images.ndim != 4:
        raise ValueError("real_images must be a (N, C, H, W) tensor in [-1, 1]")
    if not torch.is_tensor(real_labels) or real_labels.shape != (len(real_images),) or real_labels.is_floating_point():
        raise ValueError(f"real_labels must be an integer tensor of shape ({len(real_images)},), one per real image")
    counts = torch.bincount(real_labels)
    if (counts[counts > 0] < 4).any():
        raise ValueError("every class in real_labels needs at least 4 real images (two per half)")
    for name, value in (("num_per_class", num_per_class), ("batch_size", batch_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 2):
            raise ValueError(f"{name} must be an int >= 2, got {value!r}")


@torch.no_grad()
def evaluate_conditional(pipeline, real_images: torch.Tensor, real_labels: torch.Tensor, *,
                         guidance_scale: float = 1.0, guidance_rescale: float = 0.0, num_per_class: int | None = None,
                         num_inference_steps: int | None = 100, batch_size: int = 128,
                         generator: torch.Generator | None = None,
                         feature_extractor: str | Mapping[str, FeatureFn] = "digits",
                         inception_weights: str | None = None) -> dict[str, Any]:
    """Sample every class of the real set and measure conditional accuracy and FID (overall, per class) with floors.

    Args:
        pipeline: ``pipeline(batch_size=, generator=, output_type="np", class_labels=, guidance_scale=,
            guidance_rescale=[, num_inference_steps=]).images`` in [0, 1] (``ddpm_hf.DDPMPipeline``).
        real_images: ``(N, C, H, W)`` held-out real images in [-1, 1].
        real_labels: ``(N,)`` their classes (indices the pipeline takes as ``class_labels``; for the accuracy they
            are the digits classifier's classes).
        guidance_scale, guidance_rescale: passed to the pipeline.
        num_per_class: samples per class (default: the smallest class's half A, so that FID and floor share counts).
        num_inference_steps: sampler steps (None: the pipeline's default).
        batch_size: for sampling and features.
        generator: seeds the split and sampling (default ``torch.Generator().manual_seed(0)``).
        feature_extractor, inception_weights: as in ``evaluate.evaluate_pipeline`` (default: the digits features).

    Returns:
        ``conditional_accuracy``, ``conditional_accuracy_per_class``, ``classifier_accuracy_real`` (the reference),
        ``fid_<name>`` / ``fid_<name>_floor`` overall and ``fid_<name>_per_class`` / ``fid_<name>_floor_per_class``
        (lists in class order), ``nfe_per_sample`` (None when the pipeline has no ``unet`` module), ``classes``,
        ``num_per_class``, ``num_real_b_per_class``, ``guidance_scale``, ``guidance_rescale``.
    """
    _check(real_images, real_labels, num_per_class, batch_size)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    classifier = load_digits_classifier()
    fns = feature_fns(feature_extractor, classifier, inception_weights)
    real, labels = real_images.float().cpu(), real_labels.long().cpu()
    halves = split_per_class(labels, generator)
    classes = sorted(halves)
    n = num_per_class or min(len(a) for a, _ in halves.values())
    if n > min(len(a) for a, _ in halves.values()):
        logger.warning("Evaluation: %d samples per class but a class has fewer real images in half A; its floor "
                       "is at the smaller count.", n)
    requested = torch.tensor(classes).repeat_interleave(n)
    call = {"guidance_scale": guidance_scale, "guidance_rescale": guidance_rescale}
    if num_inference_steps is not None:
        call["num_inference_steps"] = num_inference_steps
    counter = _RowCounter(getattr(pipeline, "unet", None))
    with phase(f"sampling {n} images for each of {len(classes)} classes at guidance {guidance_scale}"):
        try:
            fake = generate_classes(pipeline, requested, batch_size, generator, **call)
        finally:
            counted = counter.close()
    correct = batched(classifier, fake, batch_size).argmax(-1) == requested
    real_correct = batched(classifier, real, batch_size).argmax(-1) == labels
    metrics: dict[str, Any] = {
        "conditional_accuracy": correct.double().mean().item(),
        "conditional_accuracy_per_class": [correct[requested == c].double().mean().item() for c in classes],
        "classifier_accuracy_real": real_correct.double().mean().item(),
        "nfe_per_sample": counter.rows / len(fake) if counted else None,
        "classes": classes, "num_per_class": n, "num_real_b_per_class": [len(halves[c][1]) for c in classes],
        "guidance_scale": guidance_scale, "guidance_rescale": guidance_rescale,
    }
    with phase("FID overall and per class"):
        for name, fn in fns.items():
            metrics.update(_fids(name, fn, fake, requested, real, halves, n, batch_size))
    return metrics


def _fids(name: str, fn: FeatureFn, fake: torch.Tensor, requested: torch.Tensor, real: torch.Tensor,
          halves: dict[int, tuple[torch.Tensor, torch.Tensor]], n: int, batch_size: int) -> dict[str, Any]:
    """FID and floor overall (all classes against all of B) and per class (class c against B's class c)."""
    fake_f, real_f = batched(fn, fake, batch_size), batched(fn, real, batch_size)
    b_all = torch.cat([b for _, b in halves.values()])
    a_all = torch.cat([a[:n] for a, _ in halves.values()])
    out = {f"fid_{name}": distances(fake_f, real_f[b_all], kid=False)["fid"],
           f"fid_{name}_floor": distances(real_f[a_all], real_f[b_all], kid=False)["fid"]}
    per, floor = [], []
    for c, (a, b) in halves.items():
        per.append(distances(fake_f[requested == c], real_f[b], kid=False)["fid"])
        floor.append(distances(real_f[a[:n]], real_f[b], kid=False)["fid"])
    out.update({f"fid_{name}_per_class": per, f"fid_{name}_floor_per_class": floor})
    return out
