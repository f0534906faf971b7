"""Saving and loading: folders stock diffusers loads without ddpm_hf, remote code where stock would sample wrongly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch

import ddpm_hf
from ddpm_hf.pipeline import DDPMPipeline
from ddpm_hf.sharing import HUB_PIPELINE_CLASS, HUB_PIPELINE_MODULE, HUB_PIPELINE_SOURCE, stock_divergences

REPO = Path(__file__).resolve().parents[1]
TINY = dict(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=4, attention_head_dim=None)
SAMPLE = dict(batch_size=2, num_inference_steps=5, output_type="np")
# Runs with ddpm_hf unimportable: what a user with only diffusers installed gets.
STOCK_SCRIPT = textwrap.dedent("""
    import json, os, sys
    sys.path = [p for p in sys.path if not os.path.isdir(os.path.join(p or ".", "ddpm_hf"))]
    import numpy as np, torch
    from diffusers import DiffusionPipeline
    results = {}
    for folder, out, remote in json.loads(sys.argv[1]):
        try:
            pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=remote)
        except Exception as error:
            results[out] = f"{type(error).__name__}: {error}"
            continue
        pipe.set_progress_bar_config(disable=True)
        results[out] = [type(pipe).__module__, type(pipe).__name__, type(pipe.unet).__module__,
                           type(pipe.scheduler).__name__]
        images = pipe(batch_size=2, num_inference_steps=5, output_type="np",
                      generator=torch.Generator().manual_seed(0)).images
        np.save(out, images)
    assert "ddpm_hf" not in sys.modules
    print(json.dumps(results))
