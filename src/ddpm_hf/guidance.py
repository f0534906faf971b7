"""Class labels and classifier-free guidance for ``DDPMPipeline``.

A class-conditional ``UNet2DModel`` embeds ``num_class_embeds`` labels (``class_embed_type=None``). A model trained
for classifier-free guidance (Ho & Salimans 2022) has one more embedding than classes: the learned null class,
index K for K classes, the last one as in DiT (Peebles & Xie 2023). The pipeline knows the K class names from its
``id2label`` config; the model is *guidable* iff ``num_class_embeds == len(id2label) + 1``.

Guidance combines the conditional and the unconditional (null-class) noise predictions of one batched network call
(``DDPMPipeline._predict``):

    eps~ = eps(x_t, null) + w (eps(x_t, y) - eps(x_t, null))

which is Ho & Salimans 2022 eq. 6, (1 + w') eps(x_t, y) - w' eps(x_t), written with diffusers' ``guidance_scale``
w = 1 + w' (w = 1: the conditional model, w = 0: the unconditional one). ``guidance_rescale`` phi is Lin et al.
2023 sec. 3.4: the guided prediction is rescaled to the conditional one's standard deviation and blended back
with weight phi.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .diffusion_math import predict_eps, predict_x0, velocity

ClassLabels = int | str | Sequence[int | str] | torch.Tensor | None


# ---- what the unet's class embedding takes ---------------------------------------------------------------------------


def normalize_id2label(id2label: Mapping[Any, str] | None) -> dict[int, str] | None:
    """``id2label`` with int keys (JSON stores them as strings, as transformers' configs do), checked.

    Keys must be 0..K-1 (K >= 1) and the names distinct non-empty strings.

    Raises:
        ValueError/TypeError naming ``id2label``.
    """
    if id2label is None:
        return None
    if not isinstance(id2label, Mapping) or not id2label:
        raise TypeError(f"id2label must be a non-empty dict {{class index: name}}, got {id2label!r:.80}")
    try:
        out = {int(k): v for k, v in id2label.items()}
    except (TypeError, ValueError) as error:
        raise ValueError(f"id2label keys must be class indices (ints), got {list(id2label)!r:.80}") from error
    if sorted(out) != list(range(len(out))):
        raise ValueError(f"id2label keys must be 0..{len(out) - 1}, got {sorted(out)!r:.80}")
    names = list(out.values())
    if not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        raise ValueError(f"id2label names must be distinct non-empty strings, got {names!r:.80}")
    return dict(sorted(out.items()))


@dataclass(frozen=True)
class ClassConditioning:
    """How a unet takes ``class_labels``.

    Attributes:
        num_class_embeds: the unet's embedding count (None: no label embedding).
        id2label: the class names, or None (labels are then plain ints).
    """

    num_class_embeds: int | None
    id2label: dict[int, str] | None

    @classmethod
    def of(cls, unet_config: Mapping[str, Any], id2label: dict[int, str] | None) -> "ClassConditioning":
        """From the unet config and the pipeline's ``id2label``; labels only through ``num_class_embeds``
        embeddings (``class_embed_type=None``: other embedding types take other inputs, via ``model_kwargs``)."""
        num = unet_config.get("num_class_embeds")
        if unet_config.get("class_embed_type") is not None:
            num = None
        if id2label is not None and num is None:
            raise ValueError("id2label names classes but the unet is not class-conditional "
                             "(unet.config.num_class_embeds is None, or class_embed_type is set)")
        if id2label is not None and num not in (len(id2label), len(id2label) + 1):
            raise ValueError(f"id2label names {len(id2label)} classes but unet.config.num_class_embeds is {num}: "
                             f"it must be {len(id2label)} (conditional) or {len(id2label) + 1} (with the null class)")
        return cls(num, id2label)

    @property
    def guidable(self) -> bool:
        """Whether the unet has the null class of classifier-free guidance (``num_class_embeds == K + 1``)."""
        return self.id2label is not None and self.num_class_embeds == len(self.id2label) + 1

    @property
    def num_classes(self) -> int:
        """K, the labels a caller may ask for (the null class excluded)."""
        return len(self.id2label) if self.guidable else int(self.num_class_embeds or 0)

    @property
    def null_class(self) -> int | None:
        return self.num_classes if self.guidable else None


# ---- labels --------------------------------------------------------------------------------------------------------


def _label_index(value: Any, cond: ClassConditioning) -> int:
    if isinstance(value, str):
        names = {name: i for i, name in (cond.id2label or {}).items()}
        if value not in names:
            known = ", ".join(map(repr, names)) if names else "none (the pipeline has no id2label: pass ints)"
            raise ValueError(f"class_labels: unknown class name {value!r}; the classes are {known}")
        return names[value]
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"class_labels must be ints, class names or an integer tensor, got {value!r:.40}")
    if not 0 <= int(value) < cond.num_classes:
        raise ValueError(f"class_labels: label {int(value)} is out of range; this model has classes "
                         f"0..{cond.num_classes - 1}")
    return int(value)


def resolve_class_labels(class_labels: ClassLabels, batch: int, cond: ClassConditioning) -> torch.Tensor | None:
    """The caller's labels as a ``(batch,)`` int64 CPU tensor (None stays None).

    Args:
        class_labels: an int or a class name (one for all), a list of them, or an integer tensor (or numpy
            array) of shape ``()``, ``(1,)`` or ``(batch,)``.
        batch: the number of samples.
        cond: the unet's ``ClassConditioning``.

    Raises:
        ValueError naming ``class_labels``: an unconditional unet, an unknown name (listing the classes), a label
        out of range, a wrong length. TypeError: neither ints nor names.
    """
    if class_labels is None:
        return None
    if cond.num_class_embeds is None:
        raise ValueError("class_labels were given but the unet is not class-conditional "
                         "(unet.config.num_class_embeds is None)")
    if isinstance(class_labels, np.ndarray):
        class_labels = torch.from_numpy(class_labels)
    if torch.is_tensor(class_labels):
        if class_labels.is_floating_point() or class_labels.is_complex() or class_labels.ndim > 1:
            raise TypeError(f"class_labels as a tensor must be integer of shape () or (N,), got {class_labels.dtype} "
                            f"{tuple(class_labels.shape)}")
        class_labels = class_labels.reshape(-1).tolist()
    elif isinstance(class_labels, (str, numbers.Integral)):
        class_labels = [class_labels]
    if not isinstance(class_labels, (list, tuple)):
        raise TypeError(f"class_labels must be an int, a name, a list or a tensor, got {type(class_labels).__name__}")
    if len(class_labels) not in (1, batch):
        raise ValueError(f"class_labels has {len(class_labels)} labels for {batch} samples: pass one per sample or "
                         "one for all")
    labels = torch.tensor([_label_index(v, cond) for v in class_labels], dtype=torch.long)
    return labels.expand(batch).clone()


def end_labels(class_labels: ClassLabels) -> tuple[ClassLabels, ClassLabels]:
    """The labels of an interpolation's two ends: the first and last of per-point labels, else the one label."""
    per_point = isinstance(class_labels, (list, tuple)) or (torch.is_tensor(class_labels) and class_labels.ndim > 0)
    return (class_labels[:1], class_labels[-1:]) if per_point else (class_labels, class_labels)


# ---- the guidance maths ------------------------------------------------------------------------------------------


def cfg_combine(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """eps_uncond + w (eps_cond - eps_uncond): Ho & Salimans 2022 eq. 6 with w = 1 + the paper's w."""
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def rescale_guided(guided: torch.Tensor, cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Lin et al. 2023 sec. 3.4: x_rescaled = x_cfg std(x_pos) / std(x_cfg), x_final = phi x_rescaled + (1 - phi)
    x_cfg, with the standard deviations over each sample's pixels (x_pos: the conditional prediction)."""
    dims = tuple(range(1, guided.ndim))
    ratio = cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
    return phi * (guided * ratio) + (1 - phi) * guided


def alphas_cumprod_float64(scheduler: Any) -> torch.Tensor:
    """The scheduler's bar(alpha) table in float64 on the CPU: ddpm_hf's schedulers keep it as ``noise_schedule``
    (their public ``alphas_cumprod`` is float32, as in diffusers); diffusers' schedulers have only their float32
    table."""
    schedule = getattr(scheduler, "noise_schedule", None)
    table = schedule.alphas_cumprod if schedule is not None else scheduler.alphas_cumprod
    return table.double().cpu()


def alpha_at(alphas_cumprod: torch.Tensor, timestep: Any) -> torch.Tensor:
    """float64 bar(alpha) at a timestep, shape ``()`` or ``(N,)`` like ``timestep``.

    A fractional timestep (Euler/Heun with linspace spacing) gets what those schedulers feed the network there:
    sigma = sqrt((1 - a) / a) interpolated linearly in t (diffusers' ``np.interp`` over the sigma table), then
    a = 1 / (1 + sigma^2); at integer timesteps that is the table entry.
    """
    t = torch.as_tensor(timestep, dtype=torch.float64).cpu().clamp(0, len(alphas_cumprod) - 1)
    low = t.floor().long()
    high = (low + 1).clamp(max=len(alphas_cumprod) - 1)
    frac = t - low
    if not frac.any():
        return alphas_cumprod[low]
    sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()
    sigma = (1 - frac) * sigmas[low] + frac * sigmas[high]
    return 1 / (1 + sigma**2)


def guide_prediction(cond: torch.Tensor, uncond: torch.Tensor, sample: torch.Tensor, alpha_prod: torch.Tensor | None,
                     prediction_type: str, guidance_scale: float, guidance_rescale: float) -> torch.Tensor:
    """The guided mean prediction, in the network's parameterisation (eps, x_0 or v).

    The two predictions are converted to eps (``diffusion_math.predict_eps``, float64 bar(alpha) at t), combined
    (``cfg_combine``), rescaled (``rescale_guided``, when phi > 0) and converted back: x_0 = (x_t - sqrt(1 - a)
    eps) / sqrt(a) (DDPM eq. 4), v = sqrt(a) eps - sqrt(1 - a) x_0 (Salimans & Ho 2022, sec. 4). Without rescaling
    the combination is affine and the conversions are affine in the output at the same x_t, so it is applied to
    the outputs directly: the same value, exact even where a conversion divides by sqrt(a) = 0 (zero terminal SNR).

    Args:
        cond, uncond: the mean channels of the conditional and null-class outputs ``(N, C, H, W)``.
        sample: the network input x_t.
        alpha_prod: float64 bar(alpha) at t, ``()`` or ``(N,)``; needed only to rescale a non-eps prediction.
        prediction_type: ``"epsilon"``, ``"sample"`` or ``"v_prediction"``.
        guidance_scale: w.
        guidance_rescale: phi in [0, 1].
    """
    if guidance_rescale == 0 or prediction_type == "epsilon":
        guided = cfg_combine(cond, uncond, guidance_scale)
        return guided if guidance_rescale == 0 else rescale_guided(guided, cond, guidance_rescale)
    x_t = sample.double()
    eps_cond, eps_uncond = (predict_eps(p.double(), x_t, alpha_prod, prediction_type) for p in (cond, uncond))
    eps = rescale_guided(cfg_combine(eps_cond, eps_uncond, guidance_scale), eps_cond, guidance_rescale)
    x0 = predict_x0(eps, x_t, alpha_prod, "epsilon")
    out = x0 if prediction_type == "sample" else velocity(x0, eps, alpha_prod)
    return out.to(cond.dtype)


# ---- one plan per pipeline call ------------------------------------------------------------------------------------


@dataclass
class Guidance:
    """Classifier-free guidance for one pipeline call: what ``DDPMPipeline._predict`` needs for its batched pass.

    Attributes:
        labels: ``(N,)`` requested classes; null_labels: ``(N,)`` the null class; scale, rescale: w and phi;
        prediction_type: the scheduler's; alphas_cumprod: its float64 bar(alpha) table.
    """

    labels: torch.Tensor
    null_labels: torch.Tensor
    scale: float
    rescale: float
    prediction_type: str
    alphas_cumprod: torch.Tensor

    def __post_init__(self) -> None:
        self.batched_labels = torch.cat([self.labels, self.null_labels])  # [y; null], built once per call

    def batched_inputs(self, sample: torch.Tensor, timestep: Any, model_kwargs: dict[str, Any]) -> tuple:
        """``(sample, timestep, model_kwargs)`` for the one network call on [conditional; unconditional]: every
        per-sample tensor (batch-sized first dimension) is repeated, the labels are [y; null]."""
        n = len(sample)

        def twice(value: Any) -> Any:
            return torch.cat([value, value]) if torch.is_tensor(value) and value.ndim and len(value) == n else value

        kwargs = {k: twice(v) for k, v in model_kwargs.items()}
        return torch.cat([sample, sample]), twice(timestep), {**kwargs, "class_labels": self.batched_labels}

    def combine(self, output: torch.Tensor, sample: torch.Tensor, timestep: Any) -> torch.Tensor:
        """Guide the first C (mean) channels of the batched output; learned variance channels (2C outputs) are the
        conditional pass's."""
        cond, uncond = output.chunk(2)
        c = sample.shape[1]
        # bar(alpha) enters only when rescaling a non-eps prediction; no per-step lookup (a host sync on a GPU)
        # otherwise.
        needs_alpha = self.rescale != 0 and self.prediction_type != "epsilon"
        alpha = alpha_at(self.alphas_cumprod, timestep) if needs_alpha else None
        mean = guide_prediction(cond[:, :c], uncond[:, :c], sample, alpha, self.prediction_type, self.scale,
                                self.rescale)
        return mean if cond.shape[1] == c else torch.cat([mean, cond[:, c:]], dim=1)


def _check_scale(guidance_scale: Any, guidance_rescale: Any) -> None:
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real) or guidance_scale != guidance_scale:
        raise ValueError(f"guidance_scale must be a real number, got {guidance_scale!r}")
    if isinstance(guidance_rescale, bool) or not isinstance(guidance_rescale, numbers.Real) or not 0 <= guidance_rescale <= 1:
        raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale!r}")


def plan_conditioning(cond: ClassConditioning, class_labels: ClassLabels, batch: int, model_kwargs: dict[str, Any],
                      guidance_scale: float = 1.0, guidance_rescale: float = 0.0, *, prediction_type: str = "epsilon",
                      alphas_cumprod: torch.Tensor | None = None,
                      device: torch.device | str | None = None) -> tuple[dict[str, Any], Guidance | None]:
    """The network keywords and the guidance of one pipeline call.

    ``class_labels=None`` on a guidable model means the null class (unconditional sampling); on a conditional
    model without a null class it is an error. ``guidance_scale == 1`` is the conditional model in one pass (no
    ``Guidance``), and ``guidance_scale == 0`` without rescaling the null-class model in one pass; any scale but 1
    needs a guidable model.

    Args:
        cond: the unet's ``ClassConditioning``.
        class_labels: as ``resolve_class_labels`` takes them.
        batch: the number of samples.
        model_kwargs: the caller's checked ``model_kwargs`` (may hold ``class_labels`` itself, then
            ``class_labels`` must be None and no guidance asked).
        guidance_scale, guidance_rescale: w and phi.
        prediction_type, alphas_cumprod: the scheduler's (for converting x_0/v outputs to eps).
        device: where the labels of a single pass go (the batched pass moves its own).

    Returns:
        ``(model_kwargs, guidance or None)``; the keywords carry ``class_labels`` for a single pass.
    """
    _check_scale(guidance_scale, guidance_rescale)
    labels = resolve_class_labels(class_labels, batch, cond)
    if "class_labels" in model_kwargs:
        if labels is not None or guidance_scale != 1:
            raise ValueError("pass class labels either as class_labels or in model_kwargs, not both; guidance "
                             "needs class_labels")
        return model_kwargs, None
    if guidance_scale != 1 and not cond.guidable:
        why = ("the unet is not class-conditional" if cond.num_class_embeds is None else
               f"the unet has no null class (num_class_embeds={cond.num_class_embeds}, id2label "
               f"{'missing' if cond.id2label is None else f'names {len(cond.id2label)} classes'}; classifier-free "
               "guidance needs num_class_embeds = len(id2label) + 1)")
        raise ValueError(f"guidance_scale={guidance_scale} asks for classifier-free guidance but {why}")
    if labels is None and cond.num_class_embeds is not None:
        if not cond.guidable:
            raise ValueError(f"class_labels is required: the unet is class-conditional "
                             f"(num_class_embeds={cond.num_class_embeds}) without a null class")
        labels = torch.full((batch,), cond.null_class, dtype=torch.long)
    if labels is None:
        return model_kwargs, None
    null_only = guidance_scale == 0 and guidance_rescale == 0  # eq. 6 at w = 0: the null-class model alone
    if null_only:
        labels = torch.full((batch,), cond.null_class, dtype=torch.long)
    if guidance_scale == 1 or null_only or class_labels is None:  # (w = 1: rescaling by std(x_pos)/std(x_pos) = 1)
        return {**model_kwargs, "class_labels": labels.to(device)}, None  # the conditional or null model: one pass
    null = torch.full((batch,), cond.null_class, dtype=torch.long)
    return model_kwargs, Guidance(labels.to(device), null.to(device), float(guidance_scale), float(guidance_rescale),
                                  prediction_type, alphas_cumprod)
