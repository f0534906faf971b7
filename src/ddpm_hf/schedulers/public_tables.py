"""The public schedule tables of ddpm_hf's schedulers, float32 exactly as diffusers builds them.

Third-party code reads ``scheduler.betas`` / ``alphas`` / ``alphas_cumprod`` / ``final_alpha_cumprod`` and moves them
to a device: ``diffusers.training_utils.compute_snr`` calls ``alphas_cumprod.to(timesteps.device)``, which has no
float64 on Apple MPS, and diffusers' pipelines index ``scheduler.alphas_cumprod`` directly. So the public tables
are the very tensors diffusers' own scheduler of the same config holds (float32, CPU), built by that class;
ddpm_hf's maths never reads them and uses the float64 ``NoiseSchedule`` instead (``scheduler.noise_schedule``).
Where diffusers cannot build the schedule (its DDIMScheduler refuses ``sigmoid``) or has no such class, the
float64 tables are rounded to float32.
"""

from __future__ import annotations

from typing import Any, Mapping

import diffusers
import torch

from .. import diffusion_math as dm

# Public table attributes a diffusers DDPM/DDIM scheduler holds (DDPM: ``one``; DDIM: ``final_alpha_cumprod``).
TABLE_NAMES = ("betas", "alphas", "alphas_cumprod", "final_alpha_cumprod", "one")


def public_tables(stock_class_name: str, config: Mapping[str, Any], schedule: dm.NoiseSchedule,
                  final_alpha_cumprod: torch.Tensor) -> dict[str, torch.Tensor]:
    """The float32 tables diffusers' ``stock_class_name`` builds for ``config``.

    Args:
        stock_class_name: the diffusers scheduler class (``"DDPMScheduler"``/``"DDIMScheduler"``).
        config: the scheduler config (only the schedule keys and ``set_alpha_to_one`` are read).
        schedule: our float64 schedule of the same config (the fallback where diffusers refuses the config).
        final_alpha_cumprod: our float64 bar(alpha) "before t = 0" (the fallback's ``final_alpha_cumprod``).

    Returns:
        ``betas``, ``alphas``, ``alphas_cumprod``, ``final_alpha_cumprod`` and ``one`` (0-d 1.0), all float32 on CPU.
    """
    keys = {key: config[key] for key in dm.SCHEDULE_CONFIG_DEFAULTS if key in config}
    if "set_alpha_to_one" in config:
        keys["set_alpha_to_one"] = config["set_alpha_to_one"]
    tables = {
        "betas": schedule.betas.float(),
        "alphas": (1.0 - schedule.betas).float(),
        "alphas_cumprod": schedule.alphas_cumprod.float(),
        "final_alpha_cumprod": final_alpha_cumprod.float(),
        "one": torch.tensor(1.0),
    }
    stock_class = getattr(diffusers, stock_class_name, None)
    if stock_class is None:  # a scheduler with no diffusers counterpart
        return tables
    try:
        stock = stock_class(**keys)
    except NotImplementedError:  # e.g. "sigmoid is not implemented for DDIMScheduler"
        return tables
    tables.update({name: getattr(stock, name) for name in TABLE_NAMES if hasattr(stock, name)})
    return tables
