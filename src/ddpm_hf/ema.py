"""Exponential moving average of model weights, update for update the schedule of diffusers' ``EMAModel``.

The decays, their clamps and the step counting equal ``diffusers.training_utils.EMAModel`` (diffusers 0.42)
exactly, with warmup on (``use_ema_warmup=True``) and off; tests/test_ema.py runs the two side by side. Two
deliberate differences: the shadows are float32 whatever the parameters' dtype (a bf16 shadow cannot absorb
updates of (1 - 0.999) times a weight change), and nothing here touches a model config: the EMA hyperparameters
live in the training arguments and the checkpoint, never in the exported ``config.json``.
"""

from __future__ import annotations

from typing import Iterable

import torch


def _check_number(name: str, value: object, low: float, low_inclusive: bool = False) -> float:
    if (not isinstance(value, (int, float)) or isinstance(value, bool)
            or not (value >= low if low_inclusive else value > low)):
        raise ValueError(f"ema {name} must be a number {'>=' if low_inclusive else '>'} {low}, got {value!r}")
    return float(value)


class EMA:
    """Shadow copies of parameters updated as shadow <- shadow - (1 - decay) * (shadow - param).

    Update n (counting from 1) uses, with k = max(0, n - update_after_step - 1):
    decay_n = 0 if k = 0 (the first counted update copies the weights), else
    clamp(1 - (1 + k / inv_gamma) ** -power if warmup else (1 + k) / (10 + k), min_decay, max_decay),
    which is ``EMAModel.get_decay``. A constant decay d from the second update on is ``min_decay = max_decay = d``.
    Parameters with ``requires_grad=False`` are copied, as in ``EMAModel.step``.

    Args:
        parameters: the parameters to track (their order defines the state).
        max_decay: the upper clamp of the decay (EMAModel's ``decay``), in (0, 1).
        warmup: the warmup schedule above (EMAModel's ``use_ema_warmup``); else the (1 + k) / (10 + k) ramp.
        inv_gamma: warmup time scale, > 0.
        power: warmup exponent, > 0 (2/3 suits ~1M-step runs, 3/4 shorter ones).
        min_decay: the lower clamp, in [0, max_decay].
        update_after_step: updates before this count keep decay 0 (copy the weights), an int >= 0.
    """

    def __init__(self, parameters: Iterable[torch.nn.Parameter], max_decay: float = 0.9999, warmup: bool = True,
                 inv_gamma: float = 1.0, power: float = 2 / 3, min_decay: float = 0.0, update_after_step: int = 0):
        self.max_decay = _check_number("max_decay", max_decay, 0.0)
        if not max_decay < 1:
            raise ValueError(f"ema max_decay must be < 1, got {max_decay!r}")
        self.min_decay = _check_number("min_decay", min_decay, 0.0, low_inclusive=True)
        if min_decay > max_decay:
            raise ValueError(f"ema min_decay ({min_decay!r}) must not exceed max_decay ({max_decay!r})")
        self.inv_gamma = _check_number("inv_gamma", inv_gamma, 0.0)
        self.power = _check_number("power", power, 0.0)
        if not isinstance(update_after_step, int) or isinstance(update_after_step, bool) or update_after_step < 0:
            raise ValueError(f"ema update_after_step must be an int >= 0, got {update_after_step!r}")
        self.update_after_step = update_after_step
        if not isinstance(warmup, bool):
            raise ValueError(f"ema warmup must be True or False, got {warmup!r}")
        self.warmup = warmup
        self.num_updates = 0
        self.shadow = [p.detach().clone().float() for p in parameters]

    def decay(self) -> float:
        """The decay the next update will use (``EMAModel.get_decay(optimization_step + 1)``)."""
        # EMAModel: k = optimization_step - update_after_step - 1 with optimization_step = num_updates + 1.
        k = max(0, self.num_updates - self.update_after_step)
        if k == 0:
            return 0.0
        if self.warmup:
            value = 1.0 - (1.0 + k / self.inv_gamma) ** -self.power
        else:
            value = (1.0 + k) / (10.0 + k)
        return max(min(value, self.max_decay), self.min_decay)

    @torch.no_grad()
    def update(self, parameters: Iterable[torch.nn.Parameter]) -> float:
        """Move the shadows toward ``parameters``; returns the decay used."""
        params = list(parameters)
        if len(params) != len(self.shadow):
            raise ValueError(f"EMA tracks {len(self.shadow)} parameters, got {len(params)}")
        decay = self.decay()
        trained = [(s, p.detach().float()) for s, p in zip(self.shadow, params) if p.requires_grad]
        for shadow, param in zip(self.shadow, params):
            if not param.requires_grad:
                shadow.copy_(param.detach())
        if trained:
            shadows, values = (list(group) for group in zip(*trained))
            # EMAModel's foreach form, s -= (1 - d) (s - p), one fused kernel per tensor list.
            torch._foreach_sub_(shadows, torch._foreach_sub(shadows, values), alpha=1.0 - decay)
        self.num_updates += 1
        return decay

    @torch.no_grad()
    def copy_to(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Write the shadow weights into ``parameters`` (in their dtype)."""
        for shadow, param in zip(self.shadow, parameters, strict=True):
            param.copy_(shadow)

    def state_dict(self) -> dict:
        """Tensors under ``shadow.{i}`` plus the scalar state, ready for safetensors + JSON."""
        return {
            "tensors": {f"shadow.{i}": s.detach().cpu().contiguous() for i, s in enumerate(self.shadow)},
            "meta": {"num_updates": self.num_updates, "max_decay": self.max_decay, "warmup": self.warmup,
                     "inv_gamma": self.inv_gamma, "power": self.power, "min_decay": self.min_decay,
                     "update_after_step": self.update_after_step},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from `state_dict`'s output; shapes must match the tracked parameters."""
        tensors, meta = state["tensors"], state["meta"]
        if len(tensors) != len(self.shadow):
            raise ValueError(f"EMA state has {len(tensors)} tensors, this model has {len(self.shadow)} parameters")
        for i, shadow in enumerate(self.shadow):
            saved = tensors[f"shadow.{i}"]
            if saved.shape != shadow.shape:
                raise ValueError(f"EMA tensor shadow.{i} has shape {tuple(saved.shape)}, expected {tuple(shadow.shape)}")
            shadow.copy_(saved)
        self.num_updates = int(meta["num_updates"])
        self.max_decay, self.warmup = float(meta["max_decay"]), bool(meta["warmup"])
        self.inv_gamma, self.power = float(meta["inv_gamma"]), float(meta["power"])
        # Checkpoints written before min_decay / update_after_step existed used their defaults.
        self.min_decay = float(meta.get("min_decay", 0.0))
        self.update_after_step = int(meta.get("update_after_step", 0))
