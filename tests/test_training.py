"""training/train.py run in-process on tiny nets: arguments, LR schedule, seeds, export, EMA, NaN handling.

The recipe is loaded from the script file with `runpy` (it is not a module); its parts come from
`ddpm_hf.training`.
"""

import dataclasses
import json
import math
import os
import runpy
import time

import pytest
import torch
from safetensors.torch import load_file

from ddpm_hf import checkpointing
from ddpm_hf import diffusion_math as dm
from ddpm_hf.training import NonFiniteLossError, PipelineClasses, parse_args, unet_config
from ddpm_hf.training.objective import DiffusionObjective

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "training", "train.py")
train_main = runpy.run_path(SCRIPT, run_name="train_recipe")["main"]

TINY_UNET = {"block_out_channels": [16, 32], "layers_per_block": 1, "down_block_types": ["DownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "UpBlock2D"], "norm_num_groups": 8, "attention_head_dim": None}


def tiny_flags(tmp_path, out="out", **overrides):
    """Flags for a seconds-long run: 8x8 digits, a 2-level 16/32-channel net, 50 diffusion steps."""
    config = tmp_path / "tiny_unet.json"
    config.write_text(json.dumps(TINY_UNET))
    flags = {"output_dir": str(tmp_path / out), "resolution": 8, "model_config_name_or_path": str(config),
             "train_batch_size": 128, "ddpm_num_steps": 50, "ddpm_num_inference_steps": 2, "eval_batch_size": 4,
             "logger": "none", "max_train_steps": 3, "checkpointing_steps": 100, "lr_warmup_steps": 1}
    flags.update(overrides)
    argv = []
    for key, value in flags.items():
        argv += [f"--{key}", str(value)]
    return argv


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerator state is a process-wide singleton; each in-process run starts clean."""
    yield
    train_state_reset()


def run(tmp_path, **overrides):
    return train_main(tiny_flags(tmp_path, **overrides))


def progress_of(checkpoint):
    """A checkpoint's progress, without the wall time (checked separately: it is not deterministic)."""
    with open(checkpoint / checkpointing.STATE_FILE) as f:
        progress = json.load(f)["progress"]
    assert progress.pop("wall_time_s") > 0
    return progress


def unet_weights(folder):
    return load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))


def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---- arguments ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag,value,message", [
    ("train_batch_size", "0", "--train_batch_size must be an int >= 1"),
    ("learning_rate", "nan", "--learning_rate must be a finite float"),
    ("lr_scheduler", "cosine_annealing", "--lr_scheduler.*invalid choice: 'cosine_annealing'"),
    ("model_preset", "huge", "--model_preset.*invalid choice: 'huge'"),
    ("mixed_precision", "fp8", "--mixed_precision.*invalid choice: 'fp8'"),
    ("variance_type", "learned", "--variance_type.*invalid choice: 'learned'"),
    ("ema_max_decay", "1.0", "--ema_max_decay must be a finite float in \\(0, 1\\)"),
    ("ema_min_decay", "0.9995", "--ema_min_decay must be a finite float in \\[0, 0.999\\]"),
    ("ddpm_num_inference_steps", "2000", "must not exceed --ddpm_num_steps"),
    ("checkpoints_total_limit", "0", "--checkpoints_total_limit must be an int >= 1"),
    ("num_channels", "2", "--num_channels must be 1 or 3"),
    ("license", "Apache 2.0", "--license must be a Hub license identifier"),
    ("train_batch_size", "six", "--train_batch_size.*invalid int value: 'six'"),
])
def test_bad_arguments_name_the_flag(flag, value, message):
    with pytest.raises(ValueError, match=message):
        parse_args([f"--{flag}", value])


@pytest.mark.parametrize("key,value", [("lr_scheduler", "cosine_annealing"), ("prediction_type", "eps"),
                                       ("ddpm_beta_schedule", "laplace"), ("grid_sampler", "dpm")])
