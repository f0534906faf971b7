"""SIGKILL at five points of a training run, then `--resume_from_checkpoint latest`: bit-identical to no kill.

Each run is a separate process (tests/fault_injection.py); the kill comes from a monkeypatched library
function, so the script has no test hooks. CPU, fp32, one torch thread: bit-for-bit equality is expected.
"""

import os

import pytest
from fault_injection import Fault, assert_same_state, final_state, tiny_train_args

from ddpm_hf.checkpointing import is_complete, list_checkpoints, resolve_checkpoint

FAST_PUSH = {"ddpm_hf.hub:HubPusher.__init__": {"backoff_s": 0.05, "max_backoff_s": 0.5, "max_attempts": 10,
                                                "request_timeout_s": 20.0}}


@pytest.fixture(scope="module")
def reference(training_runner, tmp_path_factory):
    """One uninterrupted run shared by every test here."""
    out = tmp_path_factory.mktemp("reference") / "out"
    result = training_runner.run(tiny_train_args(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return final_state(out)


def kill_then_resume(runner, out, fault, extra=()):
    killed = runner.run(tiny_train_args(out, 6, *extra), faults=[fault])
    assert killed.killed, f"the fault never fired (exit {killed.returncode}):\n{killed.stderr[-3000:]}"
    names = sorted(os.listdir(out))
    latest = resolve_checkpoint(str(out), "latest")
    for name in names:  # every folder `latest` may pick is complete
        if name.startswith("checkpoint-"):
            assert is_complete(os.path.join(out, name)), f"{name} is incomplete but named like a checkpoint"
    resumed = runner.run(tiny_train_args(out, 6, "--resume_from_checkpoint", "latest", *extra))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return names, latest, resumed


@pytest.mark.parametrize(
    "fault, expected_latest, leftover",
    [
        # mid-step: the optimizer has updated the weights in memory; LR scheduler, EMA and step counter have not.
        (Fault("torch.optim:AdamW.step", "kill_after", at_call=3), "checkpoint-2", None),
        # mid-checkpoint-save: checkpoint-4's model file is written, its optimizer state is not.
        (Fault("accelerate.checkpointing:save", "kill", at_call=4), "checkpoint-2", ".checkpoint-4.partial"),
        # mid-checkpoint-save, later: every file and the completion marker written, the rename not done.
        (Fault("ddpm_hf.checkpointing:_replace_dir", "kill", at_call=2), "checkpoint-2", ".checkpoint-4.partial"),
        # mid-export at step 4: the EMA unet is in the staging folder, unet_raw is not.
        (Fault("diffusers.models.modeling_utils:ModelMixin.save_pretrained", "kill", at_call=2), "checkpoint-4",
         ".export.partial"),
        # during the EMA update: shadows moved in memory, the update not yet counted.
        (Fault("ddpm_hf.ema:EMA.update", "kill_after", at_call=3), "checkpoint-2", None),
    ],
    ids=["mid-step", "mid-checkpoint-files", "mid-checkpoint-rename", "mid-export", "during-ema-update"],
)
def test_sigkill_then_resume_latest_matches_uninterrupted_run(training_runner, reference, tmp_path, fault,
                                                              expected_latest, leftover):
    out = tmp_path / "out"
    names, latest, resumed = kill_then_resume(training_runner, out, fault)
    assert os.path.basename(latest) == expected_latest
    if leftover is not None:
        assert leftover in names  # the interrupted write really happened (and `latest` skipped it)
    assert f"Resumed from {latest}" in resumed.stderr
    assert not [n for n in os.listdir(out) if n.endswith((".partial", ".old"))]  # cleaned up on start
    assert_same_state(final_state(out), reference)


def test_sigkill_mid_export_leaves_no_half_export_that_loads(training_runner, tmp_path):
    """A kill inside the final export leaves the staging folder, never a model_index.json over missing parts."""
    out = tmp_path / "out"
    fault = Fault("diffusers.models.modeling_utils:ModelMixin.save_pretrained", "kill", at_call=4)  # final export
    killed = training_runner.run(tiny_train_args(out), faults=[fault])
    assert killed.killed
    assert os.path.isdir(out / ".export.partial")
    # the step-4 export is still whole: its model_index.json names folders that are all there
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (out / "unet_raw" / "diffusion_pytorch_model.safetensors").is_file()
    assert [n for _, n in list_checkpoints(str(out))][-1].endswith("checkpoint-6")


def test_sigkill_mid_push_then_resume_pushes_final_export(training_runner, reference, hub, tmp_path):
    """Killed while uploading the step-4 export (background thread): resume finishes and the final export lands."""
    out = tmp_path / "out"
    push = ("--push_to_hub", "--hub_model_id", "test-user/kill-push")
    fault = Fault("huggingface_hub:HfApi.upload_folder", "kill", at_call=1)
    killed = training_runner.run(tiny_train_args(out, 6, *push), faults=[fault], kwdefaults=FAST_PUSH)
    assert killed.killed, killed.stderr[-3000:]
    resumed = training_runner.run(tiny_train_args(out, 6, "--resume_from_checkpoint", "latest", *push),
                                  kwdefaults=FAST_PUSH)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_state(final_state(out), reference)
    landed = hub.files("test-user/kill-push")
    for rel in ("unet/diffusion_pytorch_model.safetensors", "unet_raw/diffusion_pytorch_model.safetensors",
                "model_index.json", "scheduler/scheduler_config.json"):
        assert landed[rel] == (out / rel).read_bytes(), rel
    assert not [rel for rel in landed if "checkpoint" in rel or rel.startswith("logs")]


def test_sigkill_of_a_class_conditional_run_resumes_bit_identically(training_runner, tmp_path):
    """Labels and the classifier-free label dropout come from the run's generator: a kill mid-step and
    `--resume_from_checkpoint latest` end bit-identical to the uninterrupted conditional run."""
    labels = ("--class_conditional", "true", "--cond_drop_prob", "0.5")
    straight = tmp_path / "straight" / "out"
    result = training_runner.run(tiny_train_args(straight, 6, *labels))
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "killed" / "out"
    _, latest, resumed = kill_then_resume(training_runner, out, Fault("torch.optim:AdamW.step", "kill_after",
                                                                      at_call=3), labels)
    assert os.path.basename(latest) == "checkpoint-2" and f"Resumed from {latest}" in resumed.stderr
    assert_same_state(final_state(out), final_state(straight))
