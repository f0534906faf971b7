"""Full sampling loops through ddpm_hf's schedulers and diffusers' (the oracle) with identical inputs and generators.

Where diffusers 0.42.1 is right, every step must agree to 1e-5 * max(1, |reference|) in float32. Where it is wrong
(docs/compatibility.md), the same loop is checked step by step against the paper formulas written out below in
float64, independently of ``ddpm_hf.diffusion_math``.
"""

import itertools
import math

import diffusers
import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from ddpm_hf import DDIMScheduler, DDPMScheduler

SHAPE = (2, 1, 4, 4)


def toy_model(sample: torch.Tensor, t, out_factor: int = 1) -> torch.Tensor:
    """A fixed, smooth, bounded function of (x_t, t) standing in for a network."""
    tt = float(t) / 1000.0
    out = torch.tanh(sample) * (0.6 + 0.3 * math.cos(3.0 * tt)) + 0.1 * torch.sin(2.0 * sample + 5.0 * tt)
    if out_factor == 2:
        out = torch.cat([out, torch.tanh(0.7 * sample + tt)], dim=1)
    return out


def start_sample(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str, scale=1.0, slack=0.0) -> None:
    """|ours - ref| <= 1e-5 * max(1, |ref|, scale) + slack, elementwise.

    ``scale`` is the size of terms that cancel (see ``x0_scale``); ``slack`` is diffusers' own distance from the
    exact float64 formula when diffusers is the reference (see ``run_loop``).
    """
    assert ours.dtype == ref.dtype and ours.shape == ref.shape, what
    assert torch.isfinite(ours).all(), f"{what}: non-finite values"
    err = (ours.double() - ref.double()).abs()
    tol = 1e-5 * torch.maximum(ref.double().abs().clamp(min=1.0), torch.as_tensor(scale, dtype=torch.float64)) + slack
    assert (err <= tol).all(), f"{what}: max error {err.max().item():.3g} (max |ref| {ref.abs().max().item():.3g})"


def x0_scale(cfg, a: float, x: torch.Tensor, out: torch.Tensor):
    """Size of the terms that cancel in x_0 = (x_t - sqrt(1 - a) eps) / sqrt(a).

    Near t = T, 1 / sqrt(a) is ~160, so one float32 rounding of x_t or of a coefficient moves x_0 by ~1e-5 * |x_t|
    in any implementation. x_0 is compared at that resolution; samples at the full 1e-5 * max(1, |ref|).
    """
    if cfg["prediction_type"] != "epsilon":
        return 1.0
    return (x.double().abs() + math.sqrt(1 - a) * out[:, : x.shape[1]].double().abs()) / math.sqrt(a)


# ---- independent float64 formulas (DDPM eq. 4, 6, 7, 15; DDIM eq. 12, 16; improved DDPM eq. 15) ----------------


def formula_x0(out, x, a, cfg):
    if cfg["prediction_type"] == "epsilon":
        x0 = (x - math.sqrt(1 - a) * out) / math.sqrt(a)
    elif cfg["prediction_type"] == "sample":
        x0 = out
    else:
        x0 = math.sqrt(a) * x - math.sqrt(1 - a) * out
    if cfg["thresholding"]:
        flat = x0.reshape(x0.shape[0], -1)
        s = torch.quantile(flat.abs(), cfg["dynamic_thresholding_ratio"], dim=1)
        s = s.clamp(min=1.0, max=cfg["sample_max_value"])[:, None]
        return (torch.maximum(torch.minimum(flat, s), -s) / s).reshape(x0.shape)
    if cfg["clip_sample"]:
        return x0.clamp(-cfg["clip_sample_range"], cfg["clip_sample_range"])
    return x0