def test_json_choices_are_checked_against_the_same_lists(tmp_path, key, value):
    """A JSON config skips the parser's choices; validate checks the same lists and names the key."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({key: value}))
    with pytest.raises(ValueError, match=f"--{key} must be one of .*got '{value}'"):
        parse_args([str(path)])


def test_choice_lists_have_one_home():
    """The parser offers exactly the maths core's lists (minus the untrainable variance), diffusers' LR schedules
    and accelerate's precisions; a list re-typed here would drift."""
    from accelerate.utils import PrecisionType
    from diffusers.optimization import SchedulerType

    from ddpm_hf.training import args

    choices = {f.name: f.metadata.get("choices") for group in args.ARGUMENT_GROUPS
               for f in dataclasses.fields(group)}
    assert choices["prediction_type"] == dm.PREDICTION_TYPES
    assert choices["ddpm_beta_schedule"] == dm.BETA_SCHEDULES
    assert set(choices["variance_type"]) == set(dm.VARIANCE_TYPES) - {"learned"}
    assert set(choices["lr_scheduler"]) == {t.value for t in SchedulerType} - {"piecewise_constant"}
    assert set(choices["mixed_precision"]) == {p.value for p in PrecisionType} - {"fp8"}


def test_json_config_gives_the_same_arguments_as_flags(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"learning_rate": 3e-4, "use_ema": False, "resolution": 8, "output_dir": "x"}))
    from_json = parse_args([str(path)])
    from_flags = parse_args(["--learning_rate", "3e-4", "--use_ema", "false", "--resolution", "8",
                                   "--output_dir", "x"])
    assert from_json == from_flags


def test_defaults_are_the_tuned_ones():
    data, model, args = parse_args([])
    assert (args.learning_rate, args.lr_warmup_steps, args.train_batch_size, args.snr_gamma) == (2e-3, 100, 64, 5.0)
    assert args.mixed_precision is None and args.use_ema and model.model_preset == "tiny"
    assert (data.resolution, model.grid_sampler, model.ddpm_num_inference_steps) == (16, "ddim", 50)
    # 48 epochs of the 1,347 training digits at batch 64 (22 batches) = 1,056 steps: the ~1,044-step budget the
    # defaults were tuned at (benchmarks/training_defaults.md), kept when training moved to the "train" split.
    assert (args.num_epochs, args.max_train_steps, args.ema_max_decay) == (48, None, 0.999)
    assert args.license is None  # no license is claimed unless the user chooses one


def test_a_bad_resolution_fails_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="--resolution 9 .* multiple of 2"):
        run(tmp_path, resolution=9)
    assert not (tmp_path / "out").exists()


def test_resolution_the_network_cannot_take_is_a_clear_error():
    unet_cls = PipelineClasses.ddpm_hf().unet
    model_args = parse_args([])[1]
    with pytest.raises(ValueError, match="--resolution 18 .* multiple of 4"):
        unet_config(model_args, 18, 1, unet_cls)
    config = unet_config(model_args, 16, 3, unet_cls)
    assert (config["sample_size"], config["in_channels"], config["out_channels"]) == (16, 3, 3)
    model_args.variance_type = "learned_range"
    assert unet_config(model_args, 16, 3, unet_cls)["out_channels"] == 6


# ---- the loop ----------------------------------------------------------------------------------------------------


