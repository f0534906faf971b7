"""Broken saved pipelines through our `from_pretrained`: errors that name the file.

(The training resume path's equivalents are in test_reliability_checkpoints.py.)
"""

import json
import logging
import shutil

import pytest
import torch

from ddpm_hf import DDPMPipeline, DDPMScheduler, UNet2DModel

TINY = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=4, attention_head_dim=None)
WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved") / "pipe"
    torch.manual_seed(0)
    DDPMPipeline(unet=UNet2DModel(**TINY), scheduler=DDPMScheduler(num_train_timesteps=10)).save_pretrained(folder)
    return folder


@pytest.fixture
def copy(saved, tmp_path):
    folder = tmp_path / "pipe"
    shutil.copytree(saved, folder)
    return folder


def edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_weights_name_the_file(copy, damage):
    path = copy / WEIGHTS
    content = path.read_bytes()
    path.write_bytes({"truncated": content[: len(content) // 2], "garbage": b"\x07" * 200, "empty": b""}[damage])
    for load in (lambda: UNet2DModel.from_pretrained(copy / "unet"), lambda: DDPMPipeline.from_pretrained(copy)):
        with pytest.raises(OSError, match="diffusion_pytorch_model.safetensors") as info:
            load()
        assert str(path) in str(info.value)


def test_config_that_is_not_json_names_the_file(copy):
    (copy / "unet" / "config.json").write_text('{"in_channels": ')
    with pytest.raises(OSError) as info:
        UNet2DModel.from_pretrained(copy / "unet")
    assert str(copy / "unet" / "config.json") in str(info.value)


def test_config_with_unknown_key_loads_and_warns_naming_it(copy):
    """As in diffusers: configs written by newer versions carry keys this one lacks (documented divergence)."""
    edit_json(copy / "unet" / "config.json", lambda c: c.update(made_up_key=3))
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    diffusers_logger = logging.getLogger("diffusers")  # does not propagate to the root logger
    diffusers_logger.addHandler(handler)
    try:
        model = UNet2DModel.from_pretrained(copy / "unet")
    finally:
        diffusers_logger.removeHandler(handler)
    assert any("made_up_key" in r.getMessage() and "config.json" in r.getMessage() for r in records)
    assert tuple(model.config.block_out_channels) == (8, 16)  # the rest of the config is used as saved


def test_config_missing_a_key_names_the_file(copy):
    edit_json(copy / "unet" / "config.json", lambda c: c.pop("block_out_channels"))
    with pytest.raises(ValueError, match="block_out_channels") as info:
        UNet2DModel.from_pretrained(copy / "unet")
    assert "config.json" in str(info.value)


def test_weights_of_another_config_name_the_file(copy, tmp_path):
    UNet2DModel(**{**TINY, "block_out_channels": (8, 8)}).save_pretrained(tmp_path / "other")
    shutil.copy(tmp_path / "other" / "diffusion_pytorch_model.safetensors", copy / WEIGHTS)
    with pytest.raises(ValueError, match="shape") as info:
        DDPMPipeline.from_pretrained(copy)
    assert "diffusion_pytorch_model.safetensors" in str(info.value)


def test_config_missing_keys_whose_defaults_fit_still_loads(copy):
    """Configs written by older diffusers lack newer keys; the defaults apply, as in diffusers."""
    edit_json(copy / "unet" / "config.json", lambda c: [c.pop(k) for k in ("attn_norm_num_groups", "norm_eps")])
    model = UNet2DModel.from_pretrained(copy / "unet")
    assert model.config.attn_norm_num_groups is None and model.config.norm_eps == 1e-5


def test_weights_of_another_config_name_the_file_without_low_cpu_mem_usage(copy, tmp_path):
    """diffusers raises torch's RuntimeError ("size mismatch") on this path; ours is a ValueError naming the file."""
    UNet2DModel(**{**TINY, "block_out_channels": (8, 8)}).save_pretrained(tmp_path / "other")
    shutil.copy(tmp_path / "other" / "diffusion_pytorch_model.safetensors", copy / WEIGHTS)
    with pytest.raises(ValueError, match="size mismatch") as info:
        UNet2DModel.from_pretrained(copy / "unet", low_cpu_mem_usage=False)
    assert str(copy / WEIGHTS) in str(info.value)


@pytest.mark.parametrize("component, entry", [("unet", ["diffusers", "NoSuchModel"]),
                                              ("scheduler", ["no_such_library", "NoSuchScheduler"])])
def test_model_index_naming_unknown_classes_names_the_file(copy, component, entry):
    edit_json(copy / "model_index.json", lambda index: index.update({component: entry}))
    with pytest.raises(ValueError, match="model_index.json") as info:
        DDPMPipeline.from_pretrained(copy)
    assert entry[1] in str(info.value)


def test_missing_model_index_names_the_file(copy):
    (copy / "model_index.json").unlink()
    with pytest.raises(OSError, match="model_index.json"):
        DDPMPipeline.from_pretrained(copy)
