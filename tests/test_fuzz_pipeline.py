"""Fuzz DDPMPipeline's sampling and editing arguments: a ValueError/TypeError naming the argument, or images that
show the argument's effect.

An accepted value must (1) reproduce: the same arguments with an equally seeded generator give the same images;
(2) do what it says: the step count, custom timesteps, batch size, output type, strength and RePaint schedule are
checked by counting the network calls and the visited timesteps, known inpainting pixels come back exactly;
(3) sample like diffusers: the same call with diffusers' own scheduler of the same config gives the same images
(where diffusers' scheduler accepts the value too). T = 10 keeps any accepted step count cheap on the tiny net.
"""

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ddpm_hf import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

T = 10
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
ANYTHING = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 12), st.sampled_from([0, -1, 2**63]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=5), st.sampled_from(["np", "pt", "pil", "latent"]),
    st.lists(st.integers(-2, 12), max_size=3), st.just([]), st.just({}),
    st.sampled_from([torch.zeros(2, 1, 8, 8), torch.zeros(1, 1, 4, 4), torch.zeros(2, 1, 8, 8, dtype=torch.long),
                     np.zeros((2, 8, 8, 1), np.float32), [torch.Generator()] * 3, torch.Generator()]),
)
_DESCENDING = st.lists(st.integers(0, T - 1), min_size=1, max_size=4, unique=True).map(lambda ts: sorted(ts)[::-1])
# Values of each argument that should be accepted, so that effects are checked often, not only refusals.
PLAUSIBLE = {
    "batch_size": st.integers(1, 3),
    "generator": st.one_of(st.none(), st.integers(0, 9).map(lambda s: torch.Generator().manual_seed(s)),
                           st.just([torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)])),
    "num_inference_steps": st.one_of(st.none(), st.integers(1, T)),
    "timesteps": _DESCENDING,
    "eta": st.floats(0, 1),
    "latents": st.integers(0, 9).map(lambda s: torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(s))),
    "output_type": st.sampled_from(["np", "pt", "pil"]),
    "use_clipped_model_output": st.sampled_from([None, False, True]),
    "strength": st.floats(0.25, 1),
    "jump_length": st.integers(1, 4),
    "jump_n_sample": st.integers(1, 3),
    "image": st.sampled_from([torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(5)),
                              np.random.default_rng(5).random((2, 8, 8, 1), dtype=np.float32)]),
    "mask": st.sampled_from([torch.ones(8, 8), torch.zeros(1, 8, 8), (torch.rand(2, 1, 8, 8) > 0.5).float(),
                             np.eye(8, dtype=np.float32)]),
}
TINY = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=4, attention_head_dim=None)
IMAGE = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
HALF_MASK = torch.cat([torch.ones(8, 4), torch.zeros(8, 4)], 1)


@pytest.fixture(scope="module", params=["ddpm", "ddim"])
def pipes(request):
    """(ours, mirror): the same network with ddpm_hf's scheduler and with diffusers' scheduler of that config."""
    torch.manual_seed(0)
    unet = UNet2DModel(**TINY).eval()
    unet.calls = 0
    unet.register_forward_hook(lambda module, args, output: setattr(module, "calls", module.calls + 1))
    ours_cls, stock_cls = ((DDPMScheduler, diffusers.DDPMScheduler) if request.param == "ddpm"
                           else (DDIMScheduler, diffusers.DDIMScheduler))
    built = [DDPMPipeline(unet=unet, scheduler=cls(num_train_timesteps=T)) for cls in (ours_cls, stock_cls)]
    for pipeline in built:
        pipeline.set_progress_bar_config(disable=True)
    return built


def _fresh(value):
    """A generator (or list of them) in the same state as ``value``, so a rerun draws the same noise."""
    if isinstance(value, torch.Generator):
        return torch.Generator().set_state(value.get_state())
    if isinstance(value, list) and value and all(isinstance(g, torch.Generator) for g in value):
        return [_fresh(g) for g in value]
    return value


def _as_array(images):
    if isinstance(images, list):
        assert all(isinstance(im, PIL.Image.Image) for im in images)
        return np.stack([np.asarray(im, np.float64) / 255 for im in images])[..., None] if images else np.zeros(0)
    return images.double().permute(0, 2, 3, 1).numpy() if torch.is_tensor(images) else images.astype(np.float64)


