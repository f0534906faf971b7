"""HubPusher against the local Hub server: only export files land, faults are retried, tokens never leak."""

import logging
import time

import pytest

from ddpm_hf.hub import DEFAULT_IGNORE_PATTERNS, HubPusher, HubPushError, scrub_secrets

TOKEN = "hf_" + "Zq7" * 12  # token-shaped, so it would be caught by both the exact and the pattern scrubbing
ALLOWED = {
    "model_index.json": b'{"_class_name": "DDPMPipeline"}',
    "README.md": b"---\nlicense: apache-2.0\n---\n# card\n",
    "unet/config.json": b"{}",
    "unet/diffusion_pytorch_model.safetensors": b"\x00" * 64,
    "unet_raw/diffusion_pytorch_model.safetensors": b"\x01" * 64,
    "scheduler/scheduler_config.json": b"{}",
    "samples/step-100.png": b"\x89PNG",
}
FORBIDDEN = {
    "checkpoint-100/model.safetensors": b"w",
    "checkpoint-100/optimizer.bin": b"o",
    "checkpoint-100/scheduler.bin": b"s",
    "checkpoint-100/random_states_0.pkl": b"r",
    ".checkpoint-200.tmp/model.safetensors": b"partial",
    "tmp-export/unet/config.json": b"{}",
    "logs/train/events.out.tfevents.1.host": b"tb",
    "optimizer.bin": b"o",
    "random_states_0.pkl": b"r",
    "unet/diffusion_pytorch_model.safetensors.tmp": b"t",
    "ema.pt": b"e",
}


def make_export(root, files=None):
    folder = root / "export"
    for rel, content in {**ALLOWED, **FORBIDDEN, **(files or {})}.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(content)
    return folder


def snapshot_of(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def pusher(folder, **kwargs):
    options = dict(backoff_s=0.01, max_attempts=4, request_timeout_s=None)
    options.update(kwargs)
    repo_id = options.pop("repo_id", "alice/ddpm-digits")
    private = options.pop("private", False)
    return HubPusher(repo_id, token=TOKEN, private=private, folder=str(folder), **options)


def wait_until(condition, limit_s=30.0):
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.01)


def assert_no_token(caplog, capfd):
    out, err = capfd.readouterr()
    for text in (caplog.text, out, err):
        assert TOKEN not in text


@pytest.mark.parametrize("private", [True, False])
def test_push_lands_only_export_files_with_the_private_flag(hub, tmp_path, caplog, capfd, private):
    caplog.set_level(logging.DEBUG)
    folder = make_export(tmp_path)
    p = pusher(folder, private=private)
    assert p.create().endswith("/alice/ddpm-digits")
    p.push("Step 100")
    assert p.wait() is True
    assert hub.repos["model:alice/ddpm-digits"].private is private
    landed = hub.files("alice/ddpm-digits")
    assert set(landed) - {".gitattributes"} == set(ALLOWED)
    assert all(landed[rel] == content for rel, content in ALLOWED.items())
    assert hub.repos["model:alice/ddpm-digits"].head.message == "Step 100"
    assert f"Bearer {TOKEN}" in hub.auth_headers  # the token was used ...
    assert_no_token(caplog, capfd)  # ... and never printed


def test_bare_repo_name_gets_the_users_namespace(hub, tmp_path):
    p = pusher(make_export(tmp_path), repo_id="bare-name")
    p.create()
    p.push("x")
    assert p.wait()
    assert p.repo_id == "test-user/bare-name"
    assert "model_index.json" in hub.files("test-user/bare-name")


def test_500s_are_retried_and_the_push_lands(hub, tmp_path, caplog, capfd):
    folder = make_export(tmp_path)
    p = pusher(folder)
    p.create()
    hub.fail_next(8, 500, match="/commit/")  # more than huggingface_hub's own 5 retries: ours must kick in
    p.push("after 500s")
    assert p.wait() is True
    assert sum("/commit/" in path for _, path in hub.requests) == 9
    assert "model_index.json" in hub.files("alice/ddpm-digits")
    assert "retrying" in caplog.text
    assert_no_token(caplog, capfd)


def test_slow_replies_time_out_and_are_retried(hub, tmp_path):
    p = pusher(make_export(tmp_path), request_timeout_s=0.3)
    p.create()
    hub.delay_next(1, 1.0, match="/preupload/")
    p.push("after a timeout")
    assert p.wait() is True
    assert sum("/preupload/" in path for _, path in hub.requests) >= 2
    assert "unet/config.json" in hub.files("alice/ddpm-digits")


