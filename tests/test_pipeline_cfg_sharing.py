"""Sharing a class-conditional pipeline: always remote code (stock DDPMPipeline cannot pass labels), both routes.

Stock diffusers (in a process where ddpm_hf cannot be imported) refuses the folder without trust_remote_code; with
it, and ddpm_hf installed, stock ``DiffusionPipeline.from_pretrained`` samples it class-conditionally with
``class_labels`` and ``id2label`` restored; ``ddpm_hf.DDPMPipeline.from_pretrained`` loads it natively. Locally
and through the local Hub server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import diffusers
import numpy as np
import pytest
import torch

import ddpm_hf
from ddpm_hf.pipeline import DDPMPipeline
from ddpm_hf.sharing import HUB_PIPELINE_CLASS, HUB_PIPELINE_MODULE

NAMES = {0: "zero", 1: "one", 2: "two"}
CALL = dict(batch_size=3, num_inference_steps=4, output_type="np", class_labels=["two", "zero", "one"],
            guidance_scale=2.0)
# Loads with stock diffusers only (the script never imports ddpm_hf itself; hide=1 makes it unimportable).
SCRIPT = textwrap.dedent("""
    import json, os, sys
    folder, out, remote, hide = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4] == "1"
    if hide:
        sys.path = [p for p in sys.path if not os.path.isdir(os.path.join(p or ".", "ddpm_hf"))]
    import numpy as np, torch
    from diffusers import DiffusionPipeline
    try:
        pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=remote)
    except Exception as error:
        print(json.dumps({"error": f"{type(error).__name__}: {error}"}))
        raise SystemExit(0)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=3, num_inference_steps=4, output_type="np", class_labels=["two", "zero", "one"],
                  guidance_scale=2.0, generator=torch.Generator().manual_seed(0)).images
    np.save(out, images)
    print(json.dumps({"class": type(pipe).__name__, "id2label": {str(k): v for k, v in pipe.id2label.items()}}))
""")


def _pipeline():
    torch.manual_seed(0)
    unet = ddpm_hf.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                               block_out_channels=(8, 16), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                               up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                               attention_head_dim=None, num_class_embeds=len(NAMES) + 1).eval()
    with torch.no_grad():
        unet.class_embedding.weight.mul_(20)  # labels must visibly change the images
    pipe = DDPMPipeline(unet, ddpm_hf.DDPMScheduler(num_train_timesteps=100), id2label=NAMES)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(pipe, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    return pipe(generator=torch.Generator().manual_seed(0), **{**CALL, **kwargs}).images


def _stock(tmp_path, folder, remote, hide, offline=True):
    out = tmp_path / f"stock-{int(remote)}{int(hide)}.npy"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf_home_stock")}
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    else:
        env.pop("HF_HUB_OFFLINE", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(folder), str(out), str(int(remote)), str(int(hide))],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), (np.load(out) if out.exists() else None)


def _check_routes(tmp_path, source, expected, offline=True):
    refused, _ = _stock(tmp_path, source, remote=False, hide=True, offline=offline)
    assert "trust_remote_code" in refused["error"], refused
    missing, _ = _stock(tmp_path, source, remote=True, hide=True, offline=offline)
    assert "pip install ddpm_hf" in missing["error"], missing
    trusted, images = _stock(tmp_path, source, remote=True, hide=False, offline=offline)
    assert trusted == {"class": HUB_PIPELINE_CLASS, "id2label": {"0": "zero", "1": "one", "2": "two"}}
    np.testing.assert_allclose(images, expected, atol=1e-5, rtol=0)
    native = ddpm_hf.DDPMPipeline.from_pretrained(source)
    assert type(native) is DDPMPipeline and native.id2label == NAMES
    assert isinstance(native.unet, ddpm_hf.UNet2DModel) and native.unet.config.num_class_embeds == 4
    np.testing.assert_allclose(_images(native), expected, atol=1e-6, rtol=0)


def test_class_conditional_folder_is_remote_code_and_loads_both_ways(tmp_path):
    pipe = _pipeline()
    expected = _images(pipe)
    assert not np.allclose(expected, _images(pipe, class_labels=["one", "two", "zero"]), atol=1e-3)
    folder = tmp_path / "cfg"
    pipe.save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == [HUB_PIPELINE_MODULE, HUB_PIPELINE_CLASS]  # although DDPM is stock-safe
    assert index["id2label"] == {"0": "zero", "1": "one", "2": "two"}
    assert (folder / f"{HUB_PIPELINE_MODULE}.py").is_file()
    for cls in (diffusers.DiffusionPipeline, diffusers.DDPMPipeline):
        with pytest.raises(ValueError, match="trust_remote_code"):
            cls.from_pretrained(folder)
    _check_routes(tmp_path, folder, expected)


def test_unconditional_pipelines_save_no_id2label(tmp_path):
    pipe = DDPMPipeline(ddpm_hf.UNet2DModel.from_config({**_pipeline().unet.config, "num_class_embeds": None}),
                        ddpm_hf.DDPMScheduler(num_train_timesteps=100))
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline" and "id2label" not in index
    assert ddpm_hf.DDPMPipeline.from_pretrained(tmp_path).id2label is None


def test_class_conditional_hub_round_trip(hub, tmp_path):
    pipe = _pipeline()
    expected = _images(pipe)
    pipe.save_pretrained(tmp_path / "out", push_to_hub=True, repo_id="alice/tiny-cfg")
    assert f"{HUB_PIPELINE_MODULE}.py" in hub.files("alice/tiny-cfg")
    with pytest.raises(ValueError, match="trust_remote_code"):
        diffusers.DiffusionPipeline.from_pretrained("alice/tiny-cfg")
    _check_routes(tmp_path, "alice/tiny-cfg", expected, offline=False)
