"""What DDPMScheduler and DDIMScheduler share: config validation, the float64 schedule, the timestep table,
x_0 prediction with clipping/thresholding, and the forward process (``add_noise``, ``get_velocity``).

Per-step work is kept on the host side cheap: ``set_timesteps`` builds the table once, per-step coefficients are
computed in float64 by ``ddpm_hf.diffusion_math`` over the whole table and kept as Python floats, and a step
finds its table index without reading the timestep's value from the device when it is one of ``self.timesteps``.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin

from .. import diffusion_math as dm
from ..timestep_spacing import TIMESTEP_SPACINGS, check_custom_timesteps, make_timesteps
from ..validation import check_bool, check_choice, check_int, check_real, is_bool, is_int
from .contract import Generator, build_step_kwargs, inference_arguments
from .public_tables import public_tables
from .stock_equivalence import stock_divergences


def check_step_inputs(model_output: Any, sample: Any, generator: Any, variance_noise: Any = None) -> None:
    """Raise TypeError/ValueError naming the ``step`` argument that is not what the step can use.

    ``model_output`` may differ from ``sample`` only in its channel count (learned variances stack 2C channels).
    """
    for name, value in (("model_output", model_output), ("sample", sample)):
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point torch.Tensor, got {type(value).__name__}"
                            + (f" of dtype {value.dtype}" if isinstance(value, torch.Tensor) else ""))
    if model_output.ndim != sample.ndim or model_output.ndim < 2 or (
        model_output.shape[:1] + model_output.shape[2:] != sample.shape[:1] + sample.shape[2:]
    ):
        raise ValueError(f"model_output shape {tuple(model_output.shape)} does not match sample shape "
                         f"{tuple(sample.shape)} (only the channel dimension may differ)")
    if isinstance(generator, list):
        if len(generator) != sample.shape[0] or not all(isinstance(g, torch.Generator) for g in generator):
            raise ValueError(f"generator as a list needs one torch.Generator per sample ({sample.shape[0]}), got "
                             f"{len(generator)} item(s)")
    elif generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be None, a torch.Generator or a list of them, got {type(generator).__name__}")
    if variance_noise is not None and (not isinstance(variance_noise, torch.Tensor) or
                                       variance_noise.shape != model_output.shape):
        raise ValueError(f"variance_noise must be a torch.Tensor of shape {tuple(model_output.shape)}, got "
                         f"{getattr(variance_noise, 'shape', type(variance_noise).__name__)}")


# Far beyond any published schedule (improved DDPM: 4000); larger tables only exhaust memory.
MAX_TRAIN_TIMESTEPS = 1_000_000


def check_trained_betas(value: Any) -> None:
    """Raise TypeError unless ``value`` is None or a 1-d sequence/array/tensor of numbers (ranges: make_betas)."""
    if value is None:
        return
    message = f"trained_betas must be None or a 1-d sequence of floats in (0, 1), got {value!r:.80}"
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray, torch.Tensor)):
        raise TypeError(message)
    try:
        array = np.asarray(value.detach().cpu() if torch.is_tensor(value) else value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(message) from err
    if array.ndim != 1:
        raise TypeError(message)


def check_schedule(alphas_cumprod: torch.Tensor, zero_terminal_snr: bool) -> None:
    """Reject schedules that make the steps divide by zero or overflow float32 (found by tests/test_fuzz_*).

    bar(alpha)_0 == 1 (a beta that rounds away next to 1) makes the t = 0 posterior variance 0/0; a bar(alpha)
    below float32's smallest normal number makes the x_0 coefficient 1/sqrt(bar(alpha)) overflow a float32 sample.
    The zero-terminal-SNR rescale's bar(alpha)_{T-1} = 0 is deliberate and handled at step time instead.
    """
    if not alphas_cumprod[0] < 1:
        raise ValueError(
            f"beta_start / trained_betas[0] is too small: 1 - beta_0 rounds to 1 in float64, so bar(alpha)_0 = 1 and "
            "the last sampling step divides 0 by 0; use a first beta >= 1e-15"
        )
    checked = alphas_cumprod[:-1] if zero_terminal_snr else alphas_cumprod
    smallest = checked.min().item() if checked.numel() else 1.0
    if smallest < torch.finfo(torch.float32).tiny:
        raise ValueError(
            f"this schedule drives bar(alpha) down to {smallest:.3g}, below float32's smallest normal number, so "
            "x_0 cannot be recovered from x_t; use fewer num_train_timesteps or a smaller beta_end (the linear "
            "schedule is not rescaled with num_train_timesteps, as in diffusers)"
        )


class TableScheduler(SchedulerMixin, ConfigMixin):
    """Base of the two schedulers: a float64 schedule plus a descending table of timesteps to visit.

    Public state, as in diffusers: ``betas``, ``alphas``, ``alphas_cumprod``, ``final_alpha_cumprod`` (the
    bar(alpha) a step to "before t = 0" lands on) and ``one``, float32 on CPU exactly as diffusers builds them and
    never moved; ``timesteps`` (int64), ``num_inference_steps``, ``custom_timesteps``, ``init_noise_sigma``. Our
    maths reads only the float64 ``noise_schedule`` and ``final_alpha_cumprod_float64``.
    """

    stock_class_name: str  # the diffusers class a saved folder records; set by each subclass

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    def _init_schedule(self, final_alpha_is_one: bool) -> None:
        """Validate the shared config keys and build the float64 schedule and the full default table."""
        cfg = self.config
        check_int("num_train_timesteps", cfg.num_train_timesteps, 1)
        if cfg.num_train_timesteps > MAX_TRAIN_TIMESTEPS:
            raise ValueError(f"num_train_timesteps must be an int in [1, {MAX_TRAIN_TIMESTEPS}], "
                             f"got {cfg.num_train_timesteps}")
        check_trained_betas(cfg.trained_betas)
        check_choice("beta_schedule", cfg.beta_schedule, dm.BETA_SCHEDULES)
        for name in ("beta_start", "beta_end"):
            check_real(name, getattr(cfg, name), 0.0, 1.0, high_open=True)
        check_choice("prediction_type", cfg.prediction_type, dm.PREDICTION_TYPES)
        check_choice("timestep_spacing", cfg.timestep_spacing, TIMESTEP_SPACINGS)
        for name in ("clip_sample", "thresholding", "rescale_betas_zero_snr"):
            check_bool(name, getattr(cfg, name))
        check_real("dynamic_thresholding_ratio", cfg.dynamic_thresholding_ratio, 0.0, 1.0)
        check_real("clip_sample_range", cfg.clip_sample_range, 0.0, math.inf, high_open=True)
        check_real("sample_max_value", cfg.sample_max_value, 0.0, math.inf, high_open=True)
        check_int("steps_offset", cfg.steps_offset, 0)

        # One float64 schedule for all our maths; the public tables are diffusers' float32 ones (public_tables.py).
        self._noise_schedule = dm.NoiseSchedule.from_config(cfg)
        alphas_cumprod = self._noise_schedule.alphas_cumprod
        check_schedule(alphas_cumprod, cfg.rescale_betas_zero_snr)
        final = 1.0 if final_alpha_is_one else alphas_cumprod[0].item()
        self._final_alpha_cumprod = torch.tensor(final, dtype=torch.float64)
        for name, table in public_tables(self.stock_class_name, cfg, self._noise_schedule,
                                         self._final_alpha_cumprod).items():
            setattr(self, name, table)
        self.init_noise_sigma = 1.0
        self._alphas_cumprod_by_device: dict[torch.device, torch.Tensor] = {}
        self.num_inference_steps: int | None = None
        self.custom_timesteps = False
        self._set_table(list(range(cfg.num_train_timesteps - 1, -1, -1)), None)

    @property
    def noise_schedule(self) -> dm.NoiseSchedule:
        """The float64 schedule (betas and bar(alpha)) every computation of this scheduler uses."""
        return self._noise_schedule

    @property
    def final_alpha_cumprod_float64(self) -> torch.Tensor:
        """float64 bar(alpha) "before t = 0": 1.0, or bar(alpha)_0 for DDIM with ``set_alpha_to_one=False``."""
        return self._final_alpha_cumprod

    # ---- timestep table -----------------------------------------------------------------------------------------

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: Sequence[int] | None = None,
    ) -> None:
        """Choose the timesteps to visit (run before sampling).

        Args:
            num_inference_steps: number of steps, in ``[1, num_train_timesteps]``, spaced by the config's
                ``timestep_spacing``. Mutually exclusive with ``timesteps``.
            device: where ``self.timesteps`` lives (it stays on CPU when ``None``).
            timesteps: a custom strictly descending list of training timesteps in ``[0, num_train_timesteps)``.
        """
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps (an int) or timesteps (a descending list)")
        cfg = self.config
        if timesteps is not None:
            table = check_custom_timesteps(timesteps, cfg.num_train_timesteps)
        else:
            table = make_timesteps(cfg.timestep_spacing, cfg.num_train_timesteps, num_inference_steps, cfg.steps_offset)
        self.custom_timesteps = timesteps is not None
        self.num_inference_steps = len(table)
        self._set_table(table, device)

    def _set_table(self, table: list[int], device: str | torch.device | None) -> None:
        self.timesteps = torch.tensor(table, dtype=torch.int64, device=device)
        self._table = table
        self._prev_table = table[1:] + [-1]
        self._index_of = {t: i for i, t in enumerate(table)}
        self._coefficients: dict[Any, list] = {}

    def _alpha_pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """float64 bar(alpha) at each table entry and at the entry visited next (the final alpha after the last)."""
        t = torch.tensor(self._table)
        prev = torch.tensor(self._prev_table)
        alphas_cumprod = self._noise_schedule.alphas_cumprod
        a_prev = torch.where(prev >= 0, alphas_cumprod[prev.clamp(min=0)], self._final_alpha_cumprod)
        return alphas_cumprod[t], a_prev

    def _step_index(self, timestep: int | torch.Tensor) -> int:
        """Position of ``timestep`` in the table; no device read when it is a view of ``self.timesteps``."""
        if isinstance(timestep, torch.Tensor):
            if timestep.numel() != 1:
                raise ValueError(f"timestep must be a single int, got a tensor of shape {tuple(timestep.shape)}")
            table = self.timesteps
            # Iterating over self.timesteps yields views into its storage: the offset is the index.
            if timestep.dtype == table.dtype and timestep.device == table.device and (
                timestep.untyped_storage().data_ptr() == table.untyped_storage().data_ptr()
            ):
                return timestep.storage_offset() - table.storage_offset()
        value = timestep.item() if isinstance(timestep, torch.Tensor) else timestep
        if is_bool(value) or not (
            is_int(value) or (isinstance(value, float) and value.is_integer())
        ):
            raise TypeError(f"timestep must be an int (an entry of scheduler.timesteps), got {timestep!r}")
        index = self._index_of.get(int(value))
        if index is None:
            raise ValueError(
                f"timestep {int(timestep)} is not in scheduler.timesteps; call set_timesteps and step through "
                f"those values (current table starts {self._table[:5]})"
            )
        return index

    def previous_timestep(self, timestep: int | torch.Tensor) -> torch.Tensor:
        """The timestep visited after ``timestep`` in the table, or -1 after the last one."""
        return torch.tensor(self._prev_table[self._step_index(timestep)], device=self.timesteps.device)

    def _check_finite(self, name: str, values: Sequence[torch.Tensor]) -> None:
        if not all(torch.isfinite(v).all() for v in values):
            t = self.config.num_train_timesteps - 1
            raise ValueError(
                f"{name} is not finite on this timestep table: with rescale_betas_zero_snr=True, bar(alpha) at "
                f"t={t} is 0 and prediction_type='{self.config.prediction_type}' cannot recover x_0 there "
                "(diffusers issue 3851). Use prediction_type 'v_prediction' or 'sample', or a table without "
                f"t={t} (timestep_spacing='leading' or custom timesteps)."
            )

    # ---- the scheduler contract (contract.py) --------------------------------------------------------------------

    _STEP_KEYWORDS: frozenset[str] = frozenset()  # the optional keywords this class's step takes; set by subclasses

    def default_num_inference_steps(self) -> int:
        """The step count used when the caller gives none (set by each subclass)."""
        raise NotImplementedError

    def set_inference_timesteps(
        self,
        num_inference_steps: int | None = None,
        timesteps: Sequence[int] | None = None,
        device: str | torch.device | None = None,
    ) -> torch.Tensor:
        """``set_timesteps`` with the pipeline's argument checks and this scheduler's default step count.

        Args:
            num_inference_steps: a positive int, or None for ``default_num_inference_steps()``.
            timesteps: a custom descending list instead of ``num_inference_steps``.
            device: where the table lives.

        Returns:
            ``self.timesteps``.
        """
        steps, custom = inference_arguments(num_inference_steps, timesteps, self.default_num_inference_steps(),
                                            True, type(self).__name__)
        self.set_timesteps(steps, device=device, timesteps=custom)
        return self.timesteps

    def step_kwargs(self, *, eta: float = 0.0, use_clipped_model_output: bool | None = None,
                    generator: Generator = None) -> dict[str, Any]:
        """The validated keyword arguments for ``step`` (see ``contract.build_step_kwargs``)."""
        return build_step_kwargs(self._STEP_KEYWORDS, type(self).__name__, eta, use_clipped_model_output, generator)

    def stock_divergences(self) -> list[str]:
        """Why stock diffusers' ``stock_class_name`` would sample this config differently ([] if it would not).

        Decided by running stock diffusers on the config (``stock_equivalence.py``); cached per config.
        """
        return stock_divergences(self)

    # ---- x_0 and the forward process ----------------------------------------------------------------------------

    def _limit_x0(self, x0: torch.Tensor) -> torch.Tensor:
        """Dynamic thresholding or clipping of the predicted x_0 (thresholding wins when both are on, as in diffusers)."""
        cfg = self.config
        # Bounds past the dtype's range (valid config values) would make torch's clamp raise: cap them.
        largest = torch.finfo(x0.dtype if x0.is_floating_point() else torch.float32).max
        if cfg.thresholding:
            return dm.dynamic_threshold(x0, cfg.dynamic_thresholding_ratio, min(float(cfg.sample_max_value), largest))
        if cfg.clip_sample:
            bound = min(float(cfg.clip_sample_range), largest)
            return x0.clamp(-bound, bound)
        return x0

    def _alphas_cumprod_on(self, device: torch.device) -> torch.Tensor:
        """A cached copy of the float64 bar(alpha) on ``device`` (float32 on MPS, which lacks float64)."""
        if device not in self._alphas_cumprod_by_device:
            dtype = torch.float32 if device.type == "mps" else torch.float64
            table = self._noise_schedule.alphas_cumprod
            self._alphas_cumprod_by_device[device] = table.to(device=device, dtype=dtype)
        return self._alphas_cumprod_by_device[device]

    def _alpha_at(self, timesteps: int | torch.Tensor, device: torch.device) -> torch.Tensor:
        table = self._alphas_cumprod_on(device)
        return table[torch.as_tensor(timesteps, device=device).long()]

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor) -> torch.Tensor:
        """Forward process x_t = sqrt(bar(alpha)_t) x_0 + sqrt(1 - bar(alpha)_t) eps (DDPM eq. 4).

        Coefficients are computed in float64 per call and cast to the sample's dtype; no state is changed.

        Args:
            original_samples: clean samples x_0, shape ``(B, ...)``.
            noise: eps, same shape.
            timesteps: one int per sample (shape ``(B,)``) or a single int.

        Returns:
            x_t in ``original_samples``' dtype.
        """
        return dm.q_sample(original_samples, noise, self._alpha_at(timesteps, original_samples.device))

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor) -> torch.Tensor:
        """The v-prediction target v = sqrt(bar(alpha)_t) eps - sqrt(1 - bar(alpha)_t) x_0.

        Args:
            sample: clean samples x_0.
            noise: eps, same shape.
            timesteps: one int per sample or a single int.

        Returns:
            v in ``sample``'s dtype.
        """
        return dm.velocity(sample, noise, self._alpha_at(timesteps, sample.device))

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        """Identity: DDPM and DDIM feed x_t to the model unscaled (kept for scheduler interchangeability)."""
        return sample

    def __len__(self) -> int:
        return self.config.num_train_timesteps