def _run(pipe, method, kwargs):
    """Images, network calls and visited timesteps of one call with fresh generators (and, for
    ``generator=None``, the global RNG in a fixed state)."""
    torch.manual_seed(1234)
    seen, before = [], pipe.unet.calls
    kwargs = {k: _fresh(v) for k, v in kwargs.items()}
    if method == "__call__":
        kwargs["callback_on_step_end"] = lambda p, i, t, kw: seen.append(int(t)) or kw
    images = getattr(pipe, method)(**kwargs).images
    return images, pipe.unet.calls - before, seen


def _check_accepted(ours, mirror, method, kwargs, argument, accepted_by_mirror):
    images, calls, seen = _run(ours, method, kwargs)
    array = _as_array(images)
    again, calls_again, _ = _run(ours, method, kwargs)
    np.testing.assert_array_equal(_as_array(again), array)  # (1) equal arguments reproduce
    assert calls_again == calls and np.isfinite(array).all()
    _check_effect(method, kwargs, argument, images, array, calls, seen)  # (2)
    if accepted_by_mirror:  # (3) as diffusers' scheduler samples the same value
        expected, mirror_calls, _ = _run(mirror, method, kwargs)
        assert mirror_calls == calls
        np.testing.assert_allclose(array, _as_array(expected), atol=1e-4, rtol=0)


def _check_effect(method, kwargs, argument, images, array, calls, seen):
    batch = kwargs.get("batch_size", 2)
    assert len(array) == batch
    if method == "__call__":
        output_type = kwargs["output_type"]
        assert isinstance(images, {"pt": torch.Tensor, "np": np.ndarray, "pil": list}[output_type])
        assert array.shape == (batch, 8, 8, 1)
        assert calls == len(seen)
        if argument == "num_inference_steps":  # None: the default, T for DDPM and min(50, T) for DDIM
            assert calls == (T if kwargs["num_inference_steps"] is None else kwargs["num_inference_steps"])
        if argument == "timesteps" and kwargs["timesteps"] is not None:
            assert seen == [int(t) for t in kwargs["timesteps"]]
        return
    n = T if kwargs["num_inference_steps"] is None else kwargs["num_inference_steps"]  # both defaults are T here
    if method == "img2img":
        assert calls == int(n * kwargs["strength"])
    else:  # RePaint: the reference schedule's cost, and the known pixels back exactly
        jump, resample = kwargs["jump_length"], kwargs["jump_n_sample"]
        assert calls == n + len(range(0, n - jump, jump)) * (resample - 1) * jump
        known = np.broadcast_to(np.asarray(kwargs["mask"], np.float32).reshape(-1, 8, 8, 1) >= 0.5, array.shape)
        np.testing.assert_array_equal(array[known], _as_array(kwargs["image"])[known])


def _accepted(pipe, method, kwargs, argument):
    """Whether ``pipe`` accepts the call; a refusal must be a ValueError/TypeError naming the argument."""
    try:
        _run(pipe, method, kwargs)
    except (ValueError, TypeError) as error:
        assert argument in str(error), f"{type(error).__name__}: {error}"
        return False
    return True


def test_call_arguments(pipes):
    ours, mirror = pipes

    @FUZZ
    @given(argument=st.sampled_from(["batch_size", "generator", "num_inference_steps", "timesteps", "eta",
                                     "latents", "output_type", "use_clipped_model_output"]), data=st.data())
    def check(argument, data):
        value = data.draw(st.one_of(ANYTHING, PLAUSIBLE[argument]))
        kwargs = {"batch_size": 2, "num_inference_steps": 2, "output_type": "np",
                  "generator": torch.Generator().manual_seed(0), argument: value}
        if argument == "timesteps":
            kwargs["num_inference_steps"] = None
        if _accepted(ours, "__call__", kwargs, argument):
            _check_accepted(ours, mirror, "__call__", kwargs, argument, _mirror_accepts(mirror, "__call__", kwargs))

    check()


def _mirror_accepts(mirror, method, kwargs):
    try:
        _run(mirror, method, kwargs)
    except (ValueError, TypeError, IndexError):  # diffusers' own limits (e.g. DDIM takes no custom timesteps)
        return False
    return True


def test_editing_arguments(pipes):
    ours, mirror = pipes

    @FUZZ
    @given(method=st.sampled_from(["img2img", "inpaint"]),
           argument=st.sampled_from(["strength", "num_inference_steps", "jump_length", "jump_n_sample", "image",
                                     "mask", "generator"]), data=st.data())
    def check(method, argument, data):
        value = data.draw(st.one_of(ANYTHING, PLAUSIBLE[argument]))
        kwargs = {"image": IMAGE, "num_inference_steps": 4, "output_type": "np",
                  "generator": torch.Generator().manual_seed(0)}
        if method == "img2img":
            kwargs["strength"] = 0.5
        else:
            kwargs.update(mask=HALF_MASK, jump_length=2, jump_n_sample=2)
        if argument not in kwargs:
            return  # this method has no such argument
        kwargs[argument] = value
        if _accepted(ours, method, kwargs, argument):
            _check_accepted(ours, mirror, method, kwargs, argument, _mirror_accepts(mirror, method, kwargs))

    check()


