"""Class-conditional training with classifier-free guidance: labels reach the network, the null-class drop comes
from the run's generator (so a resume is bit-exact), every training option works with labels, bad labels fail
clearly.

Training runs use the library parts (`build_run`, `train_loop`) on the tiny net of test_training.
"""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from test_training import TINY_UNET, assert_same_tensors, tiny_flags, train_state_reset

from ddpm_hf import checkpointing
from ddpm_hf import diffusion_math as dm
from ddpm_hf.checkpointing import RunClock
from ddpm_hf.class_labels import LabelledDataset, LabelledSample
from ddpm_hf.data import build_train_dataset
from ddpm_hf.training import (PipelineClasses, build_run, parse_args, prepare_output_dir, resume, setup_accelerator,
                              train_loop, unet_config)
from ddpm_hf.training.objective import DiffusionObjective


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    train_state_reset()


class StopAt(Exception):
    """Raised by the on_step_end hook: the run dies right after a checkpoint, as a kill there would."""


def build(tmp_path, out="out", **overrides):
    """A class-conditional tiny run on the built-in digits, built from the library parts, ready to train."""
    flags = {"class_conditional": "true", **overrides}
    data_args, model_args, args = parse_args(tiny_flags(tmp_path, out=out, **flags))
    accelerator = setup_accelerator(args)
    run = build_run(accelerator, build_train_dataset(data_args, seed=args.seed), data_args, model_args, args,
                    RunClock())
    prepare_output_dir(run)
    resume(run)
    return run


def train(tmp_path, out="out", stop_at=None, **overrides):
    run = build(tmp_path, out, **overrides)

    def on_step_end(step, metrics):
        if step == stop_at:
            raise StopAt

    try:
        train_loop(run, on_step_end=on_step_end)
    except StopAt:
        pass
    return run


def checkpoint_state(out):
    last = checkpointing.resolve_checkpoint(str(out), "latest")
    optimizer = torch.load(f"{last}/optimizer.bin", weights_only=True)
    adam = {f"{i}.{k}": v for i, s in optimizer["state"].items() for k, v in s.items()}
    return last.rsplit("/", 1)[-1], {"model": load_file(f"{last}/model.safetensors"),
                                     "ema": load_file(f"{last}/{checkpointing.EMA_FILE}"), "adam": adam}


# ---- the objective -----------------------------------------------------------------------------------------------