def test_lr_schedule_counts_optimizer_steps_under_uneven_accumulation(tmp_path):
    # The 1,347 training digits / 128 = 11 batches per epoch; accumulation 4 -> groups 4, 4, 3 = 3 optimizer
    # steps per epoch, so step 5 ends after batch 8 of the second epoch.
    metrics = run(tmp_path, gradient_accumulation_steps=4, max_train_steps=5, lr_warmup_steps=2,
                  lr_scheduler="linear", checkpointing_steps=100)
    assert metrics["global_step"] == 5
    with open(tmp_path / "out" / "checkpoint-5" / checkpointing.STATE_FILE) as f:
        state = json.load(f)
    # The linear decay ends exactly at 0 after the last optimizer step (diffusers' example: 50% of max LR).
    assert state["lr_scheduler"]["last_epoch"] == 5 and state["lr_scheduler"]["_last_lr"] == [0.0]
    assert progress_of(tmp_path / "out" / "checkpoint-5") == {"global_step": 5, "epoch": 1, "batches_in_epoch": 8,
                                                             "skipped_nonfinite": 0}


def test_seed_makes_runs_reproducible(tmp_path):
    run(tmp_path, out="a", seed=3, max_train_steps=2)
    train_state_reset()
    run(tmp_path, out="b", seed=3, max_train_steps=2)
    train_state_reset()
    run(tmp_path, out="c", seed=4, max_train_steps=2)
    a, b, c = (unet_weights(tmp_path / name / "unet_raw") for name in "abc")
    assert_same_tensors(a, b)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def train_state_reset():
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def test_export_layout_holds_ema_unet_raw_beside_it_and_no_ema_keys_in_config(tmp_path):
    run(tmp_path, max_train_steps=3, checkpointing_steps=2, checkpoints_total_limit=1, logger="tensorboard",
        logging_steps=1, license="mit")
    out = tmp_path / "out"
    card = (out / "README.md").read_text()
    header = card.split("---")[1]
    assert "license: mit" in header  # --license reaches the card's metadata
    assert "1,347 of the 1,797 digits" in card  # the card states the training split
    for name in ("model_index.json", "unet", "unet_raw", "scheduler", "samples.png", "logs", "checkpoint-3"):
        assert (out / name).exists(), name
    assert not (out / "checkpoint-2").exists()  # rotated away by --checkpoints_total_limit 1
    ema = load_file(out / "checkpoint-3" / checkpointing.EMA_FILE)
    raw = unet_weights(out / "unet_raw")
    assert_same_tensors(raw, load_file(out / "checkpoint-3" / "model.safetensors"))
    exported = PipelineClasses.ddpm_hf().unet.from_pretrained(str(out / "unet"))
    params = list(exported.parameters())
    assert len(params) == len(ema)
    assert all(torch.equal(p, ema[f"shadow.{i}"]) for i, p in enumerate(params))
    assert any(not torch.equal(t, raw[k]) for k, t in exported.state_dict().items())
    config = json.loads((out / "unet" / "config.json").read_text())
    assert not {"decay", "optimization_step", "inv_gamma", "power", "min_decay"} & config.keys()
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline" and index["unet"] == ["diffusers", "UNet2DModel"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = [os.path.join(r, f) for r, _, fs in os.walk(out / "logs") for f in fs if "tfevents" in f]
    scalars = EventAccumulator(events[0]).Reload().Tags()["scalars"]
    assert {"loss", "lr", "ema_decay", "grad_norm", "images_per_sec"} <= set(scalars)
    assert [e.step for e in EventAccumulator(events[0]).Reload().Scalars("loss")] == [1, 2, 3]


def test_noising_and_loss_stay_fp32_under_bf16_autocast():
    seen = {}

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 1, 1)

        def forward(self, x, t):
            seen["input"] = x.dtype
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = self.conv(x)
            seen["output"] = out.dtype
            return type("Out", (), {"sample": out})

    schedule = dm.NoiseSchedule.from_config({"num_train_timesteps": 1000})
    objective = DiffusionObjective(schedule, "epsilon", "fixed_small", snr_gamma=5.0)
    loss = objective.loss(Net(), torch.rand(4, 1, 8, 8).bfloat16(), torch.Generator().manual_seed(0))
    assert seen == {"input": torch.float32, "output": torch.bfloat16}
    assert loss.dtype == torch.float32


