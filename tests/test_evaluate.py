"""Evaluation: the digits classifier, the Frechet distance, FID with its floor, class statistics, bits/dim, CLI."""

import json
import logging
import re
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.linalg
import scipy.special
import scipy.stats
import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

import ddpm_hf
from ddpm_hf import evaluate, features
from ddpm_hf.evaluate import (
    class_statistics,
    digits_real_images,
    digits_split_indices,
    evaluate_pipeline,
    fid_from_features,
    load_digits_classifier,
)


class ReplayPipeline:
    """Stands in for a pipeline: returns the given images in order, through the diffusers call convention."""

    def __init__(self, images):
        self.images, self.cursor, self.calls = images, 0, []

    def __call__(self, batch_size, generator, output_type, num_inference_steps=None):
        assert output_type == "np" and isinstance(generator, torch.Generator)
        self.calls.append(num_inference_steps)
        batch = self.images[self.cursor : self.cursor + batch_size]
        assert len(batch) == batch_size, "replay pipeline ran out of images"
        self.cursor += batch_size
        return SimpleNamespace(images=((batch.permute(0, 2, 3, 1) + 1) / 2).numpy())


class LikelihoodPipeline(ReplayPipeline):
    def log_likelihood(self, images, generator=None):
        self.seen = images
        return SimpleNamespace(bits_per_dim=torch.full((len(images),), 3.25))


@pytest.fixture(scope="module")
def digits():
    return {split: digits_real_images(split, 16, 1) for split in ("train", "test")}


def test_split_is_fixed_stratified_and_disjoint():
    train, test = digits_split_indices("train"), digits_split_indices("test")
    assert len(train) + len(test) == 1797 and not set(train) & set(test)
    assert np.array_equal(test, digits_split_indices("test"))
    with pytest.raises(ValueError, match="split"):
        digits_split_indices("val")


def test_digits_classifier_is_accurate_on_the_test_split():
    model = load_digits_classifier()
    images, labels = features._digits_8x8("test")
    upscaled = F.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False)
    with torch.no_grad():
        for x in (images, upscaled, upscaled.expand(-1, 3, -1, -1)):
            assert (model(x).argmax(-1) == labels).float().mean() > 0.9


def test_classifier_cache_round_trip_and_corrupt_cache(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(features.CACHE_ENV, str(tmp_path))
    with torch.inference_mode():  # a cold cache must train even under inference mode (evaluate_pipeline's)
        first = load_digits_classifier()
    cached = tmp_path / features._CLASSIFIER_FILE
    assert cached.is_file()
    second = load_digits_classifier()
    for name, tensor in first.state_dict().items():
        assert torch.equal(second.state_dict()[name], tensor)  # deterministic training, exact cache
    cached.write_bytes(b"not safetensors")
    third = load_digits_classifier()
    assert "unreadable digits classifier cache" in caplog.text
    assert torch.equal(third.head.weight, first.head.weight)


def _scipy_fd(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fid_against_scipy_sqrtm_symmetry_shift_and_singular_covariances():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 6)), rng.normal(size=(150, 6)) @ rng.normal(size=(6, 6)) + 1.5
    stats_a = a.mean(0), np.cov(a, rowvar=False)
    stats_b = b.mean(0), np.cov(b, rowvar=False)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    assert fid_from_features(tb, ta) == pytest.approx(_scipy_fd(*stats_a, *stats_b), rel=1e-8)
    assert fid_from_features(tb, ta) == pytest.approx(fid_from_features(ta, tb), rel=1e-8)
    shift = torch.arange(6.0, dtype=torch.float64)
    assert fid_from_features(ta + shift, ta) == pytest.approx(55.0, rel=1e-9)  # |shift|^2, same covariance
    few = torch.from_numpy(rng.normal(size=(3, 6)))  # rank 2: fewer samples than features
    assert np.isfinite(fid_from_features(few, tb))
    with pytest.raises(ValueError, match="features"):
        fid_from_features(torch.zeros(5, 3), torch.zeros(5, 4))


