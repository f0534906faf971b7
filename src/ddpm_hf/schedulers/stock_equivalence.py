"""Whether stock diffusers samples a ddpm_hf scheduler's config identically, decided by running stock diffusers.

A saved folder names a diffusers class (``stock_class_name``), so stock ``from_pretrained`` builds that class from
the same config. Instead of a hand-kept list of keys whose stock behaviour differs, the decision is made here by
doing what stock would do and comparing:

1. Build the stock class from the config (``from_config``, as its loader does). An exception is a reason
   (e.g. ``NotImplementedError: sigmoid is not implemented for DDIMScheduler``).
2. Its noise schedule: stock's float32 bar(alpha) must match our float64 one to 1e-5.
3. Its timestep table for every step count N = 1 .. T (up to ``MAX_TABLE_COUNTS``, then T): equal lists, or both
   unusable (we refuse N, stock builds a t outside [0, T) that fails in ``step``).
4. Its step on fixed probe inputs: for the default step count, T and ``PROBE_STEP_COUNTS`` at every table entry
   (evenly thinned past ``MAX_PROBED_STEPS``, always with the first and last), and for the other step counts
   whose tables agree (all of them, or ``MAX_PROBED_STEPS`` evenly spread) at the first and last entry (where the noisiest step and the step onto clean data live:
   e.g. DDIM with ``steps_offset`` lands on bar(alpha)_0 instead of the final alpha only when T // N <=
   steps_offset). The keyword variants the class takes are probed (DDIM: eta 0 and 1, at the full probes also
   with ``use_clipped_model_output``), with model outputs of 2C channels for learned variances. Outputs must agree to 1e-5 * max(1, |stock|); a NaN/inf or an exception on one side only
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
                      f"{_counts([d[0] for d in differing])}); N = {count}: diffusers {_short(theirs)}, "
                      f"ddpm_hf {_short(mine)}"]


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


def _probe_kwargs(scheduler: Any, every_variant: bool) -> list[dict[str, Any]]:
    """The ``step`` keyword variants to probe: eta 0 and 1 where ``step`` takes eta, each also with
    ``use_clipped_model_output`` when ``every_variant`` (the boundary probes leave that one out, to stay cheap)."""
    keywords = scheduler._STEP_KEYWORDS
    variants: list[dict[str, Any]] = [{"eta": eta} for eta in (0.0, 1.0)] if "eta" in keywords else [{}]
    if every_variant and "use_clipped_model_output" in keywords:
        variants += [{**v, "use_clipped_model_output": True} for v in variants]
    return variants


def _probe_indices(length: int) -> list[int]:
    """All of ``range(length)``, or ``MAX_PROBED_STEPS`` of them evenly spread (first and last included)."""
    if length <= MAX_PROBED_STEPS:
        return list(range(length))
    stride = (length - 1) / (MAX_PROBED_STEPS - 1)
    return sorted({round(i * stride) for i in range(MAX_PROBED_STEPS)})


def _probe_inputs(ours: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A float64 x_t (|x| up to ~5, so clipping and thresholding act) and a model output (2C channels for learned
    variances, the extra ones in [-1, 1] as ``learned_range`` expects)."""
    generator = torch.Generator().manual_seed(0)
    sample = 1.5 * torch.randn(_PROBE_SHAPE, generator=generator, dtype=torch.float64)
    parts = [torch.randn(_PROBE_SHAPE, generator=generator, dtype=torch.float64)]
    if ours.config.get("variance_type") in ("learned", "learned_range"):
        parts.append(2 * torch.rand(_PROBE_SHAPE, generator=generator, dtype=torch.float64) - 1)
    return sample, torch.cat(parts, dim=1)


def _step_reasons(ours: Any, stock: Any, agreeing: list[int]) -> list[str]:
    """Step probes: every entry (thinned) at the default, T and ``PROBE_STEP_COUNTS``, and the first and last
    entry (the noisiest step and the one onto clean data) at the other step counts whose tables agree (thinned)."""
    full = {ours.default_num_inference_steps(), ours.config.num_train_timesteps, *PROBE_STEP_COUNTS}
    sample, output = _probe_inputs(ours)
    first: dict[str, tuple[int, str]] = {}
    differing: dict[str, list[int]] = {}
    probed = sorted(full.intersection(agreeing) | {agreeing[i] for i in _probe_indices(len(agreeing))})
    for count in probed:
        ours.set_timesteps(count)
        stock.set_timesteps(count)
        indices = _probe_indices(count) if count in full else sorted({0, count - 1})
        for kwargs in _probe_kwargs(ours, every_variant=count in full):
            reason = _first_difference(ours, stock, sample, output, kwargs, indices)
            if reason:
                described = ", ".join(f"{k}={v}" for k, v in kwargs.items()) or "step"
                first.setdefault(described, (count, reason))
                differing.setdefault(described, []).append(count)
    return [f"{described}: differs for {len(counts)} probed step counts (N = {_counts(counts)}); at N = {first[described][0]} "
            f"{first[described][1]}" for described, counts in differing.items()]


def _counts(counts: list[int]) -> str:
    return ", ".join(map(str, counts[:5])) + (", ..." if len(counts) > 5 else "")


def _outcome(step: Callable[[], Any]) -> tuple[torch.Tensor | None, str]:
    try:
        prev_sample = step()[0]
    except Exception as error:  # a refusal or crash is an outcome to compare
        return None, f"raises {type(error).__name__}: {error}"
    if not torch.isfinite(prev_sample).all():
        return None, "gives NaN/inf"
    return prev_sample, ""


def _first_difference(ours: Any, stock: Any, sample: torch.Tensor, output: torch.Tensor, kwargs: dict[str, Any],
                      indices: list[int]) -> str:
    """The first of the table ``indices`` where the two steps disagree, described; "" if none does."""
    for index in indices:
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