class Recorder(torch.nn.Module):
    """A stand-in network that records its inputs and returns zeros."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, class_labels=None):
        self.calls.append((x, t, class_labels))
        return type("Out", (), {"sample": torch.zeros_like(x) + 0 * x})()


def objective(num_classes, cond_drop_prob):
    schedule = dm.NoiseSchedule.from_config({"num_train_timesteps": 50})
    return DiffusionObjective(schedule, "epsilon", "fixed_small", None, num_classes, cond_drop_prob)


def test_labels_reach_the_network_and_the_drop_is_the_generators_third_draw():
    """Ho & Salimans 2022, Algorithm 1: with probability p the label becomes the null class K (here K = 3). The
    expected labels are re-drawn independently from a generator in the documented order t, eps, u."""
    images, labels = torch.zeros(400, 1, 4, 4), torch.arange(400) % 3
    model = Recorder()
    loss = objective(3, 0.3).loss(model, LabelledSample(images, labels), torch.Generator().manual_seed(5))
    assert loss.dtype == torch.float32
    x_t, t, got = model.calls[0]
    g = torch.Generator().manual_seed(5)
    t_expected = torch.randint(0, 50, (400,), generator=g)
    noise = torch.randn(images.shape, generator=g)
    u = torch.rand(400, generator=g)
    assert torch.equal(t, t_expected)
    alpha = dm.NoiseSchedule.from_config({"num_train_timesteps": 50}).alphas_cumprod[t_expected]
    torch.testing.assert_close(x_t, (alpha.sqrt().view(-1, 1, 1, 1) * images
                                     + (1 - alpha).sqrt().view(-1, 1, 1, 1) * noise).float())
    assert torch.equal(got, torch.where(u < 0.3, torch.tensor(3), labels))
    assert 0.2 < (got == 3).float().mean() < 0.4  # about p of them dropped, none of the others changed
    model.calls.clear()
    objective(3, 0.0).loss(model, LabelledSample(images, labels), torch.Generator().manual_seed(5))
    assert torch.equal(model.calls[0][2], labels)


def test_a_batch_of_the_wrong_kind_is_refused():
    images = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match="needs LabelledSample batches"):
        objective(3, 0.1).loss(Recorder(), images, torch.Generator())
    with pytest.raises(ValueError, match="num_classes=None"):
        objective(None, 0.0).loss(Recorder(), LabelledSample(images, torch.zeros(2, dtype=torch.long)),
                                  torch.Generator())


# ---- the network config ------------------------------------------------------------------------------------------


def test_num_class_embeds_comes_from_the_data_and_a_disagreeing_config_names_both_numbers(tmp_path):
    _, model_args, _ = parse_args(["--model_preset", "tiny"])
    config = unet_config(model_args, 16, 1, PipelineClasses.ddpm_hf().unet, num_classes=10)
    assert config["num_class_embeds"] == 11 and config["class_embed_type"] is None
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps(dict(TINY_UNET, num_class_embeds=10)))
    with pytest.raises(ValueError, match=r"num_class_embeds=10, but the data has 10 classes.*num_class_embeds=11"):
        build(tmp_path, model_config_name_or_path=str(wrong))
    assert not (tmp_path / "out").exists()
    right = tmp_path / "right.json"
    right.write_text(json.dumps(dict(TINY_UNET, num_class_embeds=11)))
    assert build(tmp_path, model_config_name_or_path=str(right)).model.config.num_class_embeds == 11
    train_state_reset()
    with pytest.raises(ValueError, match="is class-conditional .*pass --class_conditional"):
        build(tmp_path, class_conditional="false", model_config_name_or_path=str(right))
    timestep = tmp_path / "timestep.json"
    timestep.write_text(json.dumps(dict(TINY_UNET, class_embed_type="timestep")))
    with pytest.raises(ValueError, match="class_embed_type='timestep'"):
        build(tmp_path, model_config_name_or_path=str(timestep))


@pytest.mark.parametrize("flag,value", [("cond_drop_prob", "1.0"), ("cond_drop_prob", "-0.1"),
                                        ("guidance_scale", "-1"), ("guidance_scale", "inf")])
def test_bad_guidance_flags_name_the_flag(flag, value):
    with pytest.raises(ValueError, match=f"--{flag}"):
        parse_args([f"--{flag}", value])


# ---- training with labels ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [
    {"gradient_accumulation_steps": 2, "use_ema": "true"},
    {"mixed_precision": "bf16", "snr_gamma": 5.0},
    {"variance_type": "learned_range", "snr_gamma": 0, "use_ema": "false"},
], ids=["accumulation+ema", "bf16+min_snr", "learned_range"])
def test_every_option_trains_with_labels(tmp_path, options):
    run = build(tmp_path, max_train_steps=3, cond_drop_prob=0.2, **options)
    assert isinstance(run.dataset, LabelledDataset) and run.objective.num_classes == 10
    net = run.accelerator.unwrap_model(run.model)
    before = net.class_embedding.weight.detach().clone()
    metrics = train_loop(run)
    assert math.isfinite(metrics["train_loss"]) and metrics["global_step"] == 3
    changed = (net.class_embedding.weight.detach() != before).any(dim=1)
    assert changed.all(), "every class row, the null class 10 included, must receive gradient"


def test_checkpoint_resume_with_label_dropping_is_bit_identical(tmp_path):
    """Killed right after the checkpoint at step 3 (mid-epoch, groups of 2 over 11 batches per epoch), resumed:
    weights, EMA and Adam state equal an uninterrupted run's, bit for bit. A different drop probability gives
    other weights, so the drop is part of what the resume has to reproduce."""
    common = dict(max_train_steps=8, gradient_accumulation_steps=2, checkpointing_steps=3, cond_drop_prob=0.5,
                  random_flip="true")
    train(tmp_path, out="straight", **common)
    train_state_reset()
    train(tmp_path, out="killed", stop_at=3, **common)
    assert checkpointing.resolve_checkpoint(str(tmp_path / "killed"), "latest").endswith("checkpoint-3")
    train_state_reset()
    resumed = train(tmp_path, out="killed", resume_from_checkpoint="latest", **common)
    assert resumed.progress.global_step == 8
    name_a, a = checkpoint_state(tmp_path / "straight")
    name_b, b = checkpoint_state(tmp_path / "killed")
    assert name_a == name_b == "checkpoint-8"
    for key in a:
        assert_same_tensors(a[key], b[key])
    train_state_reset()
    train(tmp_path, out="other_p", **dict(common, cond_drop_prob=0.1))
    _, c = checkpoint_state(tmp_path / "other_p")
    assert any(not torch.equal(a["model"][k], c["model"][k]) for k in a["model"])