def _with_moments(rng, n, mean, cov):
    """n samples whose sample mean is exactly ``mean`` and whose unbiased sample covariance is exactly ``cov``."""
    z = rng.normal(size=(n, len(mean)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # now cov(z) = I exactly
    return torch.from_numpy(z @ np.linalg.cholesky(cov).T + mean)


def test_fid_of_two_gaussians_with_known_moments_is_the_closed_form():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    mu1, s1 = np.array([0.0, 1, 2, 3, 4]), a @ a.T + 0.1 * np.eye(5)
    mu2, s2 = np.array([1.0, -1, 0, 0.5, 2]), b @ b.T + 0.5 * np.eye(5)
    # d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) (Dowson & Landau 1982), via scipy's general sqrtm
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    got = fid_from_features(_with_moments(rng, 300, mu1, s1), _with_moments(rng, 40, mu2, s2))
    assert got == pytest.approx(expected, rel=1e-9)
    # commuting (diagonal) covariances: d^2 = |mu1 - mu2|^2 + sum_i (sqrt(s1_i) - sqrt(s2_i))^2
    d1, d2 = np.array([1.0, 4, 9]), np.array([4.0, 1, 0.25])
    diagonal = fid_from_features(_with_moments(rng, 50, np.zeros(3), np.diag(d1)),
                                 _with_moments(rng, 60, np.ones(3), np.diag(d2)))
    assert diagonal == pytest.approx(3 + ((np.sqrt(d1) - np.sqrt(d2)) ** 2).sum(), rel=1e-9)


def test_identical_sets_smaller_than_the_feature_count_score_exactly_zero():
    # 20 samples of 64 features: a rank-19 covariance, where the unclamped formula gave about -2.3e-6
    features = torch.from_numpy(np.random.default_rng(0).normal(size=(20, 64)))
    assert fid_from_features(features, features) == 0.0
    assert fid_from_features(features, features + 0.5) == pytest.approx(64 * 0.25, rel=1e-6)


def test_the_floor_is_measured_at_the_fid_sample_count(digits):
    seen = []

    def pixels(images):
        seen.append(images.clone())
        return images.flatten(1)[:, ::16]

    real = digits["test"]
    metrics = evaluate_pipeline(ReplayPipeline(digits["train"]), real, num_samples=40, batch_size=1000,
                                feature_extractor={"pixels": pixels}, num_bpd_images=0)
    assert metrics["num_generated"] == metrics["num_real_a"] == 40 and metrics["num_real_b"] == 225
    half_b, fake, floor_a = seen  # one call each: reference half B, the samples, then half A for the floor
    assert len(half_b) == 225 and len(fake) == len(floor_a) == 40
    rows = {tuple(x.flatten().tolist()) for x in real}
    b_rows = {tuple(x.flatten().tolist()) for x in half_b}
    assert all(tuple(x.flatten().tolist()) in rows - b_rows for x in floor_a)  # real images, disjoint from B


def test_fid_of_real_digits_is_near_the_floor_and_noise_is_far(digits):
    real, replayed = digits["test"], ReplayPipeline(digits["train"])
    replay = evaluate_pipeline(replayed, real, num_inference_steps=7, batch_size=100, num_bpd_images=0)
    noise = evaluate_pipeline(ReplayPipeline(torch.rand(300, 1, 16, 16) * 2 - 1), real, num_bpd_images=0)
    floor = replay["fid_digits_floor"]
    assert replay["num_generated"] == replay["num_real_a"] == len(real) // 2 == 225
    assert replayed.calls == [7, 7, 7]  # 100 + 100 + 25 samples, the requested steps passed through
    assert replay["fid_digits"] < 3 * floor
    assert noise["fid_digits"] > 50 * floor
    assert noise["fid_digits_floor"] == pytest.approx(floor)  # same split, same generator seed
    assert replay["class_balance"] > 0.95 and replay["classifier_confidence"] > 0.9
    assert noise["classifier_confidence"] < replay["classifier_confidence"]
    assert "bits_per_dim" not in replay


def test_class_statistics_of_a_collapsed_generator():
    logits = torch.zeros(50, 10)
    logits[:, 3] = 20.0
    stats = class_statistics(logits)
    assert stats["class_histogram"][3] == 1.0 and stats["class_balance"] == 0.0
    assert stats["classifier_confidence"] > 0.99
    uniform = class_statistics(torch.eye(10).repeat(5, 1) * 20)
    assert uniform["class_balance"] == pytest.approx(1.0)


def test_class_statistics_of_hand_made_logits():
    rng = np.random.default_rng(3)
    labels = np.array([0, 0, 0, 1, 1, 2, 7, 7])
    logits = rng.normal(size=(8, 10))
    logits[np.arange(8), labels] += 10.0  # each row's argmax is its label
    stats = class_statistics(torch.from_numpy(logits))
    histogram = np.bincount(labels, minlength=10) / 8  # [3, 2, 1, 0, 0, 0, 0, 2, 0, 0] / 8
    assert stats["class_histogram"] == [round(v, 4) for v in histogram]
    assert stats["class_balance"] == pytest.approx(scipy.stats.entropy(histogram) / np.log(10), rel=1e-12)
    assert stats["classifier_confidence"] == pytest.approx(scipy.special.softmax(logits, axis=1).max(1).mean(),
                                                           rel=1e-12)


def test_bits_per_dim_through_log_likelihood(digits, caplog):
    caplog.set_level(logging.INFO)
    pipe = LikelihoodPipeline(digits["test"])
    metrics = evaluate_pipeline(pipe, digits["train"][:40], num_samples=8, heldout_images=digits["test"],
                                num_bpd_images=6, batch_size=4)
    assert metrics["bits_per_dim"] == pytest.approx(3.25) and metrics["num_bpd_images"] == 6
    assert len(pipe.seen) == 2  # batches of 4: 4 + 2
    # each slow phase is logged with its duration, and the counts with the results
    for phase in ("sampling 8 images", "features of 8 generated and 40 real images", "bits/dim of 6 images"):
        assert re.search(rf"Evaluation: {phase} done in \d+\.\d s", caplog.text), phase
    assert "num_generated=8, num_real_a=8, num_real_b=20" in caplog.text
    assert torch.equal(pipe.seen, (digits["test"][4:6] + 1) / 2)  # NCHW in [0, 1], the pipeline-output range
    evaluate_pipeline(ReplayPipeline(digits["test"]), digits["train"][:40], num_samples=8, num_bpd_images=4)
    assert "has no log_likelihood" in caplog.text


class OracleUNet(ModelMixin, ConfigMixin):
    """Predicts the exact noise of x_t for known clean images x0: eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)."""

    @register_to_config
    def __init__(self, sample_size: int = 4, in_channels: int = 1, out_channels: int = 1):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros((), dtype=torch.float64))  # makes the pipeline compute in float64

    def forward(self, sample, timestep, return_dict=True):
        abar = self.alphas_cumprod[int(timestep)]
        return ((sample - abar**0.5 * self.x0) / (1 - abar) ** 0.5,)


def test_bits_per_dim_of_an_exact_noise_predictor_is_the_closed_form():
    """With the true noise, every KL term t >= 1 of the bound (Ho et al. eq. 5) is 0, the model mean at t = 0 is
    x0 itself, so the bound is the discretised decoder at sigma^2 = posterior variance of t = 1 plus the prior."""
    num_steps = 10
    betas = np.linspace(1e-4, 0.02, num_steps)
    abar = np.cumprod(1 - betas)
    grey = np.random.default_rng(4).integers(0, 256, size=(3, 1, 4, 4))
    grey[0, 0, 0, :2], grey[1, 0, 1, :2] = (0, 255), (255, 0)  # both edge bins
    x0 = grey / 127.5 - 1
    oracle = OracleUNet().double()
    oracle.x0, oracle.alphas_cumprod = torch.from_numpy(x0), torch.from_numpy(abar)
    pipe = ddpm_hf.DDPMPipeline(oracle, ddpm_hf.DDPMScheduler(num_train_timesteps=num_steps))
    pipe.set_progress_bar_config(disable=True)

    sigma = np.sqrt(betas[1] * (1 - abar[0]) / (1 - abar[1]))  # the clipped posterior std used at t = 0
    inner = 2 * scipy.stats.norm.cdf(1 / 255 / sigma) - 1  # mass of the +-1/255 bin around its own centre
    edge = scipy.stats.norm.cdf(1 / 255 / sigma)  # the end bins extend to -inf / +inf
    decoder = -np.log(np.where(np.abs(grey) % 255 == 0, edge, inner))
    prior = 0.5 * (-1 - np.log(1 - abar[-1]) + (1 - abar[-1]) + abar[-1] * x0**2)  # KL(q(x_T|x0) || N(0, I))
    expected = ((decoder + prior).mean(axis=(1, 2, 3)) / np.log(2)).mean()
    got = evaluate.bits_per_dim(pipe, torch.from_numpy(x0).float(), 3, torch.Generator().manual_seed(0))
    assert got == pytest.approx(expected, rel=1e-6)


def test_pluggable_feature_extractor_mapping(digits):
    metrics = evaluate_pipeline(ReplayPipeline(digits["test"]), digits["train"][:100],
                                feature_extractor={"pixels": lambda x: x.flatten(1)[:, ::16]}, num_bpd_images=0)
    assert {"fid_pixels", "fid_pixels_floor"} <= set(metrics) and "fid_digits" not in metrics


class _FakeInception(nn.Module):
    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert return_features and x.shape[1] == 3 and x.shape[2] == 299 and x.shape[3] == 299
        assert float(x.min()) >= 0.0 and float(x.max()) <= 255.0
        return torch.stack([x.mean((1, 2, 3)), x.std((1, 2, 3)), x[:, :, 150, 150].mean(1)], 1)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_inception_features_from_a_local_torchscript_file(digits, tmp_path, monkeypatch):
    path = tmp_path / "inception.pt"
    torch.jit.script(_FakeInception()).save(str(path))
    # constant images survive any resize exactly: the network must see 3 channels of the 8-bit value
    # round((c + 1) * 127.5) a saved PNG would hold (pytorch-fid's convention)
    levels = torch.tensor([-1.0, -0.5, 0.0, 1.0])
    extracted = features.inception_features(str(path))(levels.view(4, 1, 1, 1).expand(4, 1, 16, 16))
    expected = torch.tensor([0.0, 64.0, 128.0, 255.0], dtype=torch.float64)
    assert torch.allclose(extracted.double(), torch.stack([expected, torch.zeros(4), expected], 1), atol=1e-4)
    monkeypatch.setenv(features.INCEPTION_ENV, str(path))
    metrics = evaluate_pipeline(ReplayPipeline(digits["test"]), digits["train"][:40], num_samples=20,
                                num_bpd_images=0)
    assert metrics["fid_inception"] > metrics["fid_inception_floor"] >= 0.0 and "fid_digits" in metrics


def test_missing_inception_weights_name_the_file_and_auto_skips_inception(digits, tmp_path, monkeypatch):
    monkeypatch.setenv(features.INCEPTION_ENV, str(tmp_path / "nowhere.pt"))
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        evaluate_pipeline(ReplayPipeline(digits["test"]), digits["train"][:40], feature_extractor="inception")
    monkeypatch.delenv(features.INCEPTION_ENV)
    auto = evaluate_pipeline(ReplayPipeline(digits["test"]), digits["train"][:40], num_samples=8, num_bpd_images=0)
    assert "fid_inception" not in auto and "fid_digits" in auto and "kid_digits" in auto


@pytest.mark.parametrize("kwargs, match", [
    ({"feature_extractor": "vgg"}, "feature_extractor"),
    ({"feature_extractor": {}}, "feature_extractor"),
    ({"real_images": torch.zeros(3, 1, 8, 8)}, "real_images"),
    ({"real_images": np.zeros((10, 1, 8, 8))}, "real_images"),
    ({"batch_size": 0}, "batch_size"),
    ({"num_samples": 1}, "num_samples"),
    ({"num_bpd_images": -1}, "num_bpd_images"),
])
def test_bad_arguments(digits, kwargs, match):
    call = {"pipeline": ReplayPipeline(digits["test"]), "real_images": digits["train"][:20], **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        evaluate_pipeline(**call)


def test_cli_on_a_tiny_pipeline_saved_with_diffusers_classes(tmp_path, capsys):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=10)).save_pretrained(tmp_path / "pipe")
    out = tmp_path / "metrics.json"
    # no --num_inference_steps: the default (100) is capped at the scheduler's 10 training steps
    returned = evaluate.main([str(tmp_path / "pipe"), "--num_samples", "8", "--num_bpd_images", "4",
                              "--output", str(out)])
    printed = json.loads(capsys.readouterr().out)
    assert printed == returned == json.loads(out.read_text())
    assert {"fid_digits", "fid_digits_floor", "class_balance", "classifier_confidence"} <= set(printed)
    assert printed["num_generated"] == printed["num_real_a"] == 8 and printed["fid_digits"] > printed["fid_digits_floor"]
    # the default reference is the held-out test split: 450 digits, halves of 225
    assert printed["real_split"] == printed["bpd_split"] == "test" and printed["num_real_b"] == 225
    assert printed["sampler"] == "DDPMScheduler" and printed["num_inference_steps"] == 10 and printed["seed"] == 0
    assert printed["num_bpd_images"] == 4 and np.isfinite(printed["bits_per_dim"]) and printed["bits_per_dim"] > 0


