"""``DDPMPipeline``: unconditional DDPM/DDIM sampling as a ``diffusers.DiffusionPipeline``.

Samples like ``diffusers.DDPMPipeline`` / ``DDIMPipeline`` (same noise draws, so the same images for the same
weights and generator), saves folders that stock diffusers loads with no custom code, and adds what users ask
diffusers for: DDIM inversion, latent interpolation, SDEdit img2img, RePaint inpainting and the DDPM
variational bound in bits per dimension.
"""

from __future__ import annotations

import inspect
import json
import numbers
import os
from typing import Any, Callable

import diffusers
import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, ModelMixin, SchedulerMixin
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils.torch_utils import randn_tensor

from .diffusion_math import q_sample
from .editing import (
    ImageInput,
    check_generator,
    check_latents,
    ddim_invert,
    images_to_tensor,
    mask_to_tensor,
    renoise,
    repaint_moves,
    sdedit_timesteps,
    slerp,
)
from .likelihood import LikelihoodOutput, variational_bound
from .models import UNet2DModel
from .schedulers import DDIMScheduler, DDPMScheduler
from .shipped_files import shipped_file

Generator = torch.Generator | list[torch.Generator] | None
OUTPUT_TYPES = ("pil", "np", "pt")
STOCK_SPACINGS = ("leading", "linspace", "trailing")
HUB_PIPELINE_MODULE = "pipeline_ddpm_hf"
HUB_PIPELINE_CLASS = "DDPMHFPipeline"
# The Hub-facing file, written next to model_index.json when stock diffusers would sample a saved scheduler
# wrongly: the text of pipelines/pipeline_ddpm_hf.py.
HUB_PIPELINE_SOURCE = shipped_file("pipeline_ddpm_hf.py.txt", "pipelines/pipeline_ddpm_hf.py").read_text()


# ---- sharing: what stock diffusers can load and sample identically ------------------------------------------------


def _is_ddpm_hf(obj: Any) -> bool:
    return type(getattr(obj, "_orig_mod", obj)).__module__.split(".")[0] == "ddpm_hf"


def stock_divergences(scheduler: SchedulerMixin) -> list[str]:
    """Why stock diffusers would sample this scheduler's saved config differently from us (empty if it would not).

    A diffusers scheduler samples the same anywhere. For ddpm_hf's schedulers the config is checked for keys and
    values whose stock behaviour differs (docs/compatibility.md): unknown keys and spacings (``quad``),
    ``trailing`` (diffusers' float arange gives N+1 timesteps for some N, e.g. 61 of 1000), DDIM ``linspace`` and
    ``trailing`` (diffusers steps to t - T // N, issue 12633), and for DDPM ``fixed_large_log`` (NaN in diffusers,
    issue 14569), ``learned`` (read as a variance by diffusers, a log variance by us) and ``steps_offset`` > 0
    with ``leading`` (diffusers adds noise on a final step that is not t = 0).
    """
    if not _is_ddpm_hf(scheduler):
        return []
    name = type(scheduler).__name__
    stock_cls = getattr(diffusers, name, None)
    if stock_cls is None:
        return [f"{name} has no diffusers counterpart"]
    config = scheduler.config
    accepted = inspect.signature(stock_cls.__init__).parameters
    reasons = [f"config key {k!r} is ddpm_hf-only" for k in sorted(config) if not k.startswith("_") and k not in accepted]
    spacing = config.get("timestep_spacing", "leading")
    if spacing not in STOCK_SPACINGS:
        reasons.append(f"timestep_spacing={spacing!r} is not implemented by diffusers")
    elif spacing == "trailing":
        reasons.append("timestep_spacing='trailing': diffusers builds N+1 timesteps for some N (e.g. 61)")
    if name == "DDIMScheduler" and spacing in ("linspace", "trailing"):
        reasons.append(f"timestep_spacing={spacing!r}: diffusers' DDIM steps to t - T // N (diffusers issue 12633)")
    if name == "DDPMScheduler":
        if config.get("variance_type") == "fixed_large_log":
            reasons.append("variance_type='fixed_large_log' gives NaN samples in diffusers (diffusers issue 14569)")
        if config.get("variance_type") == "learned":
            reasons.append("variance_type='learned': diffusers reads the extra channels as a variance, ddpm_hf as "
                           "a log variance")
        if spacing == "leading" and config.get("steps_offset", 0) > 0:
            reasons.append("steps_offset > 0: the table ends at t > 0, where diffusers' DDPM adds noise to the "
                           "final image")
    return reasons


