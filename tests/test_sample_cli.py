"""`python -m ddpm_hf.sample`: the grid holds the images the pipeline API draws with the same seed and sampler."""

from __future__ import annotations

import subprocess
import sys

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch

import ddpm_hf
from ddpm_hf import sample

TINY = dict(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=4, attention_head_dim=None)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("export")
    ddpm_hf.DDPMPipeline(ddpm_hf.UNet2DModel(**TINY).eval(), ddpm_hf.DDPMScheduler()).save_pretrained(folder)
    return folder


def _tiles(path, n: int, size: int = 8) -> list[np.ndarray]:
    grid = np.asarray(PIL.Image.open(path))
    cols = grid.shape[1] // size
    return [grid[(i // cols) * size:(i // cols + 1) * size, (i % cols) * size:(i % cols + 1) * size] for i in range(n)]


@pytest.mark.parametrize("name, cls", [("ddim", ddpm_hf.DDIMScheduler),
                                       ("dpmsolver", diffusers.DPMSolverMultistepScheduler)])
def test_the_grid_holds_what_the_pipeline_draws_with_that_seed_and_sampler(export, tmp_path, name, cls):
    out = tmp_path / "grid.png"
    sample.main([str(export), "--num_images", "5", "--scheduler", name, "--steps", "3", "--seed", "7",
                 "--batch_size", "2", "--out", str(out)])
    assert PIL.Image.open(out).size == (3 * 8, 2 * 8)  # 5 images: a 3 x 2 grid, the last tile blank
    pipe = ddpm_hf.DDPMPipeline.from_pretrained(export)
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(7)
    expected = [np.asarray(img) for b in (2, 2, 1)
                for img in pipe(batch_size=b, generator=generator, num_inference_steps=3).images]
    tiles = _tiles(out, 6)
    for got, want in zip(tiles, expected):
        np.testing.assert_array_equal(got, want)
    assert (tiles[5] == 255).all()
    assert not np.array_equal(tiles[0], tiles[1])  # the seed's draws differ image to image


def test_the_command_line_runs_and_bad_arguments_name_the_flag(export, tmp_path):
    out = tmp_path / "g.png"
    ok = subprocess.run([sys.executable, "-m", "ddpm_hf.sample", str(export), "--num_images", "2", "--steps", "2",
                         "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert out.is_file() and "wrote" in ok.stderr
    bad = subprocess.run([sys.executable, "-m", "ddpm_hf.sample", str(export), "--num_images", "0"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--num_images" in bad.stderr


def test_class_labels_and_guidance_reach_the_pipeline(tmp_path):
    torch.manual_seed(1)
    folder = tmp_path / "cond"
    unet = ddpm_hf.UNet2DModel(**TINY, num_class_embeds=3).eval()  # 2 classes + the null class
    ddpm_hf.DDPMPipeline(unet, ddpm_hf.DDIMScheduler(), id2label={0: "zero", 1: "one"}).save_pretrained(folder)
    out = tmp_path / "g.png"
    sample.main([str(folder), "--num_images", "3", "--steps", "2", "--class_labels", "one", "0",
                 "--guidance_scale", "2", "--seed", "4", "--out", str(out)])
    pipe = ddpm_hf.DDPMPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    want = pipe(batch_size=3, generator=torch.Generator().manual_seed(4), num_inference_steps=2,
                class_labels=["one", "zero", "one"], guidance_scale=2.0).images
    for got, expected in zip(_tiles(out, 3), want):
        np.testing.assert_array_equal(got, np.asarray(expected))
    unguided = pipe(batch_size=3, generator=torch.Generator().manual_seed(4), num_inference_steps=2,
                    class_labels=["one", "zero", "one"]).images
    assert not np.array_equal(np.asarray(unguided[0]), _tiles(out, 1)[0])  # the scale changed the images