def test_reference_statistics_are_cached_and_reused(digits, tmp_path):
    def run():
        return evaluate_pipeline(ReplayPipeline(digits["test"][:12]), digits["train"][:40], num_samples=12,
                                 num_bpd_images=0, reference_cache=str(tmp_path))
    first = run()
    files = list(tmp_path.glob("reference_digits_*.npz"))
    assert len(files) == 1 and "kid_digits" in first
    second = run()  # from the cache: the same FID and floor, KID skipped (it needs the features)
    assert second["fid_digits"] == pytest.approx(first["fid_digits"], rel=1e-6)  # np.cov vs running sums
    assert second["fid_digits_floor"] == pytest.approx(first["fid_digits_floor"], rel=1e-6)
    assert "kid_digits" not in second
    other = evaluate_pipeline(ReplayPipeline(digits["test"][:12]), digits["train"][40:80], num_samples=12,
                              num_bpd_images=0, reference_cache=str(tmp_path))
    assert len(list(tmp_path.glob("reference_digits_*.npz"))) == 2  # other images: another key, no stale reuse
    assert other["fid_digits"] != first["fid_digits"]


@pytest.mark.slow
def test_packaged_inception_fid_runs_offline_through_evaluate(digits):
    metrics = evaluate_pipeline(ReplayPipeline(digits["test"][:6]), digits["train"][:12], num_samples=6,
                                feature_extractor="inception", num_bpd_images=0, batch_size=6)
    assert metrics["fid_inception"] > 0 and metrics["fid_inception_floor"] > 0
    assert (metrics["num_generated"], metrics["num_real_a"], metrics["num_real_b"]) == (6, 6, 6)
