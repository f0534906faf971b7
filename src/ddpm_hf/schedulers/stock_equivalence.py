"""Whether stock diffusers samples a ddpm_hf scheduler's config identically, decided by running stock diffusers.

A saved folder names a diffusers class (``stock_class_name``), so stock ``from_pretrained`` builds that class from
the same config. Instead of a hand-kept list of keys whose stock behaviour differs, the decision is made here by
doing what stock would do and comparing:

1. Build the stock class from the config (``from_config``, as its loader does). An exception is a reason
   (e.g. ``NotImplementedError: sigmoid is not implemented for DDIMScheduler``).
2. Its noise schedule: stock's float32 bar(alpha) must match our float64 one to 1e-5.
3. Its timestep table for every step count N = 1 .. T (up to ``MAX_TABLE_COUNTS``, then T): equal lists, or both
   unusable (we refuse N, stock builds a t outside [0, T) that fails in ``step``).
4. Its step on fixed probe inputs, for the default step count and ``PROBE_STEP_COUNTS``, at every table entry
   (evenly thinned past ``MAX_PROBED_STEPS``, always with the first and last), with each keyword variant the class
   takes (DDIM: eta 0 and 1, with and without ``use_clipped_model_output``) and model outputs of 2C channels for
   learned variances. Outputs must agree to 1e-5 * max(1, |stock|); a NaN/inf or an exception on one side only
   is a reason; both failing (nothing to sample) is not.

The steps compare stock's step code, not float32 rounding: diffusers keeps its tables in float32, which moves
x_0 = (x_t - sqrt(1 - bar(alpha)) eps) / sqrt(bar(alpha)) by ~1e-4 near t = T in every config, the default
included. So the probes run in float64 with stock's tables replaced by our exact ones; the tables themselves
are checked in 2. Decisions are cached per (class, config): saving a pipeline asks for them.
"""

from __future__ import annotations

import functools
import inspect
import json
from typing import Any, Callable

import diffusers
import torch
from diffusers import SchedulerMixin

from .contract import config_json

PROBE_STEP_COUNTS = (7, 10, 50, 61)
MAX_TABLE_COUNTS = 1000
MAX_PROBED_STEPS = 256
TOLERANCE = 1e-5
_PROBE_SHAPE = (2, 2, 3, 3)


def stock_divergences(scheduler: SchedulerMixin) -> list[str]:
    """Why stock diffusers would sample ``scheduler``'s config differently from ``scheduler`` ([] if it would not).

    Args:
        scheduler: a ddpm_hf scheduler (with ``stock_class_name`` and ``noise_schedule``).

    Returns:
        One sentence per difference found, naming the step count, timestep and keyword arguments involved.
    """
    return list(_decide(type(scheduler), scheduler.stock_class_name, config_json(scheduler)))


@functools.lru_cache(maxsize=256)
def _decide(cls: type, stock_name: str, config_json: str) -> tuple[str, ...]:
    config = json.loads(config_json)
    stock_cls = getattr(diffusers, stock_name, None)
    if not (isinstance(stock_cls, type) and issubclass(stock_cls, SchedulerMixin)):
        return (f"{stock_name} has no diffusers counterpart",)
    accepted = inspect.signature(stock_cls.__init__).parameters
    reasons = [f"config key {k!r} is not an argument of diffusers' {stock_name}, which ignores it"
               for k in sorted(config) if k not in accepted]
    try:
        stock = stock_cls.from_config(config)
    except Exception as error:  # whatever stock raises, the folder would not load there
        return (*reasons, f"diffusers' {stock_name} refuses this config: {type(error).__name__}: {error}")
    ours = cls.from_config(config)
    reasons += _schedule_reasons(ours, stock)
    counts, table_reasons = _table_reasons(ours, stock)
    reasons += table_reasons
    _use_exact_tables(stock, ours)
    reasons += _step_reasons(ours, stock, counts)
    return tuple(reasons)


def _schedule_reasons(ours: Any, stock: Any) -> list[str]:
    theirs = torch.as_tensor(stock.alphas_cumprod).double()
    exact = ours.noise_schedule.alphas_cumprod
    if theirs.shape != exact.shape:
        return [f"diffusers builds {theirs.numel()} training timesteps, ddpm_hf {exact.numel()}"]
    error = (theirs - exact).abs().max().item()
    return [] if error <= TOLERANCE else [f"diffusers builds a different noise schedule (max |bar(alpha) difference| "
                                          f"{error:.3g})"]


def _table(scheduler: Any, count: int) -> tuple[list[int] | None, str]:
    try:
        scheduler.set_timesteps(count)
    except Exception as error:  # both sides: a refusal is an outcome to compare
        return None, f"{type(error).__name__}: {error}"
    return [int(t) for t in scheduler.timesteps.tolist()], ""


