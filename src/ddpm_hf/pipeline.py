"""``DDPMPipeline``: unconditional and class-conditional DDPM/DDIM sampling as a ``diffusers.DiffusionPipeline``.

Samples like ``diffusers.DDPMPipeline`` / ``DDIMPipeline`` (same noise draws, so the same images for the same
weights and generator) and adds what users ask diffusers for: DDIM inversion, latent interpolation, SDEdit
img2img, RePaint inpainting and the DDPM variational bound in bits per dimension, each with class labels and
classifier-free guidance (``ddpm_hf.guidance``).

This module is generation only. Saving and loading (what a folder names, the remote-code fallback) live in
``ddpm_hf.sharing``; what a scheduler takes and defaults to is asked of its contract
(``ddpm_hf.schedulers.registry``). Every network call goes through ``DDPMPipeline._predict`` with the caller's
``model_kwargs`` (the conditioning conduit); guidance's two passes are combined there, in one batched call.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, ModelMixin, SchedulerMixin
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils.torch_utils import randn_tensor

from .diffusion_math import q_sample
from .fast_path import check_network_dtype, compile_unet, sample_dtype
from .guidance import (
    ClassConditioning,
    ClassLabels,
    Guidance,
    alphas_cumprod_float64,
    end_labels,
    normalize_id2label,
    plan_conditioning,
)
from .editing import (
    ImageInput,
    check_generator,
    check_latents,
    check_model_kwargs,
    ddim_invert,
    images_to_tensor,
    mask_to_tensor,
    renoise,
    repaint_moves,
    sdedit_timesteps,
    slerp,
)
from .likelihood import LikelihoodOutput, variational_bound
from .schedulers.contract import SchedulerContract
from .schedulers.registry import contract_for, deterministic_ddim, reads_model_variance
from .sharing import SharingMixin
from .sharing import to_ddpm_hf_components  # noqa: F401  (pipeline_ddpm_hf.py files saved before sharing.py use it)

Generator = torch.Generator | list[torch.Generator] | None
OUTPUT_TYPES = ("pil", "np", "pt")
REPAINT_DEFAULT_STEPS = 250  # RePaint's schedule length (Lugmayr et al. 2022, sec. 5), capped at T


class DDPMPipeline(SharingMixin, DiffusionPipeline):
    r"""Image generation with DDPM (ancestral), DDIM or diffusers' solvers, class-conditional with classifier-free
    guidance where the unet has class embeddings, and image editing.

    Works with ddpm_hf's and diffusers' ``UNet2DModel`` and any scheduler the registry knows (ddpm_hf's
    ``DDPMScheduler``/``DDIMScheduler``, diffusers' schedulers through an adapter). Saved folders load in stock
    diffusers or are refused by it (``ddpm_hf.sharing``).

    Every method takes ``class_labels`` (``ddpm_hf.guidance``) and ``model_kwargs``: keyword arguments passed to
    every network call as ``unet(sample, timestep, **model_kwargs)``.

    Args:
        unet: the noise-prediction network.
        scheduler: the sampler.
        id2label: class index -> name of a class-conditional unet (saved in model_index.json with string keys, as
            transformers' configs save it); the unet takes classifier-free guidance iff its
            ``num_class_embeds == len(id2label) + 1`` (the null class is the last index).
    """

    model_cpu_offload_seq = "unet"
    _callback_tensor_inputs = ["latents"]

    def __init__(self, unet: ModelMixin, scheduler: SchedulerMixin, id2label: dict | None = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        id2label = normalize_id2label(id2label)
        if id2label is not None:  # a config entry, as StableDiffusionPipeline's requires_safety_checker: reloaded
            if unet is not None:
                ClassConditioning.of(unet.config, id2label)  # a class count that fits neither layout is refused here
            self.register_to_config(id2label={str(k): v for k, v in id2label.items()})

    @property
    def id2label(self) -> dict[int, str] | None:
        """Class index -> name (None for an unconditional model or plain-int labels)."""
        return normalize_id2label(self.config.get("id2label"))

    # ---- shared pieces -----------------------------------------------------------------------------------------------

    def _predict(self, sample: torch.Tensor, timestep: Any, model_kwargs: dict[str, Any],
                 channels: int | None = None, guidance: Guidance | None = None) -> torch.Tensor:
        """The one place the pipeline calls the network: ``unet(sample, timestep, **model_kwargs)``, or with
        ``guidance`` one call on the conditional and null-class halves, combined (``Guidance.combine``); keeps the
        first ``channels`` output channels if given (drops a learned variance). The network runs in its own dtype
        (bf16 on the fast path); its output comes back in the sample's, so the maths after it stays in fp32."""
        dtype = self.unet.dtype
        if guidance is None:
            output = self.unet(sample.to(dtype), timestep, **model_kwargs, return_dict=False)[0].to(sample.dtype)
        else:
            both, timesteps, kwargs = guidance.batched_inputs(sample.to(dtype), timestep, model_kwargs)
            output = self.unet(both, timesteps, **kwargs, return_dict=False)[0].to(sample.dtype)
            output = guidance.combine(output, sample, timestep)
        return output if channels is None else output[:, :channels]

    def _conditioning(self, class_labels: ClassLabels, batch: int, model_kwargs: dict[str, Any] | None,
                      guidance_scale: float = 1.0, guidance_rescale: float = 0.0,
                      scheduler: SchedulerMixin | None = None) -> tuple[dict[str, Any], Guidance | None]:
        """Checked ``model_kwargs`` with the labels of a single pass, and the guidance of a batched one."""
        scheduler = scheduler or self.scheduler
        check_network_dtype(self.unet.dtype, self._execution_device)  # every entry point passes here, once
        cond = ClassConditioning.of(self.unet.config, self.id2label)
        alphas = alphas_cumprod_float64(scheduler) if guidance_scale != 1 else None
        return plan_conditioning(cond, class_labels, batch, check_model_kwargs(model_kwargs), guidance_scale,
                                 guidance_rescale, prediction_type=scheduler.config.get("prediction_type", "epsilon"),
                                 alphas_cumprod=alphas, device=self._execution_device)

    def _step_channels(self, scheduler: SchedulerMixin) -> int | None:
        """Output channels the scheduler's step takes: all (None) where it reads a learned variance, else C."""
        return None if reads_model_variance(scheduler) else self.unet.config.in_channels

    def _image_size(self) -> tuple[int, int]:
        size = self.unet.config.sample_size
        if size is None:
            raise ValueError("unet.config.sample_size is None; the pipeline needs it to know the image size")
        return (size, size) if isinstance(size, int) else tuple(size)

    def _sample_shape(self, batch_size: int) -> tuple[int, ...]:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        shape = (batch_size, self.unet.config.in_channels, *self._image_size())
        if math.prod(shape) >= 2**63:  # torch cannot even describe such a tensor
            raise ValueError(f"batch_size={batch_size} asks for a tensor of {math.prod(shape)} elements")
        return shape

    def _images(self, images: ImageInput, name: str) -> torch.Tensor:
        """User images in [0, 1] -> float32 batch in [0, 1] on the execution device."""
        x = images_to_tensor(images, name, self.unet.config.in_channels, self._image_size())
        return x.to(self._execution_device)

    @property
    def sample_dtype(self) -> torch.dtype:
        """dtype of x_t, the noise and the scheduler maths: float32 for a bf16/fp16 unet (``ddpm_hf.fast_path``)."""
        return sample_dtype(self.unet.dtype)

    def compile_unet(self, batch_size: int, mode: str | None = None, freezing: bool = True,
                     backend: str | Callable = "inductor") -> float:
        """``torch.compile`` the unet in place and return the one-off compile seconds (``fast_path.compile_unet``)."""
        return compile_unet(self, batch_size, mode, freezing, backend)

    def _to_model(self, images01: torch.Tensor) -> torch.Tensor:
        return (images01 * 2 - 1).to(self.sample_dtype)

    def _noise(self, shape: tuple[int, ...], generator: Generator) -> torch.Tensor:
        return randn_tensor(shape, generator=generator, device=self._execution_device, dtype=self.sample_dtype)

    def _denoise(self, contract: SchedulerContract, sample: torch.Tensor, timesteps: torch.Tensor,
                 step_kwargs: dict[str, Any], model_kwargs: dict[str, Any], callback: Callable | None = None,
                 tensor_inputs: tuple[str, ...] = (), channels: int | None = None,
                 guidance: Guidance | None = None) -> torch.Tensor:
        """The sampling loop: one network call and one scheduler step per timestep, no other per-step work.

        ``contract.scale_model_input`` is the identity for DDPM/DDIM (Euler/Heun scale by their sigma).
        """
        with torch.inference_mode():
            # Inference tensors from the first step on (one transfer of the table, not one per step): a compiled
            # unet guards on dispatch keys, so an ordinary tensor in step 0 would recompile it twice.
            sample, model_timesteps = sample.clone(), timesteps.to(sample.device).clone()
            for i, t in enumerate(self.progress_bar(timesteps)):
                model_input = contract.scale_model_input(sample, t)
                model_output = self._predict(model_input, model_timesteps[i], model_kwargs, channels, guidance)
                sample = contract.step(model_output, t, sample, **step_kwargs, return_dict=False)[0]
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

    def _check_callback(self, callback: Any, tensor_inputs: list[str]) -> tuple[str, ...]:
        if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
            tensor_inputs = callback.tensor_inputs
        unknown = set(tensor_inputs) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs must be a subset of {self._callback_tensor_inputs}, "
                             f"got {sorted(unknown)}")
        return tuple(tensor_inputs)

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
        model_kwargs: dict[str, Any] | None = None,
        class_labels: ClassLabels = None,
        guidance_scale: float = 1.0,
        guidance_rescale: float = 0.0,
    ) -> ImagePipelineOutput | tuple:
        r"""Generate images, class-conditional with classifier-free guidance where the unet takes labels.

        Args:
            batch_size: number of images.
            generator: a ``torch.Generator`` or one per image (per-image reproducibility).
            num_inference_steps: denoising steps; defaults to the scheduler's (``num_train_timesteps`` for DDPM,
                ``min(50, num_train_timesteps)`` for DDIM and multistep solvers).
            timesteps: a custom descending timestep list (schedulers whose ``set_timesteps`` takes one).
            eta: DDIM's eta (0 deterministic, 1 DDPM-like); only for schedulers whose ``step`` takes it.
            use_clipped_model_output: passed to DDIM's ``step`` when not None.
            latents: starting noise ``(batch_size, C, H, W)``; drawn from ``generator`` when None.
            output_type: ``"pil"``, ``"np"`` (NHWC floats in [0, 1]) or ``"pt"`` (NCHW tensor in [0, 1]).
            return_dict: return an ``ImagePipelineOutput`` rather than a tuple.
            callback_on_step_end: ``fn(pipeline, step_index, timestep, callback_kwargs) -> dict`` run after
                each step; a returned ``"latents"`` replaces the current sample.
            callback_on_step_end_tensor_inputs: tensors passed in ``callback_kwargs`` (only ``"latents"``).
            model_kwargs: extra keyword arguments for every network call.
            class_labels: the classes to draw: an int or a name from ``id2label`` (one for all), a list of them or
                an integer tensor (one per image). None on a guidance-trained unet samples unconditionally (the
                null class); a conditional unet without a null class requires labels.
            guidance_scale: w in eps_uncond + w (eps_cond - eps_uncond) (Ho & Salimans 2022 eq. 6); 1 is the
                conditional model (one network pass), anything else needs a null class (two halves, one batched
                pass per step).
            guidance_rescale: phi of Lin et al. 2023 sec. 3.4, in [0, 1].

        Returns:
            ``ImagePipelineOutput`` with ``images``, or ``(images,)``.
        """
        self._check_output_type(output_type)
        tensor_inputs = self._check_callback(callback_on_step_end, callback_on_step_end_tensor_inputs)
        shape = self._sample_shape(batch_size)
        model_kwargs, guidance = self._conditioning(class_labels, batch_size, model_kwargs, guidance_scale,
                                                    guidance_rescale)
        check_generator(generator, batch_size)
        contract = contract_for(self.scheduler)
        step_kwargs = contract.step_kwargs(eta=eta, use_clipped_model_output=use_clipped_model_output,
                                           generator=generator)
        if latents is None:
            latents = self._noise(shape, generator)
        else:
            check_latents(latents, shape)
            latents = latents.to(self._execution_device, self.sample_dtype)
        ts = contract.set_inference_timesteps(num_inference_steps, timesteps)
        latents = latents * contract.init_noise_sigma  # 1 for DDPM/DDIM (Euler/Heun start at sigma_max)
        sample = self._denoise(contract, latents, ts, step_kwargs, model_kwargs, callback_on_step_end,
                               tensor_inputs, self._step_channels(self.scheduler), guidance)
        return self._output(sample, output_type, return_dict)

    # ---- DDIM inversion and interpolation ----------------------------------------------------------------------------

    @torch.no_grad()
    def invert(self, images: ImageInput, num_inference_steps: int = 50, model_kwargs: dict[str, Any] | None = None,
               class_labels: ClassLabels = None, guidance_scale: float = 1.0,
               guidance_rescale: float = 0.0) -> torch.Tensor:
        """Deterministic DDIM inversion x_0 -> x_T (DDIM sec. 4.3 / eq. 13; diffusers issues 4120, 5703).

        ``decode(invert(images, n), n)`` reconstructs the images, better as n grows.

        Args:
            images: images in [0, 1] (PIL, numpy NHWC or torch NCHW, as the pipeline outputs them).
            num_inference_steps: number of DDIM steps.
            model_kwargs, class_labels, guidance_scale, guidance_rescale: as in ``__call__`` (decode with the same
                ones to reconstruct).

        Returns:
            Latents ``(N, C, H, W)`` in ``sample_dtype`` on the execution device.
        """
        x0 = self._to_model(self._images(images, "images"))
        ddim = deterministic_ddim(self.scheduler)
        model_kwargs, guidance = self._conditioning(class_labels, len(x0), model_kwargs, guidance_scale,
                                                    guidance_rescale, ddim)
        contract_for(ddim).set_inference_timesteps(num_inference_steps)
        channels = x0.shape[1]
        with torch.inference_mode():
            latents = ddim_invert(lambda x, t: self._predict(x, t, model_kwargs, channels, guidance), ddim, x0,
                                  self.progress_bar)
        return latents.clone()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, num_inference_steps: int = 50, output_type: str = "pil",
               return_dict: bool = True, model_kwargs: dict[str, Any] | None = None, class_labels: ClassLabels = None,
               guidance_scale: float = 1.0, guidance_rescale: float = 0.0) -> ImagePipelineOutput | tuple:
        """Decode latents x_T with deterministic DDIM (eta = 0, no clipping): the inverse of ``invert``.

        Args:
            latents: ``(N, C, H, W)`` latents.
            num_inference_steps: number of DDIM steps (use the count given to ``invert``).
            output_type, return_dict, model_kwargs, class_labels, guidance_scale, guidance_rescale: as in
                ``__call__``.
        """
        self._check_output_type(output_type)
        if not torch.is_tensor(latents) or latents.ndim != 4:
            raise ValueError("latents must be a 4-d (N, C, H, W) torch.Tensor")
        check_latents(latents, self._sample_shape(latents.shape[0]))
        ddim = deterministic_ddim(self.scheduler)
        model_kwargs, guidance = self._conditioning(class_labels, len(latents), model_kwargs, guidance_scale,
                                                    guidance_rescale, ddim)
        contract = contract_for(ddim)
        ts = contract.set_inference_timesteps(num_inference_steps)
        latents = latents.to(self._execution_device, self.sample_dtype)
        sample = self._denoise(contract, latents, ts, contract.step_kwargs(eta=0.0), model_kwargs,
                               channels=latents.shape[1], guidance=guidance)
        return self._output(sample, output_type, return_dict)

    @torch.no_grad()
    def interpolate(self, a: ImageInput, b: ImageInput, num_points: int = 5, num_inference_steps: int = 50,
                    input_type: str = "latents", output_type: str = "pil", return_dict: bool = True,
                    model_kwargs: dict[str, Any] | None = None, class_labels: ClassLabels = None,
                    guidance_scale: float = 1.0, guidance_rescale: float = 0.0) -> ImagePipelineOutput | tuple:
        """Slerp between two x_T latents and decode each point with DDIM (DDIM App. D.5).

        Args:
            a, b: two latents ``(C, H, W)`` or ``(1, C, H, W)`` (``input_type="latents"``), or two images in
                [0, 1] (``input_type="images"``), which are DDIM-inverted first.
            num_points: number of images from a to b inclusive (>= 2).
            num_inference_steps: DDIM steps for inversion and decoding.
            input_type: ``"latents"`` or ``"images"``.
            output_type, return_dict: as in ``__call__``.
            model_kwargs, guidance_scale, guidance_rescale: as in ``__call__``, for the inversions and the decoding.
            class_labels: one label for all points, or one per point (a is inverted with the first, b with the last).
        """
        if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 2:
            raise ValueError(f"num_points must be an int >= 2, got {num_points!r}")
        guide = (guidance_scale, guidance_rescale)
        self._conditioning(class_labels, num_points, model_kwargs, *guide)  # refuse bad labels before any work
        if input_type == "images":
            ends = [self.invert(x, num_inference_steps, model_kwargs, y, *guide)
                    for x, y in zip((a, b), end_labels(class_labels))]
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
        return self.decode(latents, num_inference_steps, output_type, return_dict, model_kwargs, class_labels, *guide)

    # ---- SDEdit and RePaint ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def img2img(self, image: ImageInput, strength: float = 0.8, num_inference_steps: int | None = None,
                generator: Generator = None, eta: float = 0.0, output_type: str = "pil", return_dict: bool = True,
                model_kwargs: dict[str, Any] | None = None, class_labels: ClassLabels = None,
                guidance_scale: float = 1.0, guidance_rescale: float = 0.0) -> ImagePipelineOutput | tuple:
        """SDEdit (Meng et al. 2022): noise the images to t ~ strength * T with q(x_t | x_0), then denoise.

        Args:
            image: images in [0, 1] (PIL, numpy NHWC or torch NCHW).
            strength: in (0, 1]; the fraction of the sampling schedule that is run (1 starts from almost pure noise).
            num_inference_steps: steps of the full schedule (defaults as in ``__call__``); about
                ``strength * num_inference_steps`` of them run.
            generator, eta, output_type, return_dict, model_kwargs, class_labels, guidance_scale, guidance_rescale:
                as in ``__call__`` (SDEdit towards a class: ``class_labels`` of the wanted class).
        """
        self._check_output_type(output_type)
        x0 = self._to_model(self._images(image, "image"))
        model_kwargs, guidance = self._conditioning(class_labels, len(x0), model_kwargs, guidance_scale,
                                                    guidance_rescale)
        check_generator(generator, x0.shape[0])
        contract = contract_for(self.scheduler)
        step_kwargs = contract.step_kwargs(eta=eta, generator=generator)
        ts = sdedit_timesteps(contract.set_inference_timesteps(num_inference_steps), strength)
        noise = self._noise(tuple(x0.shape), generator)
        sample = self.scheduler.add_noise(x0, noise, ts[:1].repeat(x0.shape[0]).to(x0.device))
        sample = self._denoise(contract, sample, ts, step_kwargs, model_kwargs,
                               channels=self._step_channels(self.scheduler), guidance=guidance)
        return self._output(sample, output_type, return_dict)

    @staticmethod
    def _alpha_table(scheduler: SchedulerMixin, timesteps: torch.Tensor) -> torch.Tensor:
        """float64 bar(alpha) at each visited timestep, then at the clean end (the scheduler's final value)."""
        alphas = alphas_cumprod_float64(scheduler)[timesteps.long().cpu()]
        final = torch.as_tensor(getattr(scheduler, "final_alpha_cumprod", 1.0), dtype=torch.float64).reshape(1)
        return torch.cat([alphas, final.cpu()])

    @torch.no_grad()
    def inpaint(self, image: ImageInput, mask: ImageInput, num_inference_steps: int | None = None,
                jump_length: int = 10, jump_n_sample: int = 10, generator: Generator = None, eta: float = 0.0,
                output_type: str = "pil", return_dict: bool = True, model_kwargs: dict[str, Any] | None = None,
                class_labels: ClassLabels = None, guidance_scale: float = 1.0,
                guidance_rescale: float = 0.0) -> ImagePipelineOutput | tuple:
        """RePaint inpainting (Lugmayr et al. 2022, Algorithm 1) with resampling jumps; known pixels are kept.

        Each reverse step merges the model's sample (unknown pixels) with q(x_t | x_0) of the image (known
        pixels, eq. 8); the walk re-noises ``jump_length`` steps back, one step at a time, ``jump_n_sample - 1``
        times at every ``jump_length``-th step from the clean end, as the paper's jump schedule does
        (``editing.repaint_moves``); the finished image is never re-noised. At the defaults (250 steps, 10, 10)
        that is 2,410 network calls.

        Args:
            image: images in [0, 1] (PIL, numpy NHWC or torch NCHW).
            mask: 1 where a pixel is known (kept), 0 where it is filled in; ``(H, W)``, ``(1, H, W)``,
                ``(N, 1, H, W)`` or a PIL image; binarised at 0.5 (diffusers' ``RePaintPipeline`` convention).
            num_inference_steps: steps of the sampling schedule (default ``min(250, num_train_timesteps)`` as in
                the paper).
            jump_length, jump_n_sample: the resampling schedule (paper: 10 and 10).
            generator, eta, output_type, return_dict, model_kwargs, class_labels, guidance_scale, guidance_rescale:
                as in ``__call__``.
        """
        self._check_output_type(output_type)
        known01 = self._images(image, "image")
        x0 = self._to_model(known01)
        model_kwargs, guidance = self._conditioning(class_labels, len(x0), model_kwargs, guidance_scale,
                                                    guidance_rescale)
        mask = mask_to_tensor(mask, x0.shape[0], self._image_size()).to(x0.device, x0.dtype)
        check_generator(generator, x0.shape[0])
        contract = contract_for(self.scheduler)
        step_kwargs = contract.step_kwargs(eta=eta, generator=generator)
        if num_inference_steps is None:
            num_inference_steps = min(REPAINT_DEFAULT_STEPS, self.scheduler.config.num_train_timesteps)
        ts = contract.set_inference_timesteps(num_inference_steps)
        moves = repaint_moves(len(ts), jump_length, jump_n_sample)
        sample = self._repaint(contract, x0, mask, ts, moves, step_kwargs, model_kwargs, generator, guidance)
        return self._output(sample, output_type, return_dict, known=(known01, mask))

    def _repaint(self, contract: SchedulerContract, x0: torch.Tensor, mask: torch.Tensor, ts: torch.Tensor,
                 moves: list[tuple[int, int]], step_kwargs: dict[str, Any], model_kwargs: dict[str, Any],
                 generator: Generator, guidance: Guidance | None) -> torch.Tensor:
        """Walk the RePaint moves over table positions (0 noisiest, ``len(ts)`` clean); one noise draw per move."""
        alphas = self._alpha_table(self.scheduler, ts)
        channels = self._step_channels(self.scheduler)
        sample = self._noise(tuple(x0.shape), generator)
        with torch.inference_mode():
            for p, q in self.progress_bar(moves):
                noise = self._noise(tuple(x0.shape), generator)
                if q < p:  # one step back up: q(x_{t_q} | x_{t_p}) on the merged sample (Algorithm 1, line 9)
                    sample = renoise(sample, noise, alphas[q], alphas[p])
                    continue
                output = self._predict(contract.scale_model_input(sample, ts[p]), ts[p].to(x0.device), model_kwargs,
                                       channels, guidance)
                sample = contract.step(output, ts[p], sample, **step_kwargs, return_dict=False)[0]
                sample = mask * q_sample(x0, noise, alphas[q]) + (1 - mask) * sample  # eq. 8 / lines 5-7
        return sample.clone()

    # ---- likelihood ------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def log_likelihood(self, images: ImageInput, generator: Generator = None, clip_denoised: bool = False,
                       model_kwargs: dict[str, Any] | None = None, class_labels: ClassLabels = None) -> LikelihoodOutput:
        """The DDPM variational bound per image (eq. 5, sec. 3.3) in bits per dimension and as log p lower bound;
        with ``class_labels`` the conditional bound on log p(x | y) (the null class, i.e. log p(x), on a
        guidance-trained unet without them). No guidance: the guided eps is not the score of a model density.

        Images are quantised to 8 bits first (the discretised decoder is defined on that grid). Costs
        ``num_train_timesteps`` network calls on the whole batch.

        Args:
            images: images in [0, 1] (PIL, numpy NHWC or torch NCHW).
            generator: for the noise of each x_t (one draw per timestep); a list gives one per image.
            clip_denoised: clip the predicted x_0 to [-1, 1] in the model mean.
            model_kwargs, class_labels: as in ``__call__``.

        Returns:
            A ``LikelihoodOutput`` (``bits_per_dim``, ``log_likelihood``, ``prior_bpd``, ``terms_bpd``).
        """
        images01 = self._images(images, "images")
        model_kwargs, _ = self._conditioning(class_labels, len(images01), model_kwargs)
        check_generator(generator, images01.shape[0])
        x0 = self._to_model(torch.round(images01.double() * 255) / 255)  # the exact 8-bit grid, in float64

        def model_fn(sample: torch.Tensor, timestep: Any, **kwargs: Any) -> torch.Tensor:
            return self._predict(sample, timestep, kwargs)

        with torch.inference_mode():
            out = variational_bound(model_fn, x0, self.scheduler.config, generator=generator,
                                    clip_denoised=clip_denoised, progress=self.progress_bar, model_kwargs=model_kwargs)
        return LikelihoodOutput(**{k: v.clone() for k, v in out.items()})