def to_ddpm_hf_components(unet: ModelMixin, scheduler: SchedulerMixin) -> tuple[ModelMixin, SchedulerMixin]:
    """Swap diffusers' ``UNet2DModel`` and ``DDPMScheduler``/``DDIMScheduler`` for ddpm_hf's (same config, same
    weights); anything else is returned unchanged."""
    if type(unet) is diffusers.UNet2DModel:
        ours = UNet2DModel.from_config(unet.config)
        ours.load_state_dict(unet.state_dict())
        unet = ours.to(device=unet.device, dtype=unet.dtype).train(unet.training)
    ours_by_stock = {diffusers.DDPMScheduler: DDPMScheduler, diffusers.DDIMScheduler: DDIMScheduler}
    if type(scheduler) in ours_by_stock:
        scheduler = ours_by_stock[type(scheduler)].from_config(scheduler.config)
    return unet, scheduler


def _load_scheduler(folder: str, entry: list) -> SchedulerMixin:
    name = entry[1] if len(entry) == 2 and isinstance(entry[1], str) else ""
    cls = {"DDPMScheduler": DDPMScheduler, "DDIMScheduler": DDIMScheduler}.get(name) or getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise ValueError(f"model_index.json names scheduler {entry}; expected a diffusers scheduler class")
    return cls.from_pretrained(folder, subfolder="scheduler")


def _int_list(timesteps: Any) -> list[int]:
    """A custom timestep list as Python ints; TypeError for anything that is not a sequence of integers."""
    if isinstance(timesteps, torch.Tensor):
        timesteps = timesteps.tolist()
    if isinstance(timesteps, np.ndarray):
        timesteps = timesteps.tolist()
    if not isinstance(timesteps, (list, tuple)) or not all(
        isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in timesteps
    ):
        raise TypeError(f"timesteps must be a list of ints (descending training timesteps), got {timesteps!r:.80}")
    return [int(t) for t in timesteps]