def formula_ddpm_step(out, x, a_t, a_prev, cfg, noise):
    variance_type = cfg["variance_type"]
    if variance_type.startswith("learned"):
        out, var_values = out.chunk(2, dim=1)
    x0 = formula_x0(out, x, a_t, cfg)
    beta = 1 - a_t / a_prev
    mean = math.sqrt(a_prev) * beta / (1 - a_t) * x0 + math.sqrt(1 - beta) * (1 - a_prev) / (1 - a_t) * x
    small, large = max((1 - a_prev) / (1 - a_t) * beta, 1e-20), beta
    if noise is None:
        return mean, x0
    if variance_type in ("fixed_small", "fixed_small_log"):
        std = math.sqrt(small)
    elif variance_type in ("fixed_large", "fixed_large_log"):
        std = math.sqrt(large)
    elif variance_type == "learned":
        std = torch.exp(0.5 * var_values)
    else:
        frac = (var_values + 1) / 2
        std = torch.exp(0.5 * (frac * math.log(large) + (1 - frac) * math.log(small)))
    return mean + std * noise, x0


def formula_ddim_step(out, x, a_t, a_prev, cfg, noise, eta, use_clipped):
    x0 = formula_x0(out, x, a_t, cfg)
    raw_x0 = formula_x0(out, x, a_t, {**cfg, "clip_sample": False, "thresholding": False})
    eps = (x - math.sqrt(a_t) * (x0 if use_clipped else raw_x0)) / math.sqrt(1 - a_t)
    sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    prev = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma**2, 0.0)) * eps
    return (prev if noise is None else prev + sigma * noise), x0


def formula_step(sched, out, x, t, prev, generator, step_kwargs):
    """The exact float64 step of ``sched``'s config from (out, x) at t to prev, drawing noise like the scheduler."""
    cfg = dict(sched.config)
    alphas_cumprod = sched.noise_schedule.alphas_cumprod  # float64: the public tables are diffusers' float32
    a_t = float(alphas_cumprod[t])
    a_prev = float(alphas_cumprod[prev]) if prev >= 0 else float(sched.final_alpha_cumprod_float64)

    def noise():
        return randn_tensor(x.shape, generator=generator, dtype=x.dtype).double()

    if isinstance(sched, DDIMScheduler):
        eta = step_kwargs.get("eta", 0.0)
        expect, x0 = formula_ddim_step(out.double(), x.double(), a_t, a_prev, cfg, noise() if eta > 0 else None,
                                       eta, step_kwargs.get("use_clipped_model_output", False))
    else:
        expect, x0 = formula_ddpm_step(out.double(), x.double(), a_t, a_prev, cfg, noise() if prev >= 0 else None)
    return expect.to(x.dtype), x0.to(x.dtype), x0_scale(cfg, a_t, x, out)


def make_generator(seed, per_sample):
    if per_sample:
        return [torch.Generator().manual_seed(seed + i) for i in range(SHAPE[0])]
    return torch.Generator().manual_seed(seed)


def run_loop(ours, ref=None, step_kwargs=None, out_factor=1, seed=0, dtype=torch.float32, per_sample_generators=False,
             **set_kwargs):
    """A full sampling loop through ``ours`` with identical generators for every implementation.

    At each step ours must match the exact float64 formula to 1e-5 * max(1, |formula|). With ``ref`` (a diffusers
    scheduler, fed the same x_t and model output) ours must also match diffusers to 1e-5 * max(1, |ref|), up to
    diffusers' own float32 error against the formula (its schedule is float32: 1 - bar(alpha) and beta lose digits
    at small t), which must itself stay below 2e-4 * max(1, |ref|) (measured: up to 8.1e-5 at T=1000).

    Returns:
        The visited table.
    """
    step_kwargs = step_kwargs or {}
    ours.set_timesteps(**set_kwargs)
    table = ours.timesteps.tolist()
    assert ours.timesteps.dtype == torch.int64 and len(table) == len(set(table))
    if ref is not None:
        ref.set_timesteps(**set_kwargs)
        assert ref.timesteps.dtype == torch.int64 and ref.timesteps.tolist() == table
    gens = [make_generator(seed, per_sample_generators) for _ in range(3)]
    x = start_sample(seed + 1).to(dtype)
    for i, t in enumerate(ours.timesteps):
        prev = table[i + 1] if i + 1 < len(table) else -1
        out = toy_model(x, t, out_factor)
        a = ours.step(out, t, x, generator=gens[0], **step_kwargs)
        expect, expect_x0, scale = formula_step(ours, out, x, int(t), prev, gens[1], step_kwargs)
        assert a.prev_sample.dtype == dtype
        assert_close(a.pred_original_sample, expect_x0, f"x0 vs formula at t={int(t)}", scale)
        assert_close(a.prev_sample, expect, f"x_prev vs formula at t={int(t)}")
        if ref is not None:
            b = ref.step(out.clone(), ref.timesteps[i], x.clone(), generator=gens[2], **step_kwargs)
            for name, mine, theirs, exact, sc in (("x0", a.pred_original_sample, b.pred_original_sample, expect_x0, scale),
                                                  ("x_prev", a.prev_sample, b.prev_sample, expect, 1.0)):
                slack = (theirs.double() - exact.double()).abs()
                cap = 2e-4 * theirs.double().abs().clamp(min=1.0)
                assert_close(theirs, exact, f"diffusers {name} vs formula at t={int(t)}", sc, cap)
                assert_close(mine, theirs, f"{name} vs diffusers at t={int(t)}", sc, slack)
        x = a.prev_sample
    return table