def test_mixed_precision_bf16_trains(tmp_path):
    metrics = run(tmp_path, mixed_precision="bf16", max_train_steps=2)
    assert metrics["global_step"] == 2 and math.isfinite(metrics["train_loss"])


def _nan_on_call(monkeypatch, bad_calls):
    """Fault injection: the objective's loss becomes NaN on the given (1-based) micro-batch calls."""
    real = DiffusionObjective.loss
    calls = {"n": 0}

    def fake(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] in bad_calls else loss

    monkeypatch.setattr(DiffusionObjective, "loss", fake)


def test_nonfinite_loss_stops_naming_the_step_after_saving_the_last_good_state(tmp_path, monkeypatch):
    _nan_on_call(monkeypatch, {3})
    with pytest.raises(NonFiniteLossError, match="optimizer step 3 .*--learning_rate.*skip_nonfinite_steps"):
        run(tmp_path, max_train_steps=5)
    out = tmp_path / "out"
    assert checkpointing.resolve_checkpoint(str(out), "latest") == str(out / "checkpoint-2")
    with open(out / "checkpoint-2" / checkpointing.STATE_FILE) as f:
        assert json.load(f)["progress"]["batches_in_epoch"] == 2


def test_skip_nonfinite_steps_skips_and_counts(tmp_path, monkeypatch):
    # Call 11 is the last batch of the first epoch (11 batches of 128 training digits): skipping it must still
    # end the epoch. Epoch 0 then gives 9 steps; step 14 is the 5th batch of epoch 1.
    _nan_on_call(monkeypatch, {2, 11})
    metrics = run(tmp_path, max_train_steps=15, skip_nonfinite_steps="true", checkpointing_steps=14)
    assert metrics["global_step"] == 15 and metrics["skipped_nonfinite_steps"] == 2
    assert progress_of(tmp_path / "out" / "checkpoint-14") == {"global_step": 14, "epoch": 1, "batches_in_epoch": 5,
                                                              "skipped_nonfinite": 2}


def test_resuming_a_checkpoint_of_another_network_names_the_checkpoint(tmp_path):
    run(tmp_path, max_train_steps=2)
    train_state_reset()
    bigger = tmp_path / "bigger.json"
    bigger.write_text(json.dumps(dict(TINY_UNET, block_out_channels=[16, 48])))
    with pytest.raises(ValueError, match="cannot resume from .*checkpoint-2"):
        train_main(tiny_flags(tmp_path, max_train_steps=4, resume_from_checkpoint="latest")
                   + ["--model_config_name_or_path", str(bigger)])


def test_hub_push_honours_private_and_eval_reaches_the_card(tmp_path, monkeypatch):
    import ddpm_hf.evaluate
    import ddpm_hf.hub

    calls = []

    class FakePusher:
        def __init__(self, repo_id, token, private, folder, **kwargs):
            calls.append(("init", repo_id, token, private, folder))

        def create(self, retry=True):
            calls.append(("create", retry))

        def push(self, message):
            calls.append(("push", message))

        def wait(self):
            return True

    monkeypatch.setattr(ddpm_hf.hub, "HubPusher", FakePusher)
    def fake_evaluation(pipeline, real, num_samples, **kwargs):
        half = len(real) // 2
        return {"fid_digits": 1.25, "num_generated": num_samples, "num_real_a": half, "num_real_b": len(real) - half,
                "real_shape": list(real.shape)}

    monkeypatch.setattr(ddpm_hf.evaluate, "evaluate_pipeline", fake_evaluation)
    metrics = run(tmp_path, push_to_hub="true", hub_model_id="me/digits", hub_private_repo="true",
                  hub_token="hf_SECRET123", eval="true", eval_num_samples=4)
    out = str(tmp_path / "out")
    assert calls[0] == ("init", "me/digits", "hf_SECRET123", True, out)
    # one try at the start (an unreachable Hub must not hold it up); pushes retry
    assert calls[1] == ("create", False) and calls[-1] == ("push", "Step 3 (final)")
    # --eval on the built-in digits compares with the 450 digits of the held-out test split
    assert metrics["fid_digits"] == 1.25 and metrics["real_shape"] == [450, 1, 8, 8]
    for root, _, files in os.walk(out):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                assert b"hf_SECRET123" not in f.read(), os.path.join(root, name)