def _table_reasons(ours: Any, stock: Any) -> tuple[list[int], list[str]]:
    """Compare the tables for every step count; returns the counts whose tables agree and usable, and reasons."""
    num_train = ours.config.num_train_timesteps
    counts = sorted(set(range(1, min(num_train, MAX_TABLE_COUNTS) + 1)) | {num_train})
    agreeing, differing = [], []
    for count in counts:
        (mine, my_error), (theirs, their_error) = _table(ours, count), _table(stock, count)
        usable = theirs is not None and all(0 <= t < num_train for t in theirs)
        if mine is not None and mine == theirs:
            agreeing.append(count)
        elif mine is not None or usable:
            differing.append((count, mine or my_error, theirs if theirs is not None else their_error))
    if not differing:
        return agreeing, []
    count, mine, theirs = differing[0]
    return agreeing, [f"timestep tables differ for {len(differing)} of {len(counts)} step counts (N = "
                      f"{', '.join(str(d[0]) for d in differing[:5])}{', ...' if len(differing) > 5 else ''}); "
                      f"N = {count}: diffusers {_short(theirs)}, ddpm_hf {_short(mine)}"]


def _short(value: Any) -> str:
    if isinstance(value, list) and len(value) > 8:
        return f"[{', '.join(map(str, value[:3]))}, ..., {', '.join(map(str, value[-3:]))}] ({len(value)} entries)"
    return str(value)


def _use_exact_tables(stock: Any, ours: Any) -> None:
    """Replace stock's float32 tables by our float64 ones (same names), so the probes compare step code only."""
    schedule = ours.noise_schedule
    exact = {"betas": schedule.betas, "alphas": 1.0 - schedule.betas, "alphas_cumprod": schedule.alphas_cumprod,
             "final_alpha_cumprod": ours.final_alpha_cumprod_float64, "one": torch.tensor(1.0, dtype=torch.float64)}
    for name, table in exact.items():
        if hasattr(stock, name):
            setattr(stock, name, table.clone())


def _probe_kwargs(scheduler: Any) -> list[dict[str, Any]]:
    keywords = scheduler._STEP_KEYWORDS
    variants: list[dict[str, Any]] = [{}]
    if "eta" in keywords:
        variants = [{"eta": eta} for eta in (0.0, 1.0)]
    if "use_clipped_model_output" in keywords:
        variants += [{**v, "use_clipped_model_output": True} for v in variants]
    return variants


def _probe_indices(length: int) -> list[int]:
    if length <= MAX_PROBED_STEPS:
        return list(range(length))
    stride = (length - 1) / (MAX_PROBED_STEPS - 1)
    return sorted({round(i * stride) for i in range(MAX_PROBED_STEPS)})


def _step_reasons(ours: Any, stock: Any, agreeing: list[int]) -> list[str]:
    num_train = ours.config.num_train_timesteps
    wanted = {ours.default_num_inference_steps(), num_train, *PROBE_STEP_COUNTS}
    counts = sorted(c for c in wanted if c in set(agreeing))
    generator = torch.Generator().manual_seed(0)
    sample = 1.5 * torch.randn(_PROBE_SHAPE, generator=generator, dtype=torch.float64)
    channels = 2 if ours.config.get("variance_type") in ("learned", "learned_range") else 1
    output = torch.cat([torch.randn(_PROBE_SHAPE, generator=generator, dtype=torch.float64)] +
                       [2 * torch.rand(_PROBE_SHAPE, generator=generator, dtype=torch.float64) - 1] * (channels - 1),
                       dim=1)
    first: dict[str, tuple[int, str]] = {}
    differing: dict[str, list[int]] = {}
    for count in counts:
        ours.set_timesteps(count)
        stock.set_timesteps(count)
        for kwargs in _probe_kwargs(ours):
            reason = _first_difference(ours, stock, sample, output, kwargs)
            if reason:
                described = ", ".join(f"{k}={v}" for k, v in kwargs.items()) or "step"
                first.setdefault(described, (count, reason))
                differing.setdefault(described, []).append(count)
    return [f"{described}: differs for num_inference_steps in {tuple(differing[described])}; at N = {count} {reason}"
            for described, (count, reason) in first.items()]


def _outcome(step: Callable[[], Any]) -> tuple[torch.Tensor | None, str]:
    try:
        prev_sample = step()[0]
    except Exception as error:  # a refusal or crash is an outcome to compare
        return None, f"raises {type(error).__name__}: {error}"
    if not torch.isfinite(prev_sample).all():
        return None, "gives NaN/inf"
    return prev_sample, ""


def _first_difference(ours: Any, stock: Any, sample: torch.Tensor, output: torch.Tensor,
                      kwargs: dict[str, Any]) -> str:
    """The first probed table entry where the two steps disagree, described; "" if none does."""
    for index in _probe_indices(len(ours.timesteps)):
        t = ours.timesteps[index]

        def run(scheduler: Any) -> Callable[[], Any]:
            return lambda: scheduler.step(output, scheduler.timesteps[index], sample, return_dict=False,
                                          generator=torch.Generator().manual_seed(index), **kwargs)

        (mine, my_note), (theirs, their_note) = _outcome(run(ours)), _outcome(run(stock))
        if mine is None and theirs is None:
            continue
        if mine is None or theirs is None:
            return f"from t={int(t)} diffusers {their_note or 'samples'}, ddpm_hf {my_note or 'samples'}"
        error = ((mine - theirs).abs() / theirs.abs().clamp(min=1.0)).max().item()
        if error > TOLERANCE:
            return f"the step from t={int(t)} is {error:.3g} (relative) from diffusers'"
    return ""