# ---- timestep spacing x step count ----------------------------------------------------------------------------

SPACING_GRID = [
    (T, spacing, n)
    for T, counts in ((1000, (1000, 250, 50, 10, 37, 7)), (50, (50, 10, 7, 37)))
    for spacing in ("leading", "linspace", "trailing")
    for n in counts
]


def ddim_diffusers_prev_is_right(table: list[int], T: int) -> bool:
    """diffusers' DDIM steps to t - T // N (issue 12633); right only where that is the next table entry."""
    ratio = T // len(table)
    return all(b == a - ratio for a, b in zip(table, table[1:])) and table[-1] - ratio < 0


@pytest.mark.parametrize("T,spacing,n", SPACING_GRID)
def test_ddpm_spacing_grid(T, spacing, n):
    cfg = dict(num_train_timesteps=T, timestep_spacing=spacing)
    run_loop(DDPMScheduler(**cfg), diffusers.DDPMScheduler(**cfg), num_inference_steps=n)


@pytest.mark.parametrize("T,spacing,n", SPACING_GRID)
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_spacing_grid(T, spacing, n, eta):
    cfg = dict(num_train_timesteps=T, timestep_spacing=spacing)
    ours, ref = DDIMScheduler(**cfg), diffusers.DDIMScheduler(**cfg)
    ours.set_timesteps(n)
    right = ddim_diffusers_prev_is_right(ours.timesteps.tolist(), T)
    run_loop(ours, ref if right else None, {"eta": eta}, num_inference_steps=n)


def test_ddim_spacing_grid_covers_diffusers_prev_bug():
    """The grid must include tables where diffusers' DDIM prev_t is wrong (there only the formula is the oracle)."""
    wrong = []
    for T, spacing, n in SPACING_GRID:
        s = DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing)
        s.set_timesteps(n)
        if not ddim_diffusers_prev_is_right(s.timesteps.tolist(), T):
            wrong.append((T, spacing, n))
    assert {(1000, "linspace", 10), (1000, "trailing", 7), (50, "trailing", 37)} <= set(wrong)
    assert len(wrong) < len(SPACING_GRID) / 2


# ---- config dimensions -----------------------------------------------------------------------------------------

LIMITS = {"none": dict(clip_sample=False), "clip": dict(clip_sample=True), "threshold": dict(thresholding=True)}
VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
# fixed_large_log is NaN in diffusers (issue 14569); "learned" is read as a log variance here (improved DDPM).
DIFFUSERS_WRONG_VARIANCES = ("fixed_large_log", "learned")


