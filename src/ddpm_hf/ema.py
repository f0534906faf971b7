"""Exponential moving average of model weights, with constant decay or the warmup of Karras-style EMAs.

Unlike ``diffusers.training_utils.EMAModel``, nothing here touches a model config: the EMA hyperparameters
live in the training arguments and the checkpoint, never in the exported ``config.json``.
"""

from __future__ import annotations

from typing import Iterable

import torch


class EMA:
    """Shadow copies of parameters updated as shadow <- decay * shadow + (1 - decay) * param.

    Args:
        parameters: the parameters to track (their order defines the state).
        max_decay: the decay once warmed up (and the constant decay without warmup).
        warmup: if True, decay_n = min(max_decay, 1 - (1 + n / inv_gamma) ** -power) after n updates, so early
            weights are forgotten quickly (the schedule of diffusers' ``use_ema_warmup``); if False the decay is
            ``max_decay`` from the first update.
        inv_gamma: warmup time scale.
        power: warmup exponent (2/3 suits ~1M-step runs, 3/4 shorter ones).
    """

    def __init__(self, parameters: Iterable[torch.nn.Parameter], max_decay: float = 0.9999, warmup: bool = True,
                 inv_gamma: float = 1.0, power: float = 2 / 3):
        for name, value, low in (("max_decay", max_decay, 0.0), ("inv_gamma", inv_gamma, 0.0), ("power", power, 0.0)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > low:
                raise ValueError(f"ema {name} must be a number > {low}, got {value!r}")
        if not max_decay < 1:
            raise ValueError(f"ema max_decay must be < 1, got {max_decay!r}")
        self.max_decay = float(max_decay)
        self.warmup = bool(warmup)
        self.inv_gamma = float(inv_gamma)
        self.power = float(power)
        self.num_updates = 0
        self.shadow = [p.detach().clone().float() for p in parameters]

    def decay(self) -> float:
        """The decay the next update will use (update n counts from 1)."""
        n = self.num_updates + 1
        if not self.warmup:
            return self.max_decay
        return min(self.max_decay, 1.0 - (1.0 + n / self.inv_gamma) ** -self.power)

    @torch.no_grad()
    def update(self, parameters: Iterable[torch.nn.Parameter]) -> float:
        """Move the shadows toward ``parameters``; returns the decay used."""
        decay = self.decay()
        params = [p.detach().float() for p in parameters]
        if len(params) != len(self.shadow):
            raise ValueError(f"EMA tracks {len(self.shadow)} parameters, got {len(params)}")
        # lerp(shadow, p, 1 - d) = d * shadow + (1 - d) * p, one fused kernel per tensor list.
        torch._foreach_lerp_(self.shadow, params, 1.0 - decay)
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
                     "inv_gamma": self.inv_gamma, "power": self.power},
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
