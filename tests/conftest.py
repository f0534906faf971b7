"""Shared test fixtures: a local Hub server per test process, a fresh HF_HOME per test.

``huggingface_hub`` reads ``HF_ENDPOINT``, ``HF_HOME`` and friends once, at import (docs/hub_protocol.md). This
module is imported by pytest before any test module, so it picks the server's port and points the environment at it
here, before anything imports ``huggingface_hub``. The ``hub`` fixture also patches the already-read constants,
so it works even if a plugin imported the library first. No test can reach the real Hub: the endpoint is
always the local server, and HF_HOME is a throw-away directory.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # so tests can `import hub_server` under xdist too

from fault_injection import FastSleep, free_port  # noqa: E402  (needs the path above)


_PORT = free_port()
_ENDPOINT = f"http://127.0.0.1:{_PORT}"
_SESSION_HF_HOME = tempfile.mkdtemp(prefix="ddpm_hf-hf_home-")
atexit.register(shutil.rmtree, _SESSION_HF_HOME, ignore_errors=True)
os.environ["HF_ENDPOINT"] = _ENDPOINT
os.environ["HF_HOME"] = _SESSION_HF_HOME
os.environ.pop("HF_HUB_CACHE", None)
os.environ.pop("HF_TOKEN", None)  # never send a real user token to anything during tests
os.environ["DDPM_HF_CACHE"] = os.path.join(_SESSION_HF_HOME, "ddpm_hf")  # digits classifier cache, per test process
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_UPDATE_CHECK"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
# Inductor compiles in this process (and in the training subprocesses, which inherit it), not in a pool of compile
# workers: on 2 cores beside the other xdist worker the pool only adds processes that contend and can stall.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")


@pytest.fixture(scope="session")
def hub_server():
    """The process-wide local Hub server, bound to the port that ``HF_ENDPOINT`` names."""
    from hub_server import HubServer

    server = HubServer(port=_PORT).start()
    yield server
    server.stop()


@pytest.fixture
def hf_home(tmp_path, monkeypatch) -> Path:
    """A fresh, empty HF_HOME (cache, token, xet cache) for this test, in env and in huggingface_hub's constants."""
    from huggingface_hub import constants

    home = tmp_path / "hf_home"
    home.mkdir()
    monkeypatch.setenv("HF_HOME", str(home))
    for name, value in {
        "HF_HOME": home,
        "HF_HUB_CACHE": home / "hub",
        "HF_ASSETS_CACHE": home / "assets",
        "HF_XET_CACHE": home / "xet",
        "HF_TOKEN_PATH": home / "token",
        "HF_STORED_TOKENS_PATH": home / "stored_tokens",
    }.items():
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, str(value))
    return home


@pytest.fixture
def hub(hub_server, hf_home, monkeypatch):
    """The local Hub server, emptied and up, with huggingface_hub pointed at it for this test.

    Also divides huggingface_hub's own retry sleeps (1, 2, 4, 8, 8 s per request) by 100, so that fault
    tests exercise the real retry paths in well under a second, and restores the HTTP client afterwards.
    """
    import huggingface_hub
    from huggingface_hub import constants, hf_api
    from huggingface_hub.utils import _http

    hub_server.reset()
    monkeypatch.setattr(constants, "ENDPOINT", hub_server.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub_server.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_api.api, "endpoint", hub_server.url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(_http, "time", FastSleep(_http.time))
    yield hub_server
    huggingface_hub.set_client_factory(_http.default_client_factory)
    huggingface_hub.close_session()
    hub_server.reset()


@pytest.fixture(scope="session")
def training_runner(tmp_path_factory):
    """One fault-injection helper process per test process; each `run` forks a fresh training process."""
    from fault_injection import TrainingRunner

    with TrainingRunner(tmp_path_factory.mktemp("training_runs")) as runner:
        yield runner