# ---- checkpoint files --------------------------------------------------------------------------------------------


def _fake_checkpoint(root, step, complete=True):
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    if complete:
        (path / checkpointing.MARKER).write_text("{}")
    return str(path)


def test_latest_ignores_partial_folders_and_rotation_keeps_the_new_one(tmp_path):
    _fake_checkpoint(tmp_path, 2)
    newest = _fake_checkpoint(tmp_path, 10)
    _fake_checkpoint(tmp_path, 12, complete=False)  # e.g. diffusers' example killed mid-save
    (tmp_path / ".checkpoint-14.partial").mkdir()
    assert checkpointing.resolve_checkpoint(str(tmp_path), "latest") == newest
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        checkpointing.resolve_checkpoint(str(tmp_path), "checkpoint-12")
    with pytest.raises(ValueError, match="no such folder"):
        checkpointing.resolve_checkpoint(str(tmp_path), "checkpoint-99")
    checkpointing.remove_partial(str(tmp_path))
    assert not (tmp_path / ".checkpoint-14.partial").exists()
    older = _fake_checkpoint(tmp_path, 1)
    assert checkpointing.rotate(str(tmp_path), 1, keep=older) == [str(tmp_path / "checkpoint-2"), newest]
    assert checkpointing.resolve_checkpoint(str(tmp_path), "latest") == older


def test_a_failed_save_names_the_path_and_keeps_the_previous_checkpoint(tmp_path):
    previous = _fake_checkpoint(tmp_path, 5)

    class FullDisk:
        is_main_process = True

        def wait_for_everyone(self):
            pass

        def save_state(self, path):
            os.makedirs(path)
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="checkpoint-6.*No space left"):
        checkpointing.save_checkpoint(FullDisk(), str(tmp_path), 6, total_limit=1)
    assert checkpointing.resolve_checkpoint(str(tmp_path), "latest") == previous
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-5"]


def test_wall_time_spans_resumes_and_covers_the_export(tmp_path, monkeypatch):
    """The card's wall time is the whole run: the checkpointed time of earlier sessions plus this one's, up to
    the card itself (so the export and grid are inside it)."""
    from ddpm_hf.training import export

    real_save = export.save_export

    def slow_save(*args):  # an export that takes a second
        time.sleep(1.0)
        real_save(*args)

    run(tmp_path, max_train_steps=2, checkpointing_steps=2)
    train_state_reset()
    state_file = tmp_path / "out" / "checkpoint-2" / checkpointing.STATE_FILE
    state = json.loads(state_file.read_text())
    assert 0 < state["progress"]["wall_time_s"] < 600
    state["progress"]["wall_time_s"] = 9000.0  # as if the first session had taken 2.5 hours
    state_file.write_text(json.dumps(state))
    started = time.perf_counter()
    monkeypatch.setattr(export, "save_export", slow_save)
    metrics = run(tmp_path, max_train_steps=4, resume_from_checkpoint="latest")
    second_session = time.perf_counter() - started
    total = metrics["wall_time_minutes"] * 60
    assert 9000.0 < total <= 9000.0 + second_session
    final = json.loads((tmp_path / "out" / "checkpoint-4" / checkpointing.STATE_FILE).read_text())
    assert 9000.0 < final["progress"]["wall_time_s"] <= total - 1.0  # the card's time includes the slow export
    card = (tmp_path / "out" / "README.md").read_text()
    assert "2 h 30 min" in card
    assert "license:" not in card.split("---")[1]  # no --license: no license claimed