@pytest.mark.parametrize("method, kwargs", [
    ("__call__", {"batch_size": 2, "num_inference_steps": 3, "output_type": "np", "eta": 1.0}),
    ("img2img", {"image": IMAGE, "strength": 1.0, "num_inference_steps": 4, "output_type": "np"}),
    ("inpaint", {"image": IMAGE, "mask": HALF_MASK, "num_inference_steps": 4, "jump_length": 2, "jump_n_sample": 2,
                 "output_type": "np"}),
])
def test_the_generator_decides_the_images(pipes, method, kwargs):
    """Equal seeds reproduce (checked above); different seeds give different images."""
    ours, _ = pipes
    if "eta" in kwargs and isinstance(ours.scheduler, DDPMScheduler):
        kwargs = {k: v for k, v in kwargs.items() if k != "eta"}
    a, b = (_as_array(_run(ours, method, {**kwargs, "generator": torch.Generator().manual_seed(s)})[0]) for s in (0, 1))
    assert np.abs(a - b).max() > 1e-3


VALID = [  # (method, argument, value): each must be accepted and show its effect, whatever hypothesis drew
    *[("__call__", "batch_size", n) for n in (1, 3)],
    *[("__call__", "num_inference_steps", n) for n in (None, 1, 3, T)],
    *[("__call__", "timesteps", ts) for ts in ([9, 4, 0], [7], [5, 3, 2, 1])],
    *[("__call__", "output_type", kind) for kind in ("np", "pt", "pil")],
    *[("__call__", "generator", g) for g in (None, torch.Generator().manual_seed(4),
                                             [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)])],
    ("__call__", "latents", torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))),
    *[("__call__", "eta", eta) for eta in (0.0, 0.5, 1.0)],
    *[("__call__", "use_clipped_model_output", flag) for flag in (None, False, True)],
    *[("img2img", "strength", s) for s in (0.25, 0.5, 1.0)],
    *[("img2img", "num_inference_steps", n) for n in (None, 4, 8)],
    *[("inpaint", "jump_length", j) for j in (1, 2, 4)],
    *[("inpaint", "jump_n_sample", j) for j in (1, 3)],
    *[("inpaint", "mask", m) for m in (torch.ones(8, 8), torch.zeros(1, 8, 8), np.eye(8, dtype=np.float32))],
    ("inpaint", "image", np.random.default_rng(5).random((2, 8, 8, 1), dtype=np.float32)),
]


@pytest.mark.parametrize("method, argument, value", VALID, ids=[f"{m}-{a}-{i}" for i, (m, a, _) in enumerate(VALID)])
def test_valid_values_show_their_effect(pipes, method, argument, value):
    ours, mirror = pipes
    ddim_only = (argument == "eta" and value != 0) or (argument == "use_clipped_model_output" and value is not None)
    if isinstance(ours.scheduler, DDPMScheduler) and ddim_only:
        return _refused_naming(ours, method, argument, value)  # DDIM-only arguments: refused for DDPM
    base = {"__call__": {"batch_size": 2, "num_inference_steps": 2, "output_type": "np"},
            "img2img": {"image": IMAGE, "strength": 0.5, "num_inference_steps": 4, "output_type": "np"},
            "inpaint": {"image": IMAGE, "mask": HALF_MASK, "num_inference_steps": 4, "jump_length": 2,
                        "jump_n_sample": 2, "output_type": "np"}}[method]
    kwargs = {**base, "generator": torch.Generator().manual_seed(0), argument: value}
    if argument == "timesteps":
        kwargs["num_inference_steps"] = None
        if isinstance(ours.scheduler, DDIMScheduler):  # DDIM's set_timesteps takes no custom list (diffusers too)
            return _refused_naming(ours, method, argument, value)
    assert _accepted(ours, method, kwargs, argument)
    _check_accepted(ours, mirror, method, kwargs, argument, accepted_by_mirror=True)


def _refused_naming(pipe, method, argument, value):
    with pytest.raises(ValueError, match=argument):
        getattr(pipe, method)(num_inference_steps=2, output_type="np", **{argument: value})
