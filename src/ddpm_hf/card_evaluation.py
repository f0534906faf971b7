"""The model card's evaluation facts: each metric's label, the images behind it, the notes that go with the
numbers, and the YAML ``model-index`` results (huggingface_hub's ``EvalResult``, the Hub's convention)."""

from __future__ import annotations

import re
from typing import Any

from huggingface_hub import EvalResult

from .card_facts import EvalFacts
from .validation import is_finite_real

# Keys of ddpm_hf.evaluate's results: metrics are shown only in the Evaluation section and only with EvalFacts;
# counts beside each metric; the CLI's sampling context is stated from EvalFacts' own fields.
COUNT_KEYS = ("num_generated", "num_real_a", "num_real_b", "num_bpd_images", "num_per_class", "num_real_b_per_class")
# The images behind each metric, stated beside it: (metric key pattern, text over the count keys); first match wins.
MEASURED_ON = (
    (re.compile(r"fid_.*_floor"), "{num_real_a} real (half A) vs {num_real_b} real (half B)"),
    (re.compile(r"(fid|kid)_.*"), "{num_generated} generated vs {num_real_b} real (half B)"),
    (re.compile(r"bits_per_dim"), "{num_bpd_images} of the reference images"),
    (re.compile(r"classifier_confidence_real"), "{num_real_b} real (half B)"),
    (re.compile(r"class_.*|classifier_confidence"), "{num_generated} generated"),
)
# ddpm_hf.evaluate.evaluate_conditional's results (a class-conditional model): samples per class, halves per class.
MEASURED_ON_CONDITIONAL = (
    (re.compile(r"fid_.*_floor_per_class"), "each class: {num_per_class} real (half A) vs its real half B"),
    (re.compile(r"fid_.*_per_class"), "each class: {num_per_class} generated vs its real half B"),
    (re.compile(r"fid_.*_floor"), "{num_per_class} real per class (half A) vs all of half B"),
    (re.compile(r"fid_.*"), "{num_per_class} generated per class vs all of half B"),
    (re.compile(r"conditional_accuracy.*|nfe_per_sample"), "{num_per_class} generated per class"),
    (re.compile(r"classifier_accuracy_real"), "all the real reference images"),
)
CONTEXT_KEYS = ("sampler", "num_inference_steps", "seed", "real_split", "bpd_split", "classes", "guidance_scale",
                "guidance_rescale")
EVAL_KEY = re.compile(r"fid_.*|bits_per_dim|class_histogram|class_balance|classifier_confidence(_real)?"
                      r"|conditional_accuracy(_per_class)?|classifier_accuracy_real|nfe_per_sample")


def metric_label(key: str) -> str:
    if key.startswith("fid_"):
        per_class = key.endswith("_per_class")
        key = key.removesuffix("_per_class")
        features = key[4:].removesuffix("_floor")
        kind = "FID floor (real vs real)" if key.endswith("_floor") else "FID"
        return f"{kind}, {features} features" + (", per class (class order)" if per_class else "")
    if key.startswith("kid_"):
        features = key[4:].removesuffix("_std")
        return f"KID{' std over subsets' if key.endswith('_std') else ''}, {features} features"
    return {
        "conditional_accuracy": "Conditional accuracy (the digits classifier names the requested class)",
        "conditional_accuracy_per_class": "Conditional accuracy per class (class order)",
        "classifier_accuracy_real": "Classifier accuracy on real images (reference for the conditional accuracy)",
        "nfe_per_sample": "Network evaluations per sample (a guided step counts 2)",
        "bits_per_dim": "Bits/dim (variational bound; lower is better)",
        "class_histogram": "Predicted class histogram of samples",
        "class_balance": "Class balance of samples (normalised entropy, 1 = uniform)",
        "classifier_confidence": "Mean classifier confidence on samples",
        "classifier_confidence_real": "Mean classifier confidence on real images",
    }.get(key, key)


def measured_on(key: str, results: dict[str, Any]) -> str:
    """The images behind a metric, as a template over the result's count keys ("" for a metric of unknown kind);
    ``results`` of a class-conditional evaluation (``conditional_accuracy`` in them) count per class."""
    table = MEASURED_ON_CONDITIONAL if "conditional_accuracy" in results else MEASURED_ON
    return next((text for pattern, text in table if pattern.fullmatch(key)), "")


def evaluation_notes(evaluation: EvalFacts) -> list[str]:
    r = evaluation.results
    notes = []
    if any(k.startswith("fid_") for k in r):
        notes.append("FID is the Frechet distance between feature statistics of generated and real images; the "
                     "floor is the same distance between two disjoint sets of real images, what a perfect model "
                     "would score at that sample count. FID depends on the sample count: compare it with the "
                     "floor beside it, and with other FIDs only at the same counts and features.")
        if "conditional_accuracy" not in r and r.get("num_real_a") != r.get("num_generated"):
            notes.append(f"The floor uses {r.get('num_real_a')} real images where the FID uses "
                         f"{r.get('num_generated')} generated ones (too few real images to match).")
    if any(k.startswith("kid_") for k in r):
        notes.append("KID is the unbiased polynomial-kernel MMD between the same features (Binkowski et al. 2018), "
                     "averaged over random subsets; unlike FID it has no bias from the sample count.")
    if any(k.startswith("fid_digits") for k in r):
        notes.append("The digits features are the 64 penultimate activations of a small digits classifier; "
                     "these FIDs are not comparable with Inception FIDs from papers.")
    if "conditional_accuracy" in r:
        notes.append(f"Each class was asked for {r['num_per_class']} samples with classifier-free guidance scale "
                     f"w = {r['guidance_scale']:g}. The classifier's own accuracy on real images is shown for "
                     "reference; guided samples, more prototypical than real ones, can score above it.")
    if "bits_per_dim" in r:
        where = ("images training never saw" if evaluation.heldout else
                 "images the model was trained on, so it is a training-set bound, not a test likelihood")
        notes.append(f"Bits/dim is the DDPM variational bound on the negative log-likelihood, on {where}.")
    return notes


def model_index_results(evaluation: EvalFacts, task_type: str, dataset_type: str, dataset_name: str) -> list[EvalResult]:
    """The evaluation's scalar metrics as ``model-index`` results for the card's YAML (per-class lists, counts and
    the sampling context stay in the Markdown table).

    Args:
        evaluation: the evaluation.
        task_type: the Hub task id (e.g. ``unconditional-image-generation``).
        dataset_type: the Hub dataset id, or a stand-in naming the data (the model-index needs one).
        dataset_name: the data in words.

    Returns:
        One ``EvalResult`` per finite scalar metric, ``metric_type`` the result key, ``metric_name`` its label.
    """
    results = evaluation.results
    split = results.get("real_split")
    return [EvalResult(task_type=task_type, dataset_type=dataset_type, dataset_name=dataset_name,
                       dataset_split=split if isinstance(split, str) else None, metric_type=key,
                       metric_name=metric_label(key), metric_value=float(value))
            for key, value in results.items()
            if (EVAL_KEY.fullmatch(key) or key.startswith("kid_")) and is_finite_real(value)]
