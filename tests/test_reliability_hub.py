"""`--push_to_hub` against the local Hub server (tests/hub_server.py) while it fails: training never dies of it.

The training process is separate (tests/fault_injection.py); its HubPusher gets short retry waits through
keyword defaults, and huggingface_hub's own per-request backoff runs at 1/100 speed, as in the `hub` fixture.
"""

import re
import subprocess
import threading
import time

from fault_injection import tiny_train_args
from safetensors.torch import load_file

REPO = "test-user/flaky-hub"
PUSH = ("--push_to_hub", "--hub_model_id", REPO)
FAST_PUSH = {"ddpm_hf.hub:HubPusher.__init__": {"backoff_s": 0.05, "max_backoff_s": 0.2, "max_attempts": 6,
                                                "request_timeout_s": 1.0}}


def when_file_appears(path, action, limit_s=120.0):
    """Run `action` in a thread as soon as `path` exists (the training process's progress drives the faults)."""

    def watch():
        deadline = time.monotonic() + limit_s
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        action()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_hub_down_then_erroring_then_timing_out_training_finishes_and_final_export_lands(training_runner, hub,
                                                                                        tmp_path):
    out = tmp_path / "out"
    hub.go_down()  # down from the start: the repo cannot even be created

    def recover():  # back once checkpoint-2 exists, but the next commits get 500s and a preupload hangs
        hub.fail_next(2, status=500, match=r"^POST /api/models/.*/commit/")
        hub.delay_next(1, seconds=3.0, match=r"^POST /api/models/.*/preupload/")
        hub.come_up()

    watcher = when_file_appears(out / "checkpoint-2", recover)
    result = training_runner.run(tiny_train_args(out, 6, *PUSH), kwdefaults=FAST_PUSH)
    watcher.join()
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Could not create Hub repo" in result.stderr  # the outage was seen...
    # ...and the later failures were retried (by huggingface_hub's request retries: the start tries once)
    assert "Retrying in" in result.stderr
    commits = [path for method, path in hub.requests if method == "POST" and "/commit/" in path]
    assert len(commits) >= 3  # two 500s, then at least one that landed
    landed = hub.files(REPO)
    assert hub.repos[f"model:{REPO}"].head.message == "Step 6 (final)"
    for rel in ("model_index.json", "unet/diffusion_pytorch_model.safetensors",
                "unet_raw/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json", "README.md",
                "samples.png"):
        assert landed[rel] == (out / rel).read_bytes(), rel


def test_failed_final_push_exits_nonzero_with_export_intact_and_manual_command(training_runner, hub, tmp_path):
    out = tmp_path / "out"
    hub.go_down()  # never comes back during the run
    result = training_runner.run(tiny_train_args(out, 6, *PUSH), kwdefaults=FAST_PUSH)
    assert result.returncode == 1
    assert f"the export is in {out}, but the final push failed" in result.stderr
    assert f"hf upload {REPO} {out} ." in result.stderr  # the command to push it by hand
    assert "'--exclude=checkpoint-*'" in result.stderr
    weights = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert weights and all(t.isfinite().all() for t in weights.values())
    for rel in ("model_index.json", "scheduler/scheduler_config.json", "README.md", "checkpoint-6"):
        assert (out / rel).exists(), rel
    # the printed command, run as printed once the Hub is back, pushes the export and nothing else
    hub.come_up()
    command = next(line.strip() for line in result.stderr.splitlines() if " hf upload " in line)
    manual = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=120)
    assert manual.returncode == 0, manual.stderr
    landed = hub.files(REPO)
    assert landed["unet/diffusion_pytorch_model.safetensors"] == (out / "unet/diffusion_pytorch_model.safetensors"
                                                                  ).read_bytes()
    assert not [rel for rel in landed if rel.startswith(("checkpoint-", "logs/"))]
    assert (out / "ddpm_hf_run.json").is_file() and "ddpm_hf_run.json" not in landed  # local bookkeeping only


def test_unreachable_hub_does_not_hold_up_the_start(training_runner, hub, tmp_path):
    """With the default retry waits (2, 4, ... 32 s: 62 s in all), the repo creation at the start used to block
    training for a minute, counted as time to first step. One try now; the push creates the repo later."""
    out = tmp_path / "out"
    hub.go_down()
    watcher = when_file_appears(out / "checkpoint-2", hub.come_up)
    result = training_runner.run(tiny_train_args(out, 6, *PUSH))  # HubPusher's default retry waits
    watcher.join()
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Could not create Hub repo" in result.stderr and "retrying in" not in result.stderr.split(
        "Time to first step")[0]
    first_step = float(re.search(r"Time to first step: ([\d.]+) s", result.stderr).group(1))
    assert first_step < 30, first_step  # the data and network take a few seconds; 62 s of waits are gone
    assert hub.files(REPO)["model_index.json"] == (out / "model_index.json").read_bytes()
