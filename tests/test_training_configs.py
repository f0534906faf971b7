"""training/configs/ddpm-cifar10.json is the DDPM paper's CIFAR-10 recipe (Ho et al. 2020, Appendix B).

The expected values are the paper's, written here by hand, not read from the config or from ddpm_hf.
"""

import json
from pathlib import Path

import pytest
import torch

from ddpm_hf.training import PipelineClasses, parse_args
from ddpm_hf.training.components import build_noise_scheduler, unet_config

CONFIG = Path(__file__).resolve().parents[1] / "training" / "configs" / "ddpm-cifar10.json"
PAPER = {  # Ho et al. 2020, Sec. 4 and Appendix B
    "T": 1000, "beta_1": 1e-4, "beta_T": 0.02, "lr": 2e-4, "warmup": 5000, "batch": 128, "dropout": 0.1,
    "grad_clip": 1.0, "ema": 0.9999, "steps": 800_000, "parameters": 35.7e6,
}


@pytest.fixture(scope="module")
def recipe():
    return parse_args([str(CONFIG)])


def test_the_config_is_plain_json_naming_the_hub_dataset():
    config = json.loads(CONFIG.read_text())
    assert config["dataset_name"] == "uoft-cs/cifar10" and config["image_column"] == "img"


def test_the_training_hyperparameters_are_the_papers(recipe):
    data, model, train = recipe
    assert (data.resolution, data.random_flip) == (32, True)
    assert model.prediction_type == "epsilon" and model.ddpm_num_steps == PAPER["T"]
    assert train.learning_rate == PAPER["lr"] and train.lr_warmup_steps == PAPER["warmup"]
    assert train.lr_scheduler == "constant_with_warmup"  # the paper keeps the rate constant after warmup
    assert train.adam_weight_decay == 0.0  # AdamW without decay is Adam
    assert train.train_batch_size * train.gradient_accumulation_steps == PAPER["batch"]
    assert train.max_grad_norm == PAPER["grad_clip"] and train.max_train_steps == PAPER["steps"]
    assert train.use_ema and train.ema_max_decay == train.ema_min_decay == PAPER["ema"]  # constant decay
    assert train.snr_gamma in (None, 0.0)  # L_simple: unweighted


def test_the_noise_schedule_is_linear_from_1e4_to_0p02(recipe):
    _, model, _ = recipe
    scheduler = build_noise_scheduler(model, PipelineClasses.ddpm_hf())
    betas = torch.as_tensor(scheduler.betas, dtype=torch.float64)
    expected = torch.linspace(PAPER["beta_1"], PAPER["beta_T"], PAPER["T"], dtype=torch.float64)
    torch.testing.assert_close(betas, expected, rtol=0, atol=1e-7)


def test_the_network_is_the_papers_35_7m_parameter_net_with_dropout_0p1(recipe):
    data, model, _ = recipe
    classes = PipelineClasses.ddpm_hf()
    config = unet_config(model, data.resolution, 3, classes.unet)
    assert config["dropout"] == PAPER["dropout"]
    with torch.device("meta"):
        unet = classes.unet(**config)
    assert abs(sum(p.numel() for p in unet.parameters()) - PAPER["parameters"]) < 0.05e6
