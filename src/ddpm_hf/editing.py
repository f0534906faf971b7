"""Image editing with a pixel-space diffusion model: input checks, DDIM inversion, slerp, SDEdit and RePaint.

Small functions that ``DDPMPipeline``'s methods compose. All diffusion arithmetic goes through
``ddpm_hf.diffusion_math`` or the scheduler; this module only decides *which* step to take when.

References: Song et al. 2021, "Denoising Diffusion Implicit Models" (DDIM); Meng et al. 2022, "SDEdit";
Lugmayr et al. 2022, "RePaint: Inpainting using Denoising Diffusion Probabilistic Models".
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import numpy as np
import PIL.Image
import torch

from .diffusion_math import q_sample

ImageInput = PIL.Image.Image | Sequence[PIL.Image.Image] | np.ndarray | torch.Tensor
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ---- input conversion and validation ----------------------------------------------------------------------------


def _pil_to_array(images: Sequence[PIL.Image.Image], channels: int) -> np.ndarray:
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise ValueError(f"PIL images need a unet with 1 or 3 input channels, got in_channels={channels}")
    arrays = [np.asarray(im.convert(mode), dtype=np.float32) / 255.0 for im in images]
    return np.stack([a[..., None] if a.ndim == 2 else a for a in arrays])


def images_to_tensor(images: ImageInput, name: str, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """Check user images in [0, 1] and convert them to a float32 ``(N, C, H, W)`` batch.

    Accepts what the pipeline outputs, so outputs round-trip: a PIL image or a list of them, a numpy array
    ``(H, W, C)`` or ``(N, H, W, C)``, or a torch tensor ``(C, H, W)`` or ``(N, C, H, W)``.

    Args:
        images: the images.
        name: the argument name, for error messages.
        channels: the unet's ``in_channels``.
        size: the unet's ``(height, width)``.

    Returns:
        A float32 CPU tensor of shape ``(N, channels, *size)`` with values in [0, 1].
    """
    if isinstance(images, PIL.Image.Image):
        images = [images]
    if isinstance(images, (list, tuple)) and images and all(isinstance(im, PIL.Image.Image) for im in images):
        images = _pil_to_array(images, channels)
    given = tuple(getattr(images, "shape", ()))  # reported as the caller passed it, not as it is batched below
    if isinstance(images, np.ndarray):
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4:
            raise ValueError(f"{name} as a numpy array must be (H, W, C) or (N, H, W, C), got shape {images.shape}")
        images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    if not torch.is_tensor(images):
        raise TypeError(f"{name} must be a PIL image, a list of PIL images, a numpy array or a torch tensor, "
                        f"got {type(images).__name__}")
    if images.ndim == 3:
        images = images[None]
    expected = (channels, *size)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected or images.shape[0] == 0:
        raise ValueError(f"{name} must have shape (N, {', '.join(map(str, expected))}) or "
                         f"({', '.join(map(str, expected))}) (or the matching PIL/numpy layout), got {given}")
    if not images.is_floating_point():
        raise TypeError(f"{name} must hold floats in [0, 1] (as the pipeline outputs), got dtype {images.dtype}")
    images = images.detach().to("cpu", torch.float32)
    if not torch.isfinite(images).all() or images.min() < 0 or images.max() > 1:
        raise ValueError(f"{name} values must be finite and in [0, 1], got range "
                         f"[{images.min().item():.4g}, {images.max().item():.4g}]")
    return images


def mask_to_tensor(mask: ImageInput, batch: int, size: tuple[int, int]) -> torch.Tensor:
    """Binarise an inpainting mask (1 = known pixel to keep, 0 = pixel to fill) to ``(batch or 1, 1, H, W)``.

    Follows the RePaint paper's m and diffusers' ``RePaintPipeline``: values >= 0.5 are known. Accepts a PIL
    image (converted to grey), a numpy array or tensor of shape ``(H, W)``, ``(1, H, W)``, ``(N, 1, H, W)``.
    """
    if isinstance(mask, PIL.Image.Image):
        mask = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    if isinstance(mask, np.ndarray):
        mask = torch.from_numpy(np.ascontiguousarray(mask))
    if not torch.is_tensor(mask):
        raise TypeError(f"mask must be a PIL image, a numpy array or a torch tensor, got {type(mask).__name__}")
    mask = mask.detach().to("cpu", torch.float32)
    while mask.ndim < 4:
        mask = mask[None]
    if mask.ndim != 4 or mask.shape[1] != 1 or tuple(mask.shape[2:]) != size or mask.shape[0] not in (1, batch):
        raise ValueError(f"mask must have shape {size}, (1, {size[0]}, {size[1]}) or ({batch}, 1, {size[0]}, "
                         f"{size[1]}) to match the image batch, got {tuple(mask.shape)}")
    if not torch.isfinite(mask).all() or mask.min() < 0 or mask.max() > 1:
        raise ValueError("mask values must be in [0, 1] (1 = keep, 0 = inpaint)")
    return (mask >= 0.5).float()


def check_generator(generator: torch.Generator | list[torch.Generator] | None, batch: int) -> None:
    """``generator`` is None, a torch.Generator, or a list of exactly one generator per sample."""
    if isinstance(generator, list):
        if not all(isinstance(g, torch.Generator) for g in generator):
            raise TypeError("generator as a list must hold only torch.Generator objects")
        if len(generator) != batch:
            raise ValueError(f"generator is a list of {len(generator)} generators but the batch size is {batch}; "
                             "pass one generator per sample or a single generator")
    elif generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be None, a torch.Generator or a list of them, got {type(generator).__name__}")


def check_latents(latents: torch.Tensor, shape: tuple[int, ...], name: str = "latents") -> None:
    """Latents must be a floating tensor of exactly ``shape``."""
    if not torch.is_tensor(latents):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(latents).__name__}")
    if not latents.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {latents.dtype}")
    if tuple(latents.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(latents.shape)}")


RESERVED_MODEL_KWARGS = ("sample", "timestep", "return_dict")  # the pipeline passes these to the network itself


def check_model_kwargs(model_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """``model_kwargs`` is None or a dict of extra keyword arguments for the network (the conditioning conduit).

    Returns:
        The dict (a new empty one for None).
    """
    if model_kwargs is None:
        return {}
    if not isinstance(model_kwargs, dict) or not all(isinstance(k, str) for k in model_kwargs):
        raise TypeError("model_kwargs must be a dict of keyword arguments for the unet (e.g. {'class_labels': labels}), "
                        f"got {type(model_kwargs).__name__}")
    reserved = sorted(set(model_kwargs) & set(RESERVED_MODEL_KWARGS))
    if reserved:
        raise ValueError(f"model_kwargs must not contain {reserved}: the pipeline passes them to the unet itself")
    return dict(model_kwargs)


# ---- DDIM inversion and interpolation -----------------------------------------------------------------------------


def ddim_invert(model_fn: ModelFn, scheduler, x0: torch.Tensor, progress: Callable[[Iterable], Iterable]) -> torch.Tensor:
    """Run the deterministic DDIM ODE (DDIM eq. 12 with sigma = 0, read as eq. 13 forwards) from x_0 to x_T.

    Each step t -> t' re-uses the noise predicted at the current point (explicit Euler in the encoding direction).
    The first step starts from the clean image, for which the network is asked at the first visited timestep.

    Args:
        model_fn: ``(sample, timestep) -> model output`` of the denoiser.
        scheduler: a ddpm_hf ``DDIMScheduler`` whose ``set_timesteps`` has been called; its ``inverse_step``
            maps x at ``timestep`` to x at ``next_timestep`` (``timestep=-1`` is the clean image).
        x0: clean images in [-1, 1], in the model's dtype and device.
        progress: wraps the timestep iterator (the pipeline's progress bar).

    Returns:
        The latents x_T at the scheduler's first (noisiest) timestep.
    """
    ascending = scheduler.timesteps.flip(0)
    sample, current = x0, -1
    for t in progress(ascending):
        t = int(t)
        model_output = model_fn(sample, t if current < 0 else current)
        sample = scheduler.inverse_step(model_output, current, sample, t, return_dict=False)[0]
        current = t
    return sample


def slerp(a: torch.Tensor, b: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between two latents (DDIM App. D.5), in float64.

    Args:
        a, b: latents of the same shape ``(C, H, W)``.
        weights: interpolation weights in [0, 1], shape ``(K,)``; 0 gives ``a``, 1 gives ``b``.

    Returns:
        ``(K, C, H, W)`` latents in ``a``'s dtype. Falls back to linear interpolation when a and b are parallel.
    """
    a64, b64 = a.double().flatten(), b.double().flatten()
    w = weights.double().to(a64.device)[:, None]
    cos = torch.dot(a64, b64) / (a64.norm() * b64.norm())
    theta = torch.arccos(cos.clamp(-1.0, 1.0))
    if theta.abs() < 1e-6:
        out = (1 - w) * a64 + w * b64
    else:
        out = (torch.sin((1 - w) * theta) * a64 + torch.sin(w * theta) * b64) / torch.sin(theta)
    return out.reshape(-1, *a.shape).to(a.dtype)


# ---- SDEdit ---------------------------------------------------------------------------------------------------------


def sdedit_timesteps(timesteps: torch.Tensor, strength: float) -> torch.Tensor:
    """The tail of a sampling schedule that starts at about ``strength * T`` (SDEdit, sec. 3.2).

    Keeps the last ``int(len(timesteps) * strength)`` entries, as diffusers' img2img pipelines do.
    """
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
        raise ValueError(f"strength must be a float in (0, 1], got {strength!r}")
    keep = int(len(timesteps) * strength)
    if keep < 1:
        raise ValueError(f"strength={strength} with {len(timesteps)} inference steps leaves no step to run; "
                         "raise strength or num_inference_steps so that strength * num_inference_steps >= 1")
    return timesteps[len(timesteps) - keep:]


# ---- RePaint ----------------------------------------------------------------------------------------------------------


def repaint_moves(num_steps: int, jump_length: int, jump_n_sample: int) -> list[tuple[int, int]]:
    """The RePaint time walk (Lugmayr et al. 2022, Algorithm 1 with the jump schedule of sec. 4.2) as moves.

    Positions index the sampling table: 0 is the noisiest timestep, ``num_steps`` the clean image. A move
    ``(p, p + 1)`` is one reverse (denoising) step, ``(p, p - 1)`` one forward (re-noising) step. Counted from the
    clean end, the walk pauses at levels 0, ``jump_length``, 2 ``jump_length``, ... below
    ``num_steps - jump_length`` (level k is position ``num_steps - 1 - k``, the sample one denoising step before
    the finished image at k = 0); arriving there by a denoising step, it goes ``jump_length`` steps back up and
    down again, ``jump_n_sample - 1`` times. So the finished image is never re-noised (Algorithm 1 re-noises only
    for t > 1), the noisiest ``jump_length`` steps are not resampled, and a schedule of N steps costs
    ``N + len(range(0, N - jump_length, jump_length)) * (jump_n_sample - 1) * jump_length`` network calls (2,410
    at the paper's 250, 10, 10). This is the schedule of the authors' ``get_schedule_jump``, which
    ``diffusers.RePaintScheduler.set_timesteps`` also builds.

    Returns:
        The list of ``(from_position, to_position)`` moves, ending at ``num_steps``.
    """
    for name, value in (("num_inference_steps", num_steps), ("jump_length", jump_length),
                        ("jump_n_sample", jump_n_sample)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if jump_length > num_steps:
        raise ValueError(f"jump_length ({jump_length}) must not exceed num_inference_steps ({num_steps})")
    jumps_left = {num_steps - 1 - level: jump_n_sample - 1 for level in range(0, num_steps - jump_length, jump_length)}
    moves, p = [], 0
    while p < num_steps:
        moves.append((p, p + 1))
        p += 1
        if jumps_left.get(p, 0) > 0:
            jumps_left[p] -= 1
            moves.extend((q, q - 1) for q in range(p, p - jump_length, -1))
            p -= jump_length
    return moves


def renoise(sample: torch.Tensor, noise: torch.Tensor, alpha_prod_to: torch.Tensor, alpha_prod_from: torch.Tensor) -> torch.Tensor:
    """Sample q(x_to | x_from) for a later (noisier) timestep: the forward process from one table entry to the
    previous one (DDPM eq. 2 over the respaced step, whose bar(alpha) ratio is 1 - beta)."""
    return q_sample(sample, noise, alpha_prod_to / alpha_prod_from)