def test_hub_down_for_a_while_then_back(hub, tmp_path):
    p = pusher(make_export(tmp_path), backoff_s=0.2, max_attempts=6)
    hub.go_down(seconds=0.5)
    assert p.create() is not None  # retried until the server came back
    hub.go_down(seconds=0.5)
    p.push("while down")
    assert p.wait() is True
    assert "model_index.json" in hub.files("alice/ddpm-digits")


def test_hub_down_for_good_fails_softly_with_the_manual_command(hub, tmp_path, caplog, capfd):
    folder = make_export(tmp_path)
    before = snapshot_of(folder)
    p = pusher(folder, max_attempts=2)
    hub.go_down()
    assert p.create() is None  # logged, not raised: training must go on
    p.push("final")
    assert p.wait() is False
    assert snapshot_of(folder) == before  # the local export is intact
    failure = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(failure) == 1
    assert "hf upload alice/ddpm-digits" in failure[0] and str(folder) in failure[0]
    assert "--exclude=checkpoint-*" in failure[0] and f"HF_ENDPOINT={hub.url}" in failure[0]
    assert_no_token(caplog, capfd)


def test_non_transient_errors_are_not_retried_and_scrubbed(hub, tmp_path, caplog, capfd):
    p = pusher(make_export(tmp_path))
    hub.fail_next(1, 403, match="/api/repos/create")
    with pytest.raises(HubPushError) as excinfo:
        p.create()
    assert TOKEN not in str(excinfo.value) and "403" in str(excinfo.value)
    assert excinfo.value.__cause__ is None and excinfo.value.__suppress_context__
    assert sum(path == "/api/repos/create" for _, path in hub.requests) == 1
    assert_no_token(caplog, capfd)


def test_push_uploads_a_snapshot_taken_at_push_time(hub, tmp_path):
    folder = make_export(tmp_path)
    p = pusher(folder)
    p.create()
    hub.delay_next(1, 0.5, match="/preupload/")
    p.push("snapshot")
    (folder / "model_index.json").write_bytes(b"changed while uploading")
    assert p.wait()
    assert hub.files("alice/ddpm-digits")["model_index.json"] == ALLOWED["model_index.json"]


def test_a_queued_push_is_replaced_by_a_newer_one(hub, tmp_path):
    folder = make_export(tmp_path)
    p = pusher(folder)
    p.create()
    hub.delay_next(1, 0.5, match="/preupload/")
    p.push("first")
    wait_until(lambda: any("/preupload/" in path for _, path in hub.requests))  # "first" is running
    (folder / "model_index.json").write_bytes(b"2")
    p.push("second")  # queued ...
    (folder / "model_index.json").write_bytes(b"3")
    p.push("third")  # ... and replaced
    assert p.wait()
    messages = [c.message for c in hub.repos["model:alice/ddpm-digits"].commits]
    assert messages[-1] == "third" and "second" not in messages
    assert hub.files("alice/ddpm-digits")["model_index.json"] == b"3"


def test_wait_without_a_push_is_true_and_bad_arguments_are_rejected(tmp_path):
    assert pusher(tmp_path).wait() is True
    with pytest.raises(ValueError, match="repo_id"):
        HubPusher("", token=None, private=False, folder=str(tmp_path))
    with pytest.raises(TypeError, match="private"):
        HubPusher("a/b", token=None, private="yes", folder=str(tmp_path))
    with pytest.raises(ValueError, match="max_attempts"):
        HubPusher("a/b", token=None, private=False, folder=str(tmp_path), max_attempts=0)


def test_scrubbing_helpers():
    assert scrub_secrets(f"token={TOKEN} other=hf_{'x' * 30}", (TOKEN,)) == "token=*** other=***"
    assert "checkpoint-*" in DEFAULT_IGNORE_PATTERNS and "logs/" in DEFAULT_IGNORE_PATTERNS


def test_no_token_reaches_any_log_even_at_debug_through_failures(hub, tmp_path, caplog, capfd, monkeypatch):
    """No log filter is needed: every logger (ours and huggingface_hub's, at DEBUG with HF_DEBUG's request dumps)
    through creation, 500s, a timeout, a 403 and an outage never sees the token."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_DEBUG", True)
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")  # it sets its own level (WARNING)
    p = pusher(make_export(tmp_path), request_timeout_s=0.3, max_attempts=2)
    p.create()
    hub.fail_next(2, 500, match="/commit/")
    hub.delay_next(1, 1.0, match="/preupload/")
    p.push("faults")
    assert p.wait() is True
    hub.fail_next(1, 403, match="/preupload/")
    p.push("forbidden")
    assert p.wait() is False
    hub.go_down()
    p.push("down")
    assert p.wait() is False
    assert f"Bearer {TOKEN}" in hub.auth_headers and "authenticated: True" in caplog.text  # requests logged
    assert_no_token(caplog, capfd)
