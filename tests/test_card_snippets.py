"""The model card's own Python snippets run, as a user would copy them, and make images.

For each scheduler configuration a tiny pipeline is saved, its card written, and the card's code blocks
extracted from README.md: the diffusers one runs in a subprocess where ddpm_hf cannot be imported when the
folder is stock (and with ddpm_hf present, as the card says, when it is remote code); the ddpm_hf one runs here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

import ddpm_hf
from ddpm_hf.data import DIGITS_NAME
from ddpm_hf.model_card import GridFacts, RunFacts, write_model_card

TINY = dict(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
            down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
            norm_num_groups=4)
CONFIGS = {  # name: (scheduler, the grid's sampler)
    "ddpm_50_steps": (ddpm_hf.DDPMScheduler(num_train_timesteps=50), "DDIM"),
    "ddpm_fixed_large_log": (ddpm_hf.DDPMScheduler(num_train_timesteps=20, variance_type="fixed_large_log"), "DDPM"),
    "ddim_trailing": (ddpm_hf.DDIMScheduler(num_train_timesteps=30, timestep_spacing="trailing"), "DDIM"),
    "ddim_leading": (ddpm_hf.DDIMScheduler(num_train_timesteps=40), "DDPM"),
    "ddim_sigmoid": (ddpm_hf.DDIMScheduler(num_train_timesteps=30, beta_schedule="sigmoid"), "DDIM"),
}
STOCK = {"ddpm_50_steps", "ddim_leading"}  # the others are remote code: stock diffusers samples them wrongly
NO_DPM_SOLVER = {"ddim_sigmoid"}  # diffusers' DPMSolverMultistepScheduler raises NotImplementedError for sigmoid
# Runs each (cwd, code) with ddpm_hf unimportable: what a user with only diffusers installed gets.
STOCK_RUNNER = textwrap.dedent("""
    import json, os, sys
    sys.path = [p for p in sys.path if not os.path.isdir(os.path.join(p or ".", "ddpm_hf"))]
    for cwd, code in json.loads(sys.argv[1]):
        os.chdir(cwd)
        exec(compile(code, "card-snippet", "exec"), {"__name__": "__main__"})
    assert "ddpm_hf" not in sys.modules
    print("ok")
""")


def python_blocks(readme: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", readme, flags=re.DOTALL | re.MULTILINE)


def folder_timesteps(folder) -> int:
    return json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["num_train_timesteps"]


def _save_and_card(root, name):
    scheduler, sampler = CONFIGS[name]
    torch.manual_seed(0)
    folder = root / name / "model"
    ddpm_hf.DDPMPipeline(ddpm_hf.UNet2DModel(**TINY), scheduler).save_pretrained(folder)
    Image.new("L", (8, 8)).save(folder / "samples.png")
    steps = min(7, scheduler.config.num_train_timesteps)
    grid = GridFacts(filename="samples.png", sampler=sampler, num_inference_steps=steps, weights="raw", seed=3)
    run = RunFacts(training_args={"seed": 3}, dataset_name=DIGITS_NAME, dataset_is_local=False,
                   train_split="the fixed train split", global_step=2, wall_time_s=1.0, grid=grid)
    readme = open(write_model_card(folder, run), encoding="utf-8").read()
    return folder, readme


def _check_sample(path):
    image = np.asarray(Image.open(path), dtype=np.float64)
    assert image.shape == (8, 8) and image.std() > 0  # a NaN image would come back constant
    os.remove(path)


@pytest.fixture(scope="module")
def cards(tmp_path_factory):
    root = tmp_path_factory.mktemp("cards")
    return {name: _save_and_card(root, name) for name in CONFIGS}


def test_each_card_has_the_diffusers_and_the_ddpm_hf_snippet(cards):
    for name, (folder, readme) in cards.items():
        stock = json.loads((folder / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"
        assert stock == (not (folder / "pipeline_ddpm_hf.py").exists()) == (name in STOCK), name
        diffusers_block, ours_block, *fastest = python_blocks(readme)
        assert len(fastest) == (name not in NO_DPM_SOLVER), name  # the fast recipe only where it can sample
        for block in fastest:
            assert "DPMSolverMultistepScheduler.from_config" in block and "num_inference_steps=6," in block
        assert ("trust_remote_code=True" in diffusers_block) == (not stock), name
        assert ("no remote code" in readme) == stock, name
        assert "ddpm_hf.DDPMPipeline.from_pretrained('./model')" in ours_block
        steps = int(re.search(r"num_inference_steps=(\d+)", diffusers_block).group(1))
        assert 1 <= steps <= folder_timesteps(folder)


def test_stock_snippets_run_without_ddpm_hf(cards, tmp_path):
    jobs = [(str(folder.parent), python_blocks(readme)[0]) for folder, readme in cards.values()
            if "trust_remote_code" not in python_blocks(readme)[0]]
    assert len(jobs) == len(STOCK)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", STOCK_RUNNER, json.dumps(jobs)], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
    for cwd, _ in jobs:
        _check_sample(os.path.join(cwd, "sample.png"))


def test_remote_code_and_ddpm_hf_snippets_run(cards, monkeypatch):
    remote = 0
    for folder, readme in cards.values():  # one process: remote code imports ddpm_hf, as the card says
        monkeypatch.chdir(folder.parent)
        diffusers_block, ours_block, *fastest = python_blocks(readme)
        remote += "trust_remote_code=True" in diffusers_block
        blocks = [ours_block, *fastest] + ([diffusers_block] if "trust_remote_code=True" in diffusers_block else [])
        for block in blocks:
            namespace = {"__name__": "__main__"}
            exec(compile(block, "card-snippet", "exec"), namespace)
            assert len(namespace["images"]) == 16
            _check_sample(folder.parent / "sample.png")
    assert remote == len(CONFIGS) - len(STOCK)