""")


def _tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(**TINY).eval()


def _our_pipeline(scheduler):
    from ddpm_hf.models import UNet2DModel

    pipe = DDPMPipeline(UNet2DModel.from_config(_tiny_unet().config), scheduler)
    pipe.unet.load_state_dict(_tiny_unet().state_dict())
    pipe.unet.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(pipe, **kwargs):
    return pipe(generator=torch.Generator().manual_seed(0), **{**SAMPLE, **kwargs}).images


def _run_stock(tmp_path, jobs):
    """Load each (folder, trust_remote_code) with stock diffusers in a process where ddpm_hf cannot be imported."""
    args = [(str(folder), str(tmp_path / f"stock-{i}.npy"), remote) for i, (folder, remote) in enumerate(jobs)]
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", STOCK_SCRIPT, json.dumps(args)], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    return [(results[a[1]], np.load(a[1]) if os.path.exists(a[1]) else None) for a in args], proc.stderr


def _index(folder):
    return json.loads((Path(folder) / "model_index.json").read_text())


def test_saved_folder_names_only_diffusers_classes_and_stock_diffusers_samples_it_identically(tmp_path):
    pipes = {"ddpm": _our_pipeline(ddpm_hf.DDPMScheduler(num_train_timesteps=100)),
             "ddim": _our_pipeline(ddpm_hf.DDIMScheduler(num_train_timesteps=100, timestep_spacing="leading"))}
    for name, pipe in pipes.items():
        pipe.save_pretrained(tmp_path / name)
        index = _index(tmp_path / name)
        assert index["_class_name"] == "DDPMPipeline"
        assert index["unet"] == ["diffusers", "UNet2DModel"]
        assert index["scheduler"] == ["diffusers", type(pipe.scheduler).__name__]
        assert not (tmp_path / name / f"{HUB_PIPELINE_MODULE}.py").exists()
        assert pipe.config["unet"] == ("diffusers", "UNet2DModel")
    results, stderr = _run_stock(tmp_path, [(tmp_path / "ddpm", False), (tmp_path / "ddim", False)])
    assert "were passed to" not in stderr  # no config key that diffusers would ignore
    for (info, images), (name, pipe) in zip(results, pipes.items()):
        assert info == ["diffusers.pipelines.ddpm.pipeline_ddpm", "DDPMPipeline", "diffusers.models.unets.unet_2d",
                        type(pipe.scheduler).__name__], info
        np.testing.assert_allclose(images, _images(pipe), atol=1e-4, rtol=0)


def test_from_pretrained_loads_a_stock_folder_with_our_classes(tmp_path):
    stock = diffusers.DDPMPipeline(_tiny_unet(), diffusers.DDIMScheduler(num_train_timesteps=100))
    stock.set_progress_bar_config(disable=True)
    stock.save_pretrained(tmp_path)
    pipe = ddpm_hf.DDPMPipeline.from_pretrained(tmp_path)
    assert isinstance(pipe.unet, ddpm_hf.UNet2DModel) and isinstance(pipe.scheduler, ddpm_hf.DDIMScheduler)
    assert pipe.config["unet"] == ("diffusers", "UNet2DModel") and pipe.name_or_path == str(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(_images(pipe), _images(stock), atol=1e-4, rtol=0)
    half = ddpm_hf.DDPMPipeline.from_pretrained(tmp_path, torch_dtype=torch.float64)
    assert half.unet.dtype == torch.float64


def test_from_pretrained_keeps_diffusers_loader_features(tmp_path):
    """device_map, variant, low_cpu_mem_usage and passed components work as in DiffusionPipeline.from_pretrained."""
    stock = diffusers.DDPMPipeline(_tiny_unet(), diffusers.DDPMScheduler(num_train_timesteps=100))
    stock.save_pretrained(tmp_path, variant="fp16")
    assert (tmp_path / "unet" / "diffusion_pytorch_model.fp16.safetensors").exists()
    mapped = ddpm_hf.DDPMPipeline.from_pretrained(tmp_path, variant="fp16", device_map="cpu", low_cpu_mem_usage=True)
    assert isinstance(mapped.unet, ddpm_hf.UNet2DModel) and mapped.hf_device_map == "cpu"
    mapped.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(_images(mapped), _images(_quiet(stock)), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="no such modeling files"):
        ddpm_hf.DDPMPipeline.from_pretrained(tmp_path, variant="bf16")
    mine = diffusers.DDPMScheduler(num_train_timesteps=100, variance_type="fixed_large")
    passed = ddpm_hf.DDPMPipeline.from_pretrained(tmp_path, variant="fp16", scheduler=mine, unet=stock.unet)
    assert passed.scheduler is mine and passed.unet is stock.unet  # passed components are used as they are


def test_remote_code_folder_loads_as_our_pipeline_without_running_its_file(tmp_path):
    pipe = _our_pipeline(ddpm_hf.DDIMScheduler(num_train_timesteps=100, timestep_spacing="quad", clip_sample=False))
    pipe.save_pretrained(tmp_path)
    (tmp_path / f"{HUB_PIPELINE_MODULE}.py").write_text("raise RuntimeError('the folder code ran')\n")
    loaded = ddpm_hf.DDPMPipeline.from_pretrained(tmp_path)
    assert type(loaded) is DDPMPipeline and isinstance(loaded.scheduler, ddpm_hf.DDIMScheduler)
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(_images(loaded), _images(pipe), atol=1e-6, rtol=0)


# (class, config, words of the reason, whether diffusers' own class of that config samples at all). The reasons
# come from running stock diffusers on the config (ddpm_hf.schedulers.stock_equivalence).
DIVERGENT = [
    ("DDIMScheduler", {"timestep_spacing": "quad"}, "quad is not supported", False),
    ("DDIMScheduler", {"timestep_spacing": "trailing"}, "timestep tables differ", True),  # N + 1 entries
    ("DDIMScheduler", {"timestep_spacing": "linspace"}, "differs", True),  # steps to t - T // N (issue 12633)
    ("DDIMScheduler", {"beta_schedule": "sigmoid"}, "sigmoid is not implemented", False),
    ("DDPMScheduler", {"variance_type": "fixed_large_log"}, "NaN", True),  # issue 14569
    ("DDPMScheduler", {"variance_type": "learned"}, "NaN", True),  # a log variance read as a variance
]


@pytest.mark.parametrize("name, config, reason, stock_usable", DIVERGENT)
def test_stock_divergences_are_detected(name, config, reason, stock_usable):
    reasons = stock_divergences(getattr(ddpm_hf, name)(num_train_timesteps=100, **config))
    assert any(reason in r for r in reasons), reasons
    if stock_usable:  # diffusers' own class samples the same in stock diffusers' pipeline loop
        assert stock_divergences(getattr(diffusers, name)(num_train_timesteps=100, **config)) == []
    assert stock_divergences(getattr(ddpm_hf, name)(num_train_timesteps=100)) == []


def test_divergent_scheduler_is_saved_as_remote_code_that_stock_refuses_and_trusted_loading_samples_right(tmp_path):
    pipe = _our_pipeline(ddpm_hf.DDIMScheduler(num_train_timesteps=100, timestep_spacing="quad", clip_sample=False))
    folder = tmp_path / "quad"
    pipe.save_pretrained(folder)
    assert _index(folder)["_class_name"] == [HUB_PIPELINE_MODULE, HUB_PIPELINE_CLASS]
    assert _index(folder)["scheduler"] == [HUB_PIPELINE_MODULE, "DDIMScheduler"]
    for file in (folder / f"{HUB_PIPELINE_MODULE}.py", folder / "scheduler" / f"{HUB_PIPELINE_MODULE}.py"):
        assert file.read_text() == HUB_PIPELINE_SOURCE
    # Without ddpm_hf: refused without trust_remote_code, and a clear missing-package error with it.
    (refused, _), (missing, _) = _run_stock(tmp_path, [(folder, False), (folder, True)])[0]
    assert "trust_remote_code" in refused
    assert "ddpm_hf" in missing and "pip install" in missing
    for cls in (diffusers.DiffusionPipeline, diffusers.DDIMPipeline, diffusers.DDPMPipeline):
        with pytest.raises(ValueError, match="trust_remote_code"):
            cls.from_pretrained(folder)
    loaded = diffusers.DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    assert type(loaded).__name__ == HUB_PIPELINE_CLASS and isinstance(loaded, DDPMPipeline)
    assert isinstance(loaded.unet, ddpm_hf.UNet2DModel) and isinstance(loaded.scheduler, ddpm_hf.DDIMScheduler)
    assert loaded.scheduler.config.timestep_spacing == "quad"
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(_images(loaded), _images(pipe), atol=1e-5, rtol=0)
    # Saving a stock-safe scheduler into the same folder removes the remote code again.
    loaded.scheduler = ddpm_hf.DDIMScheduler(num_train_timesteps=100)
    loaded.save_pretrained(folder)
    assert _index(folder)["_class_name"] == "DDPMPipeline"
    assert _index(folder)["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert not (folder / f"{HUB_PIPELINE_MODULE}.py").exists()
    assert not (folder / "scheduler" / f"{HUB_PIPELINE_MODULE}.py").exists()


def test_trusted_loading_builds_configs_that_diffusers_own_class_refuses(tmp_path):
    """DDIM with the sigmoid schedule: diffusers' DDIMScheduler raises NotImplementedError for it, so the remote
    folder names the scheduler from its own file and diffusers' loader builds ddpm_hf's class directly."""
    pipe = _our_pipeline(ddpm_hf.DDIMScheduler(num_train_timesteps=100, beta_schedule="sigmoid"))
    pipe.save_pretrained(tmp_path)
    with pytest.raises(NotImplementedError, match="sigmoid"):
        diffusers.DDIMScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    with pytest.raises(ValueError, match="trust_remote_code"):
        diffusers.DiffusionPipeline.from_pretrained(tmp_path)
    for loaded in (diffusers.DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True),
                   ddpm_hf.DDPMPipeline.from_pretrained(tmp_path)):
        assert isinstance(loaded, DDPMPipeline) and type(loaded.scheduler) is ddpm_hf.DDIMScheduler
        assert loaded.scheduler.config.beta_schedule == "sigmoid"
        np.testing.assert_allclose(_images(_quiet(loaded)), _images(pipe), atol=1e-6, rtol=0)


def test_pipelines_file_is_the_hub_source_and_loads_as_custom_pipeline(tmp_path):
    path = REPO / "pipelines" / f"{HUB_PIPELINE_MODULE}.py"
    assert path.read_text() == HUB_PIPELINE_SOURCE
    stock = diffusers.DDPMPipeline(_tiny_unet(), diffusers.DDPMScheduler(num_train_timesteps=100))
    stock.set_progress_bar_config(disable=True)
    stock.save_pretrained(tmp_path)
    pipe = diffusers.DiffusionPipeline.from_pretrained(tmp_path, custom_pipeline=str(path), trust_remote_code=True)
    assert isinstance(pipe, DDPMPipeline)
    assert isinstance(pipe.unet, ddpm_hf.UNet2DModel) and isinstance(pipe.scheduler, ddpm_hf.DDPMScheduler)
    pipe.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(_images(pipe), _images(stock), atol=1e-4, rtol=0)


def test_hub_round_trip(hub, tmp_path):
    pipe = _our_pipeline(ddpm_hf.DDPMScheduler(num_train_timesteps=100))
    pipe.save_pretrained(tmp_path / "out", push_to_hub=True, repo_id="alice/tiny-ddpm")
    assert {"model_index.json", "unet/config.json", "scheduler/scheduler_config.json"} <= set(hub.files("alice/tiny-ddpm"))
    ours = ddpm_hf.DDPMPipeline.from_pretrained("alice/tiny-ddpm", revision="main", torch_dtype=torch.float64)
    assert isinstance(ours.unet, ddpm_hf.UNet2DModel) and isinstance(ours.scheduler, ddpm_hf.DDPMScheduler)
    assert ours.unet.dtype == torch.float64 and ours.name_or_path == "alice/tiny-ddpm"
    ours.unet.float()
    stock = diffusers.DiffusionPipeline.from_pretrained("alice/tiny-ddpm")
    assert type(stock) is diffusers.DDPMPipeline and type(stock.unet) is diffusers.UNet2DModel
    for loaded in (ours, stock):
        loaded.set_progress_bar_config(disable=True)
        np.testing.assert_allclose(_images(loaded), _images(pipe), atol=1e-4, rtol=0)


def test_hub_round_trip_of_a_remote_code_pipeline(hub, tmp_path):
    pipe = _our_pipeline(ddpm_hf.DDPMScheduler(num_train_timesteps=100, variance_type="fixed_large_log"))
    pipe.save_pretrained(tmp_path / "out", push_to_hub=True, repo_id="alice/tiny-large-log")
    assert f"{HUB_PIPELINE_MODULE}.py" in hub.files("alice/tiny-large-log")
    with pytest.raises(ValueError, match="trust_remote_code"):
        diffusers.DiffusionPipeline.from_pretrained("alice/tiny-large-log")
    trusted = diffusers.DiffusionPipeline.from_pretrained("alice/tiny-large-log", trust_remote_code=True)
    ours = ddpm_hf.DDPMPipeline.from_pretrained("alice/tiny-large-log")
    for loaded in (trusted, ours):
        assert isinstance(loaded.scheduler, ddpm_hf.DDPMScheduler)
        loaded.set_progress_bar_config(disable=True)
        images = _images(loaded)
        assert np.isfinite(images).all()
        np.testing.assert_allclose(images, _images(pipe), atol=1e-4, rtol=0)


def test_a_config_diffusers_own_class_refuses_is_a_reason_not_a_crash():
    """diffusers' DDIMScheduler builds with quad spacing but its set_timesteps raises; the contract reports that."""
    from ddpm_hf.schedulers import contract_for

    reasons = contract_for(diffusers.DDIMScheduler(num_train_timesteps=100, timestep_spacing="quad")).stock_divergences()
    assert any("cannot sample this config" in r and "quad is not supported" in r for r in reasons), reasons