class DDPMPipeline(DiffusionPipeline):
    r"""Unconditional image generation with DDPM (ancestral) or DDIM sampling.

    Works with ddpm_hf's and diffusers' ``UNet2DModel``, ``DDPMScheduler`` and ``DDIMScheduler``. Saved folders
    record the diffusers class names, so ``diffusers.DiffusionPipeline.from_pretrained`` loads them without
    ddpm_hf; when the scheduler uses an option stock diffusers would sample differently (see
    ``stock_divergences``), the folder instead names the remote-code file ``pipeline_ddpm_hf.py`` it carries,
    so stock diffusers refuses it unless ``trust_remote_code=True``, and then samples it with this class.

    Args:
        unet: the noise-prediction network.
        scheduler: a ``DDPMScheduler`` or ``DDIMScheduler`` (or another diffusers scheduler with the same step API).
    """

    model_cpu_offload_seq = "unet"
    _callback_tensor_inputs = ["latents"]

    def __init__(self, unet: ModelMixin, scheduler: SchedulerMixin):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    # ---- sharing -------------------------------------------------------------------------------------------------

    def __setattr__(self, name: str, value: Any):
        super().__setattr__(name, value)
        # diffusers records a class outside diffusers under its module path, which stock diffusers cannot load;
        # ddpm_hf's components share their diffusers counterparts' names, configs and weights.
        if name in ("unet", "scheduler") and _is_ddpm_hf(value):
            self.register_to_config(**{name: ("diffusers", type(getattr(value, "_orig_mod", value)).__name__)})

    def to_json_string(self) -> str:
        """model_index.json: stock ``DDPMPipeline``, or the remote-code file where stock would sample wrongly."""
        index = json.loads(super().to_json_string())
        index["_class_name"] = [HUB_PIPELINE_MODULE, HUB_PIPELINE_CLASS] if stock_divergences(self.scheduler) else "DDPMPipeline"
        return json.dumps(index, indent=2, sort_keys=True) + "\n"

    def save_config(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs):
        """Write model_index.json and, when it names it, the remote-code pipeline file beside it."""
        hub_file = os.path.join(save_directory, f"{HUB_PIPELINE_MODULE}.py")
        reasons = stock_divergences(self.scheduler)
        if reasons:
            os.makedirs(save_directory, exist_ok=True)
            with open(hub_file, "w", encoding="utf-8") as f:
                f.write(HUB_PIPELINE_SOURCE)
            diffusers.utils.logging.get_logger(__name__).warning(
                "Stock diffusers would sample this scheduler differently (%s); the saved pipeline needs "
                "trust_remote_code=True and ddpm_hf to load.", "; ".join(reasons))
        elif os.path.isfile(hub_file):
            os.remove(hub_file)
        super().save_config(save_directory, push_to_hub=push_to_hub, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs):
        """diffusers' ``save_pretrained`` (model_index.json via ``to_json_string``/``save_config`` above).

        A ``pathlib.Path`` is accepted also with ``push_to_hub=True`` (diffusers 0.42.1 calls ``str.split`` on it).
        """
        super().save_pretrained(os.fspath(save_directory), *args, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "DDPMPipeline":
        """Load a DDPM/DDIM pipeline folder or Hub repo (saved by ddpm_hf or stock diffusers) with ddpm_hf's classes.

        Args:
            pretrained_model_name_or_path: a local folder or a Hub repo id.
            kwargs: ``unet``/``scheduler`` (use these instead of loading), ``torch_dtype``, ``variant``,
                ``use_safetensors``, and for Hub repos ``revision``, ``cache_dir``, ``token``,
                ``local_files_only``, ``force_download``.

        Returns:
            A ``DDPMPipeline`` whose ``UNet2DModel`` and ``DDPMScheduler``/``DDIMScheduler`` are ddpm_hf's.
        """
        unet, scheduler = kwargs.pop("unet", None), kwargs.pop("scheduler", None)
        model_kwargs = {k: kwargs.pop(k) for k in ("torch_dtype", "variant", "use_safetensors") if k in kwargs}
        hub_kwargs = {k: kwargs.pop(k) for k in ("revision", "cache_dir", "token", "local_files_only", "force_download")
                      if k in kwargs}
        if kwargs:
            raise TypeError(f"DDPMPipeline.from_pretrained got unexpected arguments {sorted(kwargs)}; accepted: unet, "
                            "scheduler, torch_dtype, variant, use_safetensors, revision, cache_dir, token, "
                            "local_files_only, force_download")
        folder = str(pretrained_model_name_or_path)
        if not os.path.isdir(folder):
            from huggingface_hub import snapshot_download

            folder = snapshot_download(folder, allow_patterns=["model_index.json", "unet/*", "scheduler/*"], **hub_kwargs)
        index = cls.load_config(folder)
        if unet is None:
            if list(index.get("unet", [None, None]))[1] != "UNet2DModel":
                raise ValueError(f"model_index.json names unet {index.get('unet')}; DDPMPipeline loads UNet2DModel")
            unet = UNet2DModel.from_pretrained(folder, subfolder="unet", **model_kwargs)
        if scheduler is None:
            scheduler = _load_scheduler(folder, list(index.get("scheduler", [None, None])))
        pipe = cls(unet=unet, scheduler=scheduler)
        pipe.register_to_config(_name_or_path=str(pretrained_model_name_or_path))
        return pipe

    # ---- shared pieces -----------------------------------------------------------------------------------------------

    def _image_size(self) -> tuple[int, int]:
        size = self.unet.config.sample_size
        if size is None:
            raise ValueError("unet.config.sample_size is None; the pipeline needs it to know the image size")
        return (size, size) if isinstance(size, int) else tuple(size)

    def _sample_shape(self, batch_size: int) -> tuple[int, ...]:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        return (batch_size, self.unet.config.in_channels, *self._image_size())

    def _images(self, images: ImageInput, name: str) -> torch.Tensor:
        """User images in [0, 1] -> float32 batch in [0, 1] on the execution device."""
        x = images_to_tensor(images, name, self.unet.config.in_channels, self._image_size())
        return x.to(self._execution_device)

    def _to_model(self, images01: torch.Tensor) -> torch.Tensor:
        return (images01 * 2 - 1).to(self.unet.dtype)

    def _noise(self, shape: tuple[int, ...], generator: Generator) -> torch.Tensor:
        return randn_tensor(shape, generator=generator, device=self._execution_device, dtype=self.unet.dtype)

    def _model_fn(self, channels: int | None = None) -> Callable[[torch.Tensor, Any], torch.Tensor]:
        """``(x, t) -> unet output``, optionally keeping only the first ``channels`` (drops learned variance)."""

        def model_fn(sample: torch.Tensor, timestep: Any) -> torch.Tensor:
            output = self.unet(sample, timestep, return_dict=False)[0]
            return output if channels is None else output[:, :channels]

        return model_fn

    def _ddim_scheduler(self) -> SchedulerMixin:
        """ddpm_hf's DDIM on this pipeline's noise schedule, unclipped: the deterministic ODE of DDIM sec. 4.3."""
        accepted = inspect.signature(DDIMScheduler.__init__).parameters
        config = {k: v for k, v in self.scheduler.config.items() if k in accepted}
        return DDIMScheduler.from_config({**config, "clip_sample": False, "thresholding": False})

    @staticmethod
    def _set_timesteps(scheduler: SchedulerMixin, num_inference_steps: int | None, timesteps: list[int] | None) -> torch.Tensor:
        if timesteps is not None:
            if num_inference_steps is not None:
                raise ValueError("pass either num_inference_steps or timesteps, not both")
            if "timesteps" not in inspect.signature(scheduler.set_timesteps).parameters:
                raise ValueError(f"timesteps needs a scheduler that accepts custom timesteps; "
                                 f"{type(scheduler).__name__}.set_timesteps does not")
            scheduler.set_timesteps(timesteps=_int_list(timesteps))
            return scheduler.timesteps
        if num_inference_steps is None:
            ddim_like = "eta" in inspect.signature(scheduler.step).parameters
            num_inference_steps = min(50, scheduler.config.num_train_timesteps) if ddim_like else \
                scheduler.config.num_train_timesteps
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
        scheduler.set_timesteps(num_inference_steps)
        return scheduler.timesteps

    @staticmethod
    def _step_kwargs(scheduler: SchedulerMixin, eta: float, use_clipped_model_output: bool | None,
                     generator: Generator) -> dict[str, Any]:
        """Keyword arguments for ``scheduler.step``, as diffusers' DDPM and DDIM pipelines pass them."""
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be a float in [0, 1] (0 = DDIM, 1 = DDPM-like), got {eta!r}")
        params = inspect.signature(scheduler.step).parameters
        kwargs: dict[str, Any] = {"generator": generator} if "generator" in params else {}
        if "eta" in params:
            kwargs["eta"] = eta
        elif eta != 0:
            raise ValueError(f"eta={eta} needs a scheduler whose step takes eta (DDIMScheduler), "
                             f"not {type(scheduler).__name__}")
        if use_clipped_model_output is not None:
            if "use_clipped_model_output" not in params:
                raise ValueError(f"use_clipped_model_output needs a DDIMScheduler, not {type(scheduler).__name__}")
            kwargs["use_clipped_model_output"] = use_clipped_model_output
        return kwargs

    def _denoise(self, scheduler: SchedulerMixin, sample: torch.Tensor, timesteps: torch.Tensor,
                 step_kwargs: dict[str, Any], callback: Callable | None = None,
                 tensor_inputs: tuple[str, ...] = (), channels: int | None = None) -> torch.Tensor:
        """The sampling loop: one network call and one scheduler step per timestep, no other per-step work."""
        model_fn = self._model_fn(channels)
        model_timesteps = timesteps.to(sample.device)  # one transfer, not one per step inside the unet
        with torch.inference_mode():
            for i, t in enumerate(self.progress_bar(timesteps)):
                model_output = model_fn(sample, model_timesteps[i])
                sample = scheduler.step(model_output, t, sample, **step_kwargs, return_dict=False)[0]
                if callback is not None:
                    callback_kwargs = {"latents": sample} if "latents" in tensor_inputs else {}
                    sample = callback(self, i, t, callback_kwargs).pop("latents", sample)
        return sample.clone()  # outside inference mode: callers get an ordinary tensor

    def _output(self, sample: torch.Tensor, output_type: str, return_dict: bool, known: tuple | None = None):
        """Model-space samples -> images in [0, 1]; ``known = (images01, mask)`` pastes known pixels back exactly."""
        images = (sample / 2 + 0.5).clamp(0, 1)
        if known is not None:
            images = torch.where(known[1].bool(), known[0], images.float())
        if output_type != "pt":
            images = images.float().cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    @staticmethod
    def _check_output_type(output_type: str) -> None:
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")

    # ---- sampling ------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: Generator = None,
        num_inference_steps: int | None = None,
        timesteps: list[int] | None = None,
        eta: float = 0.0,
        use_clipped_model_output: bool | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
    ) -> ImagePipelineOutput | tuple:
        r"""Generate images.

        Args:
            batch_size: number of images.
            generator: a ``torch.Generator`` or one per image (per-image reproducibility).
            num_inference_steps: denoising steps; defaults to ``num_train_timesteps`` (1000) for DDPM, 50 for DDIM.
            timesteps: a custom descending timestep list (schedulers whose ``set_timesteps`` takes one).
            eta: DDIM's eta (0 deterministic, 1 DDPM-like); only for schedulers whose ``step`` takes it.
            use_clipped_model_output: passed to DDIM's ``step`` when not None.
            latents: starting noise ``(batch_size, C, H, W)``; drawn from ``generator`` when None.
            output_type: ``"pil"``, ``"np"`` (NHWC floats in [0, 1]) or ``"pt"`` (NCHW tensor in [0, 1]).
            return_dict: return an ``ImagePipelineOutput`` rather than a tuple.
            callback_on_step_end: ``fn(pipeline, step_index, timestep, callback_kwargs) -> dict`` run after
                each step; a returned ``"latents"`` replaces the current sample.
            callback_on_step_end_tensor_inputs: tensors passed in ``callback_kwargs`` (only ``"latents"``).

        Returns:
            ``ImagePipelineOutput`` with ``images``, or ``(images,)``.
        """
        self._check_output_type(output_type)
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        unknown = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs must be a subset of {self._callback_tensor_inputs}, "
                             f"got {sorted(unknown)}")
        shape = self._sample_shape(batch_size)
        check_generator(generator, batch_size)
        step_kwargs = self._step_kwargs(self.scheduler, eta, use_clipped_model_output, generator)
        if latents is None:
            latents = self._noise(shape, generator)
        else:
            check_latents(latents, shape)
            latents = latents.to(self._execution_device, self.unet.dtype)
        ts = self._set_timesteps(self.scheduler, num_inference_steps, timesteps)
        sample = self._denoise(self.scheduler, latents, ts, step_kwargs, callback_on_step_end,
                               tuple(callback_on_step_end_tensor_inputs))
        return self._output(sample, output_type, return_dict)

    # ---- DDIM inversion and interpolation ----------------------------------------------------------------------------

    @torch.no_grad()
    def invert(self, images: ImageInput, num_inference_steps: int = 50) -> torch.Tensor:
        """Deterministic DDIM inversion x_0 -> x_T (DDIM sec. 4.3 / eq. 13; diffusers issues 4120, 5703).

        ``decode(invert(images, n), n)`` reconstructs the images, better as n grows.

        Args:
            images: images in [0, 1] (PIL, numpy NHWC or torch NCHW, as the pipeline outputs them).
            num_inference_steps: number of DDIM steps.

        Returns:
            Latents ``(N, C, H, W)`` in the unet's dtype on the execution device.
        """
        x0 = self._to_model(self._images(images, "images"))
        ddim = self._ddim_scheduler()
        self._set_timesteps(ddim, num_inference_steps, None)
        with torch.inference_mode():
            latents = ddim_invert(self._model_fn(x0.shape[1]), ddim, x0, self.progress_bar)
        return latents.clone()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, num_inference_steps: int = 50, output_type: str = "pil",
               return_dict: bool = True) -> ImagePipelineOutput | tuple:
        """Decode latents x_T with deterministic DDIM (eta = 0, no clipping): the inverse of ``invert``.

        Args:
            latents: ``(N, C, H, W)`` latents.
            num_inference_steps: number of DDIM steps (use the count given to ``invert``).
            output_type, return_dict: as in ``__call__``.
        """
        self._check_output_type(output_type)
        if not torch.is_tensor(latents) or latents.ndim != 4:
            raise ValueError("latents must be a 4-d (N, C, H, W) torch.Tensor")
        check_latents(latents, self._sample_shape(latents.shape[0]))
        ddim = self._ddim_scheduler()
        ts = self._set_timesteps(ddim, num_inference_steps, None)
        latents = latents.to(self._execution_device, self.unet.dtype)
        sample = self._denoise(ddim, latents, ts, {"eta": 0.0}, channels=latents.shape[1])
        return self._output(sample, output_type, return_dict)

    @torch.no_grad()
    def interpolate(self, a: ImageInput, b: ImageInput, num_points: int = 5, num_inference_steps: int = 50,
                    input_type: str = "latents", output_type: str = "pil",
                    return_dict: bool = True) -> ImagePipelineOutput | tuple:
        """Slerp between two x_T latents and decode each point with DDIM (DDIM App. D.5).

        Args:
            a, b: two latents ``(C, H, W)`` or ``(1, C, H, W)`` (``input_type="latents"``), or two images in
                [0, 1] (``input_type="images"``), which are DDIM-inverted first.
            num_points: number of images from a to b inclusive (>= 2).
            num_inference_steps: DDIM steps for inversion and decoding.
            input_type: ``"latents"`` or ``"images"``.
            output_type, return_dict: as in ``__call__``.
        """
        if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 2:
            raise ValueError(f"num_points must be an int >= 2, got {num_points!r}")
        if input_type == "images":
            ends = [self.invert(x, num_inference_steps) for x in (a, b)]
            if any(x.shape[0] != 1 for x in ends):
                raise ValueError("interpolate takes one image for a and one for b")
        elif input_type == "latents":
            ends = [x[None] if torch.is_tensor(x) and x.ndim == 3 else x for x in (a, b)]
            for name, x in zip("ab", ends):
                check_latents(x, self._sample_shape(1), name)
        else:
            raise ValueError(f"input_type must be 'latents' or 'images', got {input_type!r}")
        weights = torch.linspace(0, 1, num_points, dtype=torch.float64)
        a_lat, b_lat = (x[0].to(self._execution_device) for x in ends)
        latents = slerp(a_lat, b_lat, weights)
        return self.decode(latents, num_inference_steps, output_type, return_dict)

    # ---- SDEdit and RePaint ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def img2img(self, image: ImageInput, strength: float = 0.8, num_inference_steps: int | None = None,
                generator: Generator = None, eta: float = 0.0, output_type: str = "pil",
                return_dict: bool = True) -> ImagePipelineOutput | tuple:
        """SDEdit (Meng et al. 2022): noise the images to t ~ strength * T with q(x_t | x_0), then denoise.

        Args:
            image: images in [0, 1] (PIL, numpy NHWC or torch NCHW).
            strength: in (0, 1]; the fraction of the sampling schedule that is run (1 starts from almost pure noise).
            num_inference_steps: steps of the full schedule (defaults as in ``__call__``); about
                ``strength * num_inference_steps`` of them run.
            generator, eta, output_type, return_dict: as in ``__call__``.
        """
        self._check_output_type(output_type)
        x0 = self._to_model(self._images(image, "image"))
        check_generator(generator, x0.shape[0])
        step_kwargs = self._step_kwargs(self.scheduler, eta, None, generator)
        ts = sdedit_timesteps(self._set_timesteps(self.scheduler, num_inference_steps, None), strength)
        noise = self._noise(tuple(x0.shape), generator)
        sample = self.scheduler.add_noise(x0, noise, ts[:1].repeat(x0.shape[0]).to(x0.device))
        sample = self._denoise(self.scheduler, sample, ts, step_kwargs)
        return self._output(sample, output_type, return_dict)

    def _alpha_table(self, scheduler: SchedulerMixin, timesteps: torch.Tensor) -> torch.Tensor:
        """float64 bar(alpha) at each visited timestep, then at the clean end (the scheduler's final value)."""
        alphas = scheduler.alphas_cumprod.double().cpu()[timesteps.long().cpu()]
        final = torch.as_tensor(getattr(scheduler, "final_alpha_cumprod", 1.0), dtype=torch.float64).reshape(1)
        return torch.cat([alphas, final.cpu()])

    @torch.no_grad()
    def inpaint(self, image: ImageInput, mask: ImageInput, num_inference_steps: int | None = None,
                jump_length: int = 10, jump_n_sample: int = 10, generator: Generator = None, eta: float = 0.0,
                output_type: str = "pil", return_dict: bool = True) -> ImagePipelineOutput | tuple:
        """RePaint inpainting (Lugmayr et al. 2022) with resampling jumps; known pixels are returned unchanged.

        Each reverse step merges the model's sample (unknown pixels) with q(x_t | x_0) of the image (known
        pixels, eq. 8); every ``jump_length`` steps the sample is re-noised ``jump_length`` steps back, and each
        stretch is denoised ``jump_n_sample`` times in all (sec. 4.2). Costs about
        ``num_inference_steps * jump_n_sample`` network calls.

        Args:
            image: images in [0, 1] (PIL, numpy NHWC or torch NCHW).
            mask: 1 where a pixel is known (kept), 0 where it is filled in; ``(H, W)``, ``(1, H, W)``,
                ``(N, 1, H, W)`` or a PIL image; binarised at 0.5 (diffusers' ``RePaintPipeline`` convention).
            num_inference_steps: steps of the sampling schedule (default ``min(250, num_train_timesteps)`` as in
                the paper).
            jump_length, jump_n_sample: the resampling schedule (paper: 10 and 10).
            generator, eta, output_type, return_dict: as in ``__call__``.
        """
        self._check_output_type(output_type)
        known01 = self._images(image, "image")
        x0 = self._to_model(known01)
        batch = x0.shape[0]
        mask = mask_to_tensor(mask, batch, self._image_size()).to(x0.device, x0.dtype)
        check_generator(generator, batch)
        step_kwargs = self._step_kwargs(self.scheduler, eta, None, generator)
        if num_inference_steps is None:
            num_inference_steps = min(250, self.scheduler.config.num_train_timesteps)
        ts = self._set_timesteps(self.scheduler, num_inference_steps, None)
        moves = repaint_moves(len(ts), jump_length, jump_n_sample)
        alphas = self._alpha_table(self.scheduler, ts)
        model_fn = self._model_fn()
        sample = self._noise(tuple(x0.shape), generator)
        with torch.inference_mode():
            for p, q in self.progress_bar(moves):
                noise = self._noise(tuple(x0.shape), generator)
                if q < p:
                    sample = renoise(sample, noise, alphas[q], alphas[p])
                    continue
                output = model_fn(sample, ts[p].to(x0.device))
                sample = self.scheduler.step(output, ts[p], sample, **step_kwargs, return_dict=False)[0]
                sample = mask * q_sample(x0, noise, alphas[q]) + (1 - mask) * sample
        return self._output(sample.clone(), output_type, return_dict, known=(known01, mask))

    # ---- likelihood ------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def log_likelihood(self, images: ImageInput, generator: Generator = None,
                       clip_denoised: bool = False) -> LikelihoodOutput:
        """The DDPM variational bound per image (eq. 5, sec. 3.3) in bits per dimension and as log p lower bound.

        Images are quantised to 8 bits first (the discretised decoder is defined on that grid). Costs
        ``num_train_timesteps`` network calls on the whole batch.

        Args:
            images: images in [0, 1] (PIL, numpy NHWC or torch NCHW).
            generator: for the noise of each x_t (one draw per timestep); a list gives one per image.
            clip_denoised: clip the predicted x_0 to [-1, 1] in the model mean.

        Returns:
            A ``LikelihoodOutput`` (``bits_per_dim``, ``log_likelihood``, ``prior_bpd``, ``terms_bpd``).
        """
        images01 = self._images(images, "images")
        check_generator(generator, images01.shape[0])
        x0 = self._to_model(torch.round(images01.double() * 255) / 255)  # the exact 8-bit grid, in float64
        with torch.inference_mode():
            out = variational_bound(self._model_fn(), x0, self.scheduler.config, generator=generator,
                                    clip_denoised=clip_denoised, progress=self.progress_bar)
        return LikelihoodOutput(**{k: v.clone() for k, v in out.items()})