@pytest.mark.parametrize("T", [1000, 50])
@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"])
@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
def test_ddpm_config_grid(T, schedule, prediction):
    for variance, limit in itertools.product(VARIANCES, LIMITS):
        cfg = dict(num_train_timesteps=T, beta_schedule=schedule, prediction_type=prediction,
                   variance_type=variance, **LIMITS[limit])
        ref = None if variance in DIFFUSERS_WRONG_VARIANCES else diffusers.DDPMScheduler(**cfg)
        run_loop(DDPMScheduler(**cfg), ref, out_factor=2 if variance.startswith("learned") else 1,
                 num_inference_steps=10)


@pytest.mark.parametrize("T", [1000, 50])
@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"])
@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
def test_ddim_config_grid(T, schedule, prediction):
    for limit, eta, alpha_one, clipped in itertools.product(LIMITS, (0.0, 0.5, 1.0), (True, False), (False, True)):
        cfg = dict(num_train_timesteps=T, beta_schedule=schedule, prediction_type=prediction,
                   set_alpha_to_one=alpha_one, **LIMITS[limit])
        # diffusers' DDIMScheduler raises NotImplementedError for sigmoid: the formula is the only oracle there.
        ref = None if schedule == "sigmoid" else diffusers.DDIMScheduler(**cfg)
        run_loop(DDIMScheduler(**cfg), ref, {"eta": eta, "use_clipped_model_output": clipped}, num_inference_steps=10)


@pytest.mark.parametrize("cls,ref", [(DDPMScheduler, diffusers.DDPMScheduler), (DDIMScheduler, diffusers.DDIMScheduler)])
@pytest.mark.parametrize(
    "extra",
    [
        dict(steps_offset=1),
        dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"),
        dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5),
        dict(clip_sample_range=0.5),
        dict(trained_betas=[0.02 * (i + 1) / 20 for i in range(20)], num_train_timesteps=20),
        dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="trailing"),
    ],
)
def test_other_config_keys(cls, ref, extra):
    run_loop(cls(**extra), ref(**extra), {"eta": 0.5} if cls is DDIMScheduler else {}, num_inference_steps=10)


def test_ddpm_custom_timesteps_against_diffusers():
    cfg = dict(variance_type="fixed_large")
    table = [999, 800, 613, 400, 251, 100, 37, 5, 0]
    assert run_loop(DDPMScheduler(**cfg), diffusers.DDPMScheduler(**cfg), timesteps=table) == table


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_custom_and_quad_timesteps_against_formula(eta):
    """diffusers' DDIM has neither custom tables nor quad spacing; both follow DDIM eq. 12 on their own table."""
    table = [999, 800, 613, 400, 251, 100, 37, 5]
    assert run_loop(DDIMScheduler(clip_sample=False), None, {"eta": eta}, timesteps=table) == table
    assert run_loop(DDIMScheduler(timestep_spacing="quad"), None, {"eta": eta}, num_inference_steps=10)[0] == 800


@pytest.mark.parametrize("cls,ref", [(DDPMScheduler, diffusers.DDPMScheduler), (DDIMScheduler, diffusers.DDIMScheduler)])
def test_generator_list_and_float64(cls, ref):
    """A list of generators (one per sample) and a float64 sample draw the same noise as diffusers."""
    kwargs = {"eta": 1.0} if cls is DDIMScheduler else {}
    run_loop(cls(), ref(), kwargs, dtype=torch.float64, per_sample_generators=True, num_inference_steps=10)


@pytest.mark.parametrize("cls,ref", [(DDPMScheduler, diffusers.DDPMScheduler), (DDIMScheduler, diffusers.DDIMScheduler)])
@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("T", [1000, 50])
def test_add_noise_and_velocity_match(cls, ref, schedule, T):
    ours, theirs = cls(num_train_timesteps=T, beta_schedule=schedule), ref(num_train_timesteps=T, beta_schedule=schedule)
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(8, 1, 4, 4, generator=g), torch.randn(8, 1, 4, 4, generator=g)
    t = torch.randint(0, T, (8,), generator=g)
    t[0], t[1] = 0, T - 1
    assert_close(ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t), "add_noise")
    assert_close(ours.get_velocity(x0, noise, t), theirs.get_velocity(x0, noise, t), "get_velocity")
