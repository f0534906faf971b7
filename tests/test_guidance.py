"""Class labels and classifier-free guidance in DDPMPipeline, checked against closed forms and two separate passes.

The oracle network predicts the exact eps for data from a class-dependent Gaussian, x_0 | y ~ N(mu_y, s^2 I):
x_t | y = sqrt(a) x_0 + sqrt(1 - a) eps is N(sqrt(a) mu_y, (a s^2 + 1 - a) I), whose score is
-(x_t - sqrt(a) mu_y) / (a s^2 + 1 - a); eps*(x_t) = -sqrt(1 - a) score
= sqrt(1 - a) (x_t - sqrt(a) mu_y) / (a s^2 + 1 - a). The null class is the equal-weight mixture of the classes,
whose exact eps is the responsibility-weighted sum of the class eps (the mixture score).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.unets.unet_2d import UNet2DOutput

import diffusers
import ddpm_hf
from ddpm_hf.pipeline import DDPMPipeline

T, S, K = 50, 0.3, 3
MUS = [-0.6, 0.1, 0.7]
NAMES = {0: "low", 1: "mid", 2: "high"}
BETAS = np.linspace(1e-4, 0.02, T)  # the schedulers' default linear betas
ABAR = np.cumprod(1 - BETAS)


def _abar(t):
    return torch.as_tensor(ABAR, dtype=torch.float64)[torch.as_tensor(t).long()]


def gaussian_eps(x, abar, mu):
    """eps*(x_t) for x_0 ~ N(mu, S^2 I), derived in the module docstring; abar broadcast per sample."""
    return (1 - abar).sqrt() * (x - abar.sqrt() * mu) / (abar * S**2 + 1 - abar)


def mixture_eps(x, abar):
    """Exact eps of the equal-weight mixture: sum_y r_y(x) eps_y(x), r_y the posterior class weights."""
    var = abar * S**2 + 1 - abar
    logp = torch.stack([-((x - abar.sqrt() * m) ** 2).flatten(1).sum(1) / (2 * var.flatten()) for m in MUS], 1)
    r = logp.softmax(1)
    return sum(r[:, i].reshape(-1, 1, 1, 1) * gaussian_eps(x, abar, m) for i, m in enumerate(MUS))


class ClassGaussianEps(ModelMixin, ConfigMixin):
    """The exact-eps network; ``fixed_class`` (and ``fixed_guidance``) make the twin that takes no labels."""

    @register_to_config
    def __init__(self, sample_size: int = 4, in_channels: int = 1, out_channels: int = 1,
                 num_class_embeds: int | None = K + 1, class_embed_type: str | None = None,
                 prediction_type: str = "epsilon", fixed_class: int | None = None,
                 fixed_guidance: float | None = None):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))
        self.batches = []

    def _eps(self, x, abar, labels):
        out = torch.empty_like(x)
        for i, y in enumerate(labels.tolist()):
            out[i] = (mixture_eps(x[i : i + 1], abar[i : i + 1]) if y == K else
                      gaussian_eps(x[i : i + 1], abar[i : i + 1], MUS[y]))[0]
        return out

    def forward(self, sample, timestep, class_labels=None, return_dict=True):
        self.batches.append(len(sample))
        n, cfg = len(sample), self.config
        if cfg.fixed_class is not None:
            assert class_labels is None, "the twin takes no labels"
            class_labels = torch.full((n,), cfg.fixed_class)
        abar = _abar(torch.as_tensor(timestep).expand(n)).reshape(-1, 1, 1, 1).to(sample.dtype)
        eps = self._eps(sample, abar, class_labels)
        if cfg.fixed_guidance is not None:  # Ho & Salimans eq. 6 written out
            eps = self._eps(sample, abar, torch.full((n,), K)) + cfg.fixed_guidance * (
                eps - self._eps(sample, abar, torch.full((n,), K)))
        x0 = (sample - (1 - abar).sqrt() * eps) / abar.sqrt()
        out = {"epsilon": eps, "sample": x0, "v_prediction": abar.sqrt() * eps - (1 - abar).sqrt() * x0}[
            cfg.prediction_type]
        if cfg.out_channels == 2 * cfg.in_channels:  # a "learned variance" that tells the classes apart
            out = torch.cat([out, 0.1 * class_labels.to(out).reshape(-1, 1, 1, 1).expand_as(out) - 0.5], 1)
        return UNet2DOutput(sample=out) if return_dict else (out,)


def _pipe(scheduler=None, id2label=NAMES, **config):
    scheduler = scheduler or ddpm_hf.DDIMScheduler(num_train_timesteps=T, clip_sample=False)
    if config.get("fixed_class") is not None:  # the twin: an unconditional network to the pipeline
        config["num_class_embeds"], id2label = None, None
    pipe = DDPMPipeline(ClassGaussianEps(**config).double(), scheduler, id2label=id2label)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _latents(pipe, **kwargs):
    """Final latents (before the [0, 1] mapping and clamp) through the step callback."""
    seen = {}

    def grab(p, i, t, kw):
        seen["x"] = kw["latents"].clone()
        return kw

    pipe(callback_on_step_end=grab, output_type="pt", **kwargs)
    return seen["x"]


def test_guided_ddim_equals_the_closed_form_recurrence():
    w, labels, steps = 3.0, [0, 2, 1], 5
    pipe = _pipe()
    x_start = torch.randn(3, 1, 4, 4, generator=_gen(), dtype=torch.float64)
    got = _latents(pipe, batch_size=3, num_inference_steps=steps, latents=x_start, class_labels=labels,
                   guidance_scale=w)
    # Hand-written DDIM (eta = 0, eq. 12) with the guided eps of eq. 6 on the closed-form eps, in float64.
    ts = [i * (T // steps) for i in range(steps)][::-1]  # leading spacing
    x = x_start.clone()
    mu = torch.tensor([MUS[y] for y in labels], dtype=torch.float64).reshape(-1, 1, 1, 1)
    for i, t in enumerate(ts):
        a = torch.tensor(ABAR[t])
        a_prev = torch.tensor(ABAR[ts[i + 1]] if i + 1 < len(ts) else 1.0)
        eps_c, eps_u = gaussian_eps(x, a, mu), mixture_eps(x, a.expand(3).reshape(-1, 1, 1, 1))
        eps = eps_u + w * (eps_c - eps_u)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    torch.testing.assert_close(got, x, atol=1e-10, rtol=0)
    assert pipe.unet.batches == [6] * steps  # both halves in one pass per step


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_guidance_one_is_the_conditional_model_in_one_pass(prediction_type):
    pipe = _pipe(prediction_type=prediction_type)
    pipe.scheduler = ddpm_hf.DDIMScheduler(num_train_timesteps=T, clip_sample=False, prediction_type=prediction_type)
    kwargs = dict(batch_size=2, num_inference_steps=4)
    conditional = _latents(pipe, model_kwargs={"class_labels": torch.tensor([1, 2])}, generator=_gen(), **kwargs)
    pipe.unet.batches.clear()
    guided = _latents(pipe, class_labels=["mid", "high"], guidance_scale=1.0, generator=_gen(), **kwargs)
    assert torch.equal(guided, conditional)
    assert pipe.unet.batches == [2] * 4


@pytest.mark.parametrize("phi", [0.0, 0.7])
@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
def test_x0_and_v_models_are_guided_in_eps_space(prediction_type, phi):
    """An x_0/v network guided (with and without rescale) equals the eps network guided: the same eps, converted."""
    kwargs = dict(batch_size=3, num_inference_steps=4, class_labels=[0, 1, 2], guidance_scale=2.5,
                  guidance_rescale=phi)
    eps_pipe = _pipe()
    other = _pipe(ddpm_hf.DDIMScheduler(num_train_timesteps=T, clip_sample=False, prediction_type=prediction_type),
                  prediction_type=prediction_type)
    torch.testing.assert_close(_latents(other, generator=_gen(), **kwargs), _latents(eps_pipe, generator=_gen(), **kwargs),
                               atol=1e-9, rtol=0)


def test_guidance_rescale_follows_lin_et_al():
    w, phi, steps = 4.0, 0.6, 3
    pipe = _pipe()
    x_start = torch.randn(2, 1, 4, 4, generator=_gen(3), dtype=torch.float64)
    got = _latents(pipe, batch_size=2, num_inference_steps=steps, latents=x_start, class_labels=[0, 2],
                   guidance_scale=w, guidance_rescale=phi)
    ts = [i * (T // steps) for i in range(steps)][::-1]  # leading spacing
    x = x_start.numpy().copy()
    for i, t in enumerate(ts):
        a, a_prev = ABAR[t], (ABAR[ts[i + 1]] if i + 1 < len(ts) else 1.0)
        xt = torch.from_numpy(x)
        eps_c = gaussian_eps(xt, torch.tensor(a), torch.tensor([MUS[0], MUS[2]], dtype=torch.float64).reshape(-1, 1, 1, 1)).numpy()
        eps_u = mixture_eps(xt, torch.full((2, 1, 1, 1), a, dtype=torch.float64)).numpy()
        cfg = eps_u + w * (eps_c - eps_u)
        sd_pos, sd_cfg = eps_c.reshape(2, -1).std(1, ddof=1), cfg.reshape(2, -1).std(1, ddof=1)
        eps = phi * cfg * (sd_pos / sd_cfg)[:, None, None, None] + (1 - phi) * cfg  # sec. 3.4
        x0 = (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
        x = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps
    np.testing.assert_allclose(got.numpy(), x, atol=1e-10, rtol=0)


def test_guidance_zero_is_the_null_class_model_in_one_pass():
    pipe, null_twin = _pipe(), _pipe(fixed_class=K)
    got = _latents(pipe, batch_size=2, num_inference_steps=3, generator=_gen(), class_labels=[0, 2], guidance_scale=0)
    assert torch.equal(got, _latents(null_twin, batch_size=2, num_inference_steps=3, generator=_gen()))
    assert pipe.unet.batches == [2] * 3


def test_unconditional_sampling_of_a_guidance_model_goes_through_the_null_class():
    null_twin = _pipe(fixed_class=K)
    expected = _latents(null_twin, batch_size=2, num_inference_steps=4, generator=_gen())
    assert torch.equal(_latents(_pipe(), batch_size=2, num_inference_steps=4, generator=_gen()), expected)
    assert torch.equal(_latents(_pipe(), batch_size=2, num_inference_steps=4, generator=_gen(), guidance_scale=4.0),
                       expected)


def test_per_sample_generators_stay_reproducible_with_guidance():
    pipe = _pipe(ddpm_hf.DDPMScheduler(num_train_timesteps=T, clip_sample=False))
    batch = _latents(pipe, batch_size=3, num_inference_steps=6, generator=[_gen(s) for s in (5, 6, 7)],
                     class_labels=[2, 0, 1], guidance_scale=2.0)
    for i, (seed, y) in enumerate(zip((5, 6, 7), (2, 0, 1))):
        alone = _latents(pipe, batch_size=1, num_inference_steps=6, generator=[_gen(seed)], class_labels=y,
                         guidance_scale=2.0)
        torch.testing.assert_close(batch[i : i + 1], alone, atol=1e-12, rtol=0)


def test_names_ints_and_tensors_agree_and_one_label_is_for_all():
    pipe = _pipe()
    kwargs = dict(batch_size=3, num_inference_steps=3, guidance_scale=2.0)
    ref = _latents(pipe, class_labels=[2, 2, 2], generator=_gen(), **kwargs)
    for labels in ("high", 2, ["high"] * 3, torch.tensor(2), torch.tensor([2, 2, 2]), np.int64(2), np.array([2] * 3)):
        assert torch.equal(_latents(pipe, class_labels=labels, generator=_gen(), **kwargs), ref), labels


@pytest.mark.parametrize("labels, error, words", [
    (3, ValueError, "label 3 is out of range; this model has classes 0..2"),
    (-1, ValueError, "out of range"),
    ("seven", ValueError, "unknown class name 'seven'; the classes are 'low', 'mid', 'high'"),
    ([0, 1], ValueError, "2 labels for 3 samples"),
    (torch.tensor([0.0, 1.0, 2.0]), TypeError, "integer"),
    (np.array([0.5, 1, 2]), TypeError, "integer"),
    (1.5, TypeError, "class_labels must be"),
])
def test_bad_labels_name_the_problem(labels, error, words):
    with pytest.raises(error, match=words.replace("(", r"\(").replace(".", r"\.")):
        _pipe()(batch_size=3, num_inference_steps=2, class_labels=labels, guidance_scale=2.0)


def test_models_that_cannot_be_guided_refuse_it():
    uncond = _pipe(id2label=None, num_class_embeds=None)
    with pytest.raises(ValueError, match="guidance_scale=3.0 .* not class-conditional"):
        uncond(batch_size=1, num_inference_steps=2, guidance_scale=3.0)
    with pytest.raises(ValueError, match="class_labels were given but the unet is not class-conditional"):
        uncond(batch_size=1, num_inference_steps=2, class_labels=0)
    plain = _pipe(id2label=None, num_class_embeds=K)  # conditional, int labels, no null class
    with pytest.raises(ValueError, match="class_labels is required"):
        plain(batch_size=1, num_inference_steps=2)
    with pytest.raises(ValueError, match="no null class .*id2label missing"):
        plain(batch_size=1, num_inference_steps=2, class_labels=1, guidance_scale=2.0)
    with pytest.raises(ValueError, match="unknown class name 'mid'.*no id2label"):
        plain(batch_size=1, num_inference_steps=2, class_labels="mid")
    with pytest.raises(ValueError, match="id2label names 3 classes but unet.config.num_class_embeds is 7"):
        _pipe(num_class_embeds=7)
    with pytest.raises(ValueError, match="id2label names classes but the unet is not class-conditional"):
        _pipe(num_class_embeds=None)
    with pytest.raises(ValueError, match="guidance_rescale"):
        _pipe()(batch_size=1, num_inference_steps=2, class_labels=0, guidance_scale=2.0, guidance_rescale=1.5)
    with pytest.raises(ValueError, match="not both"):
        _pipe()(batch_size=1, num_inference_steps=2, class_labels=0, model_kwargs={"class_labels": torch.tensor([0])})


def test_id2label_round_trips_through_from_pretrained_with_int_keys(tmp_path):
    pipe = _pipe()
    assert pipe.id2label == NAMES and pipe.config["id2label"] == {"0": "low", "1": "mid", "2": "high"}
    assert DDPMPipeline(pipe.unet, pipe.scheduler, id2label={"0": "low", "1": "mid", "2": "high"}).id2label == NAMES
    with pytest.raises(ValueError, match="id2label keys must be 0..1"):
        DDPMPipeline(pipe.unet, pipe.scheduler, id2label={0: "a", 2: "b"})


# ---- methods: each equals a twin network with the (guided) class built in ----------------------------------------

IMAGES = torch.rand(2, 1, 4, 4, generator=_gen(1), dtype=torch.float64) * 0.8 + 0.1
LATENTS = torch.randn(2, 1, 4, 4, generator=_gen(2), dtype=torch.float64)
METHODS = {
    "invert": lambda p, kw: p.invert(IMAGES, num_inference_steps=4, **kw),
    "decode": lambda p, kw: p.decode(LATENTS, num_inference_steps=4, output_type="pt", **kw).images,
    "interpolate": lambda p, kw: p.interpolate(IMAGES[:1], IMAGES[1:], num_points=3, num_inference_steps=3,
                                               input_type="images", output_type="pt", **kw).images,
    "img2img": lambda p, kw: p.img2img(IMAGES, strength=0.6, num_inference_steps=5, generator=_gen(),
                                       output_type="pt", **kw).images,
    "inpaint": lambda p, kw: p.inpaint(IMAGES, torch.tensor([[1.0, 1, 0, 0]] * 4), num_inference_steps=6,
                                       jump_length=2, jump_n_sample=2, generator=_gen(), output_type="pt",
                                       **kw).images,
}


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("w", [1.0, 2.5])
def test_every_method_takes_labels_and_guidance(method, w):
    twin = _pipe(ddpm_hf.DDPMScheduler(num_train_timesteps=T, clip_sample=False), fixed_class=2,
                 fixed_guidance=None if w == 1 else w)
    pipe = _pipe(ddpm_hf.DDPMScheduler(num_train_timesteps=T, clip_sample=False))
    ours = METHODS[method](pipe, {"class_labels": "high", "guidance_scale": w})
    torch.testing.assert_close(ours, METHODS[method](twin, {}), atol=1e-12, rtol=0)
    assert not torch.equal(ours, METHODS[method](pipe, {"class_labels": "low", "guidance_scale": w}))


def test_log_likelihood_is_the_conditional_bound():
    scheduler = ddpm_hf.DDPMScheduler(num_train_timesteps=T, clip_sample=False)
    pipe = _pipe(scheduler)
    got = pipe.log_likelihood(IMAGES, generator=_gen(), class_labels=[0, 2]).bits_per_dim
    for i, y in enumerate((0, 2)):
        twin = _pipe(scheduler, fixed_class=y).log_likelihood(IMAGES[i : i + 1], generator=[_gen()])
        # the batch draws one noise tensor for both images from one generator; compare per image with its own draw
        alone = pipe.log_likelihood(IMAGES[i : i + 1], generator=[_gen()], class_labels=y)
        torch.testing.assert_close(alone.bits_per_dim, twin.bits_per_dim, atol=1e-12, rtol=0)
    assert got.shape == (2,)
    with pytest.raises(TypeError):
        pipe.log_likelihood(IMAGES, class_labels=0, guidance_scale=2.0)


# ---- schedulers and learned variance -----------------------------------------------------------------------------


def _tiny_unet(out_channels=1, **extra):
    torch.manual_seed(0)
    return ddpm_hf.UNet2DModel(sample_size=8, in_channels=1, out_channels=out_channels, layers_per_block=1,
                               block_out_channels=(8, 16), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                               up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                               attention_head_dim=None, num_class_embeds=K + 1, **extra).eval()


def _two_pass_output(unet, x, t, labels, w, phi, prediction_type, abar):
    """Reference: two separate network calls, combined as in the papers (float64 conversions to eps)."""
    c = x.shape[1]
    cond = unet(x, t, class_labels=labels).sample
    uncond = unet(x, t, class_labels=torch.full_like(labels, K)).sample
    a = torch.as_tensor(abar, dtype=torch.float64)
    x64 = x.double()

    def to_eps(o):
        o = o.double()
        return {"epsilon": o, "sample": (x64 - a.sqrt() * o) / (1 - a).sqrt(),
                "v_prediction": a.sqrt() * o + (1 - a).sqrt() * x64}[prediction_type]

    e_c, e_u = to_eps(cond[:, :c]), to_eps(uncond[:, :c])
    e = e_u + w * (e_c - e_u)
    if phi:
        e = phi * e * (e_c.std(dim=(1, 2, 3), keepdim=True) / e.std(dim=(1, 2, 3), keepdim=True)) + (1 - phi) * e
    x0 = (x64 - (1 - a).sqrt() * e) / a.sqrt()
    out = {"epsilon": e, "sample": x0, "v_prediction": a.sqrt() * e - (1 - a).sqrt() * x0}[prediction_type]
    return torch.cat([out.to(cond.dtype), cond[:, c:]], 1)


SCHEDULERS = {
    "ddpm": lambda: ddpm_hf.DDPMScheduler(num_train_timesteps=T),
    "ddpm-learned_range": lambda: ddpm_hf.DDPMScheduler(num_train_timesteps=T, variance_type="learned_range"),
    "ddim-v": lambda: ddpm_hf.DDIMScheduler(num_train_timesteps=T, prediction_type="v_prediction"),
    "ddim-x0": lambda: ddpm_hf.DDIMScheduler(num_train_timesteps=T, prediction_type="sample"),
    "dpmsolver": lambda: diffusers.DPMSolverMultistepScheduler(num_train_timesteps=T),
    "unipc": lambda: diffusers.UniPCMultistepScheduler(num_train_timesteps=T),
    "euler": lambda: diffusers.EulerDiscreteScheduler(num_train_timesteps=T),  # fractional timesteps, scaled input
    "diffusers-ddpm-learned_range": lambda: diffusers.DDPMScheduler(num_train_timesteps=T,
                                                                    variance_type="learned_range"),
}


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_batched_guidance_equals_two_separate_passes(name):
    scheduler = SCHEDULERS[name]()
    pred = scheduler.config.prediction_type
    unet = _tiny_unet(out_channels=2 if "learned" in name else 1).double()  # float64: x_0 outputs amplify rounding
    pipe = DDPMPipeline(unet, scheduler, id2label=NAMES)
    pipe.set_progress_bar_config(disable=True)
    labels, w, phi = torch.tensor([0, 2]), 3.0, (0.5 if pred != "epsilon" else 0.0)
    got = _latents(pipe, batch_size=2, num_inference_steps=4, generator=_gen(), class_labels=labels,
                   guidance_scale=w, guidance_rescale=phi)
    reference = SCHEDULERS[name]()
    table = getattr(reference, "noise_schedule", reference).alphas_cumprod.double()  # ddpm_hf's float64 table
    reference.set_timesteps(4)
    gen = _gen()
    x = torch.randn(2, 1, 8, 8, generator=gen, dtype=torch.float64) * reference.init_noise_sigma
    takes_generator = "generator" in reference.step.__code__.co_varnames
    with torch.no_grad():
        for t in reference.timesteps:
            out = _two_pass_output(unet, reference.scale_model_input(x, t), t, labels, w, phi, pred, table[int(t)])
            kw = {"generator": gen} if takes_generator else {}
            x = reference.step(out, t, x, **kw).prev_sample
    torch.testing.assert_close(got, x, atol=1e-9, rtol=0)


def test_learned_variance_model_samples_with_ddim():
    """A 2C-output unet with DDIM (which ignores the variance): the variance channels are dropped (it raised)."""
    config = ddpm_hf.DDPMScheduler(num_train_timesteps=T, variance_type="learned_range").config
    unet = _tiny_unet(out_channels=2)
    for cls in (ddpm_hf.DDIMScheduler, diffusers.DDIMScheduler, diffusers.DPMSolverMultistepScheduler):
        pipe = DDPMPipeline(unet, cls.from_config(config), id2label=NAMES)
        pipe.set_progress_bar_config(disable=True)
        got = _latents(pipe, batch_size=2, num_inference_steps=3, generator=_gen(), class_labels=[1, 2])
        reference = cls.from_config(config)
        reference.set_timesteps(3)
        x = torch.randn(2, 1, 8, 8, generator=_gen())
        with torch.no_grad():
            for t in reference.timesteps:
                x = reference.step(unet(x, t, class_labels=torch.tensor([1, 2])).sample[:, :1], t, x).prev_sample
        torch.testing.assert_close(got, x, atol=1e-6, rtol=0)
    unconditional = ddpm_hf.UNet2DModel.from_config({**unet.config, "num_class_embeds": None})
    plain = DDPMPipeline(unconditional, ddpm_hf.DDIMScheduler.from_config(config))
    plain.set_progress_bar_config(disable=True)
    assert plain(batch_size=2, num_inference_steps=3, output_type="np").images.shape == (2, 8, 8, 1)


def test_alpha_at_fractional_timesteps_is_what_euler_feeds_the_network():
    from ddpm_hf.guidance import alpha_at

    euler = diffusers.EulerDiscreteScheduler(num_train_timesteps=T)
    euler.set_timesteps(7)
    table = euler.alphas_cumprod.double()
    for i, t in enumerate(euler.timesteps):
        sigma = float(euler.sigmas[i])  # Euler's own interpolated sigma; its network input is x / sqrt(sigma^2 + 1)
        assert float(alpha_at(table, t)) == pytest.approx(1 / (1 + sigma**2), rel=1e-6)
    assert float(alpha_at(table, 10)) == float(table[10])
    torch.testing.assert_close(alpha_at(table, torch.tensor([3, 4])), table[[3, 4]], atol=0, rtol=0)

