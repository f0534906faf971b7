"""The scheduler registry: which class a saved folder's scheduler name loads, and the contract of any scheduler.

The pipeline asks a scheduler through ``contract_for(scheduler)`` (``contract.SchedulerContract``): its default
step count, its table, the keywords its ``step`` takes, whether stock diffusers samples its config identically.
ddpm_hf's schedulers implement the contract themselves; any diffusers scheduler gets a
``DiffusersSchedulerAdapter``.

Adding a scheduler is one new file plus one registry line:

1. Write it in a new module of this package as a diffusers ``SchedulerMixin``/``ConfigMixin`` that implements
   ``SchedulerContract`` (``stock_class_name``, ``default_num_inference_steps``, ``set_inference_timesteps``,
   ``step_kwargs``, ``scale_model_input``, ``stock_divergences``; ``scheduling_ddim.py`` is the model).
2. Add its line to ``SCHEDULERS`` below, keyed by the class name a saved folder records (its diffusers
   counterpart's name when it has one, so that stock diffusers loads the folder).

A diffusers scheduler needs neither: the adapter serves it (give it a default step count in
``adapters.DEFAULT_STEPS`` if 50 is wrong for it).
"""

from __future__ import annotations

import inspect

import diffusers
from diffusers import SchedulerMixin

from .adapters import DiffusersSchedulerAdapter
from .contract import SchedulerContract
from .scheduling_ddim import DDIMScheduler
from .scheduling_ddpm import DDPMScheduler

# model_index.json scheduler name -> ddpm_hf's class. Everything else loads as diffusers' class of that name.
SCHEDULERS: dict[str, type[SchedulerMixin]] = {
    "DDPMScheduler": DDPMScheduler,
    "DDIMScheduler": DDIMScheduler,
}

# Variance types whose network predicts a variance in its second ``in_channels`` output channels (Nichol & Dhariwal
# 2021, sec. 3.1); only DDPM's ancestral step reads it.
LEARNED_VARIANCE_TYPES = ("learned", "learned_range")


def contract_for(scheduler: SchedulerMixin) -> SchedulerContract:
    """The contract of ``scheduler``: the scheduler itself if it implements it, else a new adapter over it.

    Args:
        scheduler: a ddpm_hf or diffusers scheduler.

    Returns:
        An object with the ``SchedulerContract`` methods; an adapter holds no state of its own (the scheduler's
        is the sampling state), so building one per call is cheap and any two agree.
    """
    if isinstance(scheduler, SchedulerContract):
        return scheduler
    return DiffusersSchedulerAdapter(scheduler)


def scheduler_class(name: str) -> type[SchedulerMixin]:
    """The class to load a scheduler that a saved folder names ``name``: ours where registered, else diffusers'.

    Raises:
        ValueError: naming ``name`` when it is neither.
    """
    if isinstance(name, str) and name in SCHEDULERS:
        return SCHEDULERS[name]
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if isinstance(cls, type) and issubclass(cls, SchedulerMixin):
        return cls
    raise ValueError(f"scheduler class {name!r} is neither one of ddpm_hf's ({', '.join(SCHEDULERS)}) nor a "
                     "diffusers scheduler")


def to_ddpm_hf_scheduler(scheduler: SchedulerMixin) -> SchedulerMixin:
    """diffusers' own class of a registered name -> ddpm_hf's class built from the same config; else unchanged.

    Args:
        scheduler: any scheduler (e.g. what stock ``from_pretrained`` built).

    Returns:
        ddpm_hf's ``DDPMScheduler``/``DDIMScheduler`` for diffusers' ones, otherwise ``scheduler`` itself.
    """
    name = type(scheduler).__name__
    if name in SCHEDULERS and type(scheduler) is getattr(diffusers, name, None):
        return SCHEDULERS[name].from_config(scheduler.config)
    return scheduler


def deterministic_ddim(scheduler: SchedulerMixin) -> DDIMScheduler:
    """ddpm_hf's DDIM on ``scheduler``'s noise schedule without clipping or thresholding.

    This is the deterministic ODE of DDIM sec. 4.3 that inversion and decoding integrate both ways; the config
    keys ``DDIMScheduler`` takes are kept (schedule, prediction type, spacing, ``set_alpha_to_one``).

    Args:
        scheduler: any scheduler with a diffusers config.

    Returns:
        A new ``DDIMScheduler``.
    """
    accepted = inspect.signature(DDIMScheduler.__init__).parameters
    config = {k: v for k, v in scheduler.config.items() if k in accepted}
    return DDIMScheduler.from_config({**config, "clip_sample": False, "thresholding": False})


def reads_model_variance(scheduler: SchedulerMixin) -> bool:
    """Whether the scheduler's ``step`` takes the network's learned variance channels (``out_channels = 2C``).

    DDPM's ancestral step (ddpm_hf's and diffusers') splits a 2C output when ``variance_type`` is ``learned`` or
    ``learned_range``; DDIM and the ODE solvers use only the mean (eps/x0/v) channels, and a DDIM built from a
    learned-variance DDPM config keeps the key without reading it, so the pipeline must drop those channels.

    Args:
        scheduler: a ddpm_hf or diffusers scheduler.

    Returns:
        True iff the step wants all 2C channels.
    """
    return (contract_for(scheduler).stock_class_name == "DDPMScheduler"
            and scheduler.config.get("variance_type") in LEARNED_VARIANCE_TYPES)
