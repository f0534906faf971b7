"""Every saved folder either loads in stock diffusers and gives our images, or is refused by it.

For each value of every scheduler config key ddpm_hf accepts (one key changed from the defaults at a time, for
DDPM and DDIM), a tiny pipeline is saved; ONE subprocess without ddpm_hf importable then loads every folder with
stock ``DiffusionPipeline.from_pretrained``. A folder that names stock ``DDPMPipeline`` must load with diffusers'
own classes and sample our images (same weights, same seed, 1e-4); a folder that names the remote-code pipeline
must be refused for want of ``trust_remote_code=True`` (and, trusted with ddpm_hf installed, load ddpm_hf's
classes). ddpm_hf itself loads every folder back to the same images.
"""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch

import ddpm_hf
from ddpm_hf.diffusion_math import BETA_SCHEDULES, PREDICTION_TYPES, VARIANCE_TYPES
from ddpm_hf.timestep_spacing import TIMESTEP_SPACINGS
from test_pipeline_sharing import _images, _index, _our_pipeline, _run_stock

T = 100
SHARED = {
    "beta_schedule": BETA_SCHEDULES,
    "timestep_spacing": TIMESTEP_SPACINGS,
    "prediction_type": PREDICTION_TYPES,
    "steps_offset": (0, 1),
    "rescale_betas_zero_snr": (False, True),
    "trained_betas": (None, (np.linspace(1e-4, 0.02, T) ** 0.9).tolist()),
    "clip_sample": (True, False),
    "thresholding": (False, True),
}
KEYS = {"DDPMScheduler": {**SHARED, "variance_type": VARIANCE_TYPES},
        "DDIMScheduler": {**SHARED, "set_alpha_to_one": (True, False)}}
CASES = [(name, key, value) for name, keys in KEYS.items() for key, values in keys.items() for value in values]


def _scheduler(name, key, value):
    return getattr(ddpm_hf, name)(num_train_timesteps=T, **{key: value})


def _pipeline(name, key, value):
    """Our pipeline; a learned variance gets a network with 2C output channels, as it needs."""
    pipe = _our_pipeline(_scheduler(name, key, value))
    if key == "variance_type" and value.startswith("learned"):
        torch.manual_seed(1)
        unet = ddpm_hf.UNet2DModel.from_config({**pipe.unet.config, "out_channels": 2}).eval()
        pipe = ddpm_hf.DDPMPipeline(unet, pipe.scheduler)
        pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.slow
def test_every_saved_folder_loads_in_stock_diffusers_with_our_images_or_is_refused(tmp_path):
    assert len(CASES) >= 45
    folders, ours, remote = [], [], []
    for i, (name, key, value) in enumerate(CASES):
        pipe = _pipeline(name, key, value)
        folder = tmp_path / f"{i:02d}-{name}-{key}"
        pipe.save_pretrained(folder)
        index = _index(folder)
        remote.append(index["_class_name"] != "DDPMPipeline")
        assert index["_class_name"] == (["pipeline_ddpm_hf", "DDPMHFPipeline"] if remote[-1] else "DDPMPipeline")
        assert index["scheduler"] == ["pipeline_ddpm_hf" if remote[-1] else "diffusers", name]
        assert index["unet"] == ["diffusers", "UNet2DModel"]
        images = _images(pipe)
        assert np.isfinite(images).all(), (name, key, value)
        ours.append(images)
        folders.append(folder)
        loaders = [ddpm_hf.DDPMPipeline.from_pretrained]  # and a remote folder loads when trusted, with ddpm_hf
        if remote[-1]:
            loaders.append(lambda f: diffusers.DiffusionPipeline.from_pretrained(f, trust_remote_code=True))
        for load in loaders:
            reloaded = load(folder)
            assert type(reloaded.scheduler) is type(pipe.scheduler) and type(reloaded.unet) is ddpm_hf.UNet2DModel
            reloaded.set_progress_bar_config(disable=True)
            np.testing.assert_allclose(_images(reloaded), images, atol=1e-6, rtol=0, err_msg=str((name, key, value)))
    results, _ = _run_stock(tmp_path, [(folder, False) for folder in folders])
    for case, is_remote, expected, (info, images) in zip(CASES, remote, ours, results):
        if is_remote:
            assert isinstance(info, str) and "trust_remote_code" in info, (case, info)
            assert images is None
        else:
            assert info == ["diffusers.pipelines.ddpm.pipeline_ddpm", "DDPMPipeline",
                            "diffusers.models.unets.unet_2d", case[0]], (case, info)
            np.testing.assert_allclose(images, expected, atol=1e-4, rtol=0, err_msg=str(case))
    # Both outcomes occur, so neither branch above is vacuous.
    assert any(remote) and not all(remote)
