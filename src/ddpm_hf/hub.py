"""Pushing a training run's export folder to the Hugging Face Hub, in the background, without ever failing training.

Where diffusers' ``train_unconditional.py`` uploads its whole output folder (checkpoints with optimizer states
and RNG pickles, tensorboard logs) and ignores ``--hub_private_repo`` (docs/hub.md), :class:`HubPusher` creates
the repo with the requested visibility and uploads only the export files. Each push copies the allowed files
to a private staging folder first, so the upload sees one consistent export even while training keeps
writing, and ``HfApi.run_as_future`` (huggingface_hub's one worker thread) uploads it in the background with
huggingface_hub's own request retries, plus whole attempts with exponential backoff on server errors, timeouts and
connection errors (what those retries cannot outlast); a push still waiting is replaced by a newer one. A failure is logged with the command to push by hand; the access token is
scrubbed from every message.
"""

from __future__ import annotations

import logging
import re
import shlex
import shutil
import tempfile
import threading
import time
from concurrent import futures
from concurrent.futures import Future
from pathlib import Path

import huggingface_hub
from huggingface_hub import HfApi, constants
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import filter_repo_objects

try:  # huggingface_hub >= 2 ships its HTTP client as `httpx2`; 1.x used `httpx`.
    import httpx2 as httpx
except ImportError:  # pragma: no cover - depends on the installed huggingface_hub
    import httpx

logger = logging.getLogger(__name__)

# Never pushed: accelerate checkpoints (model + optimizer + LR scheduler + RNG states), logs, the run's identity
# file (local bookkeeping: it holds local data paths), pickles, and anything temporary (our atomic-write temp
# names, editor/OS droppings). fnmatch's `*` also crosses `/`, and a trailing `/` means "everything below".
DEFAULT_IGNORE_PATTERNS: tuple[str, ...] = (
    "checkpoint-*",
    "ddpm_hf_run.json",
    "*/checkpoint-*",
    "logs/",
    "*.pkl",
    "*.pickle",
    "optimizer*",
    "scheduler.bin",
    "scheduler*.pt",
    "random_states*",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.tmp",
    "*.tmp/*",
    "*.partial",
    "*.lock",
    "tmp*",
    ".*",
    "*/.*",
    "events.out.tfevents*",
    "*/events.out.tfevents*",
)

_TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)
_HF_TOKEN_RE = re.compile(r"hf_[A-Za-z0-9]{20,}")


def scrub_secrets(text: str, secrets: tuple[str | None, ...] = ()) -> str:
    """Return ``text`` with every given secret and anything shaped like a Hugging Face token replaced by ``***``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return _HF_TOKEN_RE.sub("***", text)


def set_request_timeout(seconds: float) -> None:
    """Give every huggingface_hub HTTP call in this process a per-operation timeout (connect, read, write).

    huggingface_hub's default client has no timeout, so a Hub that accepts a connection and never answers
    would hang an upload, and the end of training with it, forever. Through public API only: the new clients keep
    the request hooks of the client huggingface_hub had configured (offline mode, request ids).
    """
    hooks = dict(huggingface_hub.get_session().event_hooks)

    def factory():
        return httpx.Client(event_hooks=hooks, follow_redirects=True, timeout=httpx.Timeout(seconds))

    huggingface_hub.set_client_factory(factory)


def is_transient(error: BaseException) -> bool:
    """True for errors worth retrying: HTTP 408/429/5xx, timeouts, refused or dropped connections."""
    if isinstance(error, HfHubHTTPError):
        response = getattr(error, "response", None)
        return response is not None and response.status_code in _TRANSIENT_STATUS
    return isinstance(error, (httpx.TransportError, ConnectionError, TimeoutError))


class HubPushError(RuntimeError):
    """A Hub push that cannot succeed by retrying (bad token, forbidden, invalid repo id); the token is scrubbed."""


class HubPusher:
    """Create a Hub repo and push an export folder to it asynchronously, with retries; never raises mid-training.

    Args:
        repo_id: ``namespace/name`` or ``name`` (the namespace then comes from the token's user).
        token: access token, or ``None`` to use the locally saved login / ``HF_TOKEN``.
        private: create the repo private (ignored by the Hub if the repo already exists).
        folder: the export folder; only files not matched by ``ignore_patterns`` are pushed.
        endpoint: Hub URL; ``None`` uses ``HF_ENDPOINT`` / huggingface.co.
        ignore_patterns: fnmatch patterns never pushed; defaults to :data:`DEFAULT_IGNORE_PATTERNS`.
        max_attempts: attempts per push (each attempt also has huggingface_hub's own per-request retries).
        backoff_s: wait after the first failed attempt; doubles after each further failure.
        max_backoff_s: cap of the wait between attempts.
        request_timeout_s: per-operation HTTP timeout installed process-wide with :func:`set_request_timeout`;
            ``None`` leaves huggingface_hub's client alone.
    """

    def __init__(
        self,
        repo_id: str,
        token: str | None,
        private: bool,
        folder: str,
        endpoint: str | None = None,
        *,
        ignore_patterns: tuple[str, ...] = DEFAULT_IGNORE_PATTERNS,
        max_attempts: int = 6,
        backoff_s: float = 2.0,
        max_backoff_s: float = 120.0,
        request_timeout_s: float | None = 300.0,
    ):
        if not isinstance(repo_id, str) or not repo_id.strip():
            raise ValueError(f"repo_id must be a non-empty string like 'user/name', got {repo_id!r}")
        if not isinstance(private, bool):
            raise TypeError(f"private must be a bool, got {type(private).__name__}")
        if not isinstance(max_attempts, int) or max_attempts < 1:
            raise ValueError(f"max_attempts must be an int >= 1, got {max_attempts!r}")
        if backoff_s < 0 or max_backoff_s < 0:
            raise ValueError(f"backoff_s and max_backoff_s must be >= 0, got {backoff_s!r} and {max_backoff_s!r}")
        self.repo_id = repo_id
        self.private = private
        self.folder = Path(folder)
        self.endpoint = endpoint
        self.ignore_patterns = tuple(ignore_patterns)
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._token = token
        self._api = HfApi(endpoint=endpoint, token=token, library_name="ddpm_hf")
        if request_timeout_s is not None:
            set_request_timeout(request_timeout_s)
        self._repo_url: str | None = None
        self._lock = threading.Lock()
        self._latest: tuple[Future, Path] | None = None  # the newest push: its future and its snapshot
        self._last_ok: bool | None = None

    # ---------------------------------------------------------------- public API
    def create(self, retry: bool = True) -> str | None:
        """Create the repo (``exist_ok=True``) with the requested visibility and return its URL.

        Args:
            retry: retry an unreachable Hub with backoff (up to ~1 minute by default); False tries once, so that
                the start of a training run is never held up (each push tries again first).

        Returns:
            The repo URL, or ``None`` if the Hub stayed unreachable through every retry (logged; each push then
            tries to create the repo again first).

        Raises:
            HubPushError: for errors that retrying cannot fix (invalid token, no permission, invalid repo id),
                so that a run fails at its start rather than after hours of training.
        """
        try:
            return self._retrying(self._create_once, "create repo", self.max_attempts if retry else 1)
        except HubPushError:
            raise
        except Exception as err:  # noqa: BLE001 - reported, training goes on
            logger.warning(self._scrub(f"Could not create Hub repo {self.repo_id} yet ({_describe(err)}); "
                                       "each push will try again."))
            return None

    def push(self, commit_message: str) -> None:
        """Snapshot the export folder now and upload the snapshot in the background.

        A push queued behind a running one is replaced by a newer push (only the latest export matters).
        Never raises for Hub problems; see :meth:`wait`.

        Args:
            commit_message: the Hub commit's title.
        """
        try:
            staging = self._snapshot()
        except OSError as err:  # disk full, permissions: the export stays local, training goes on
            logger.error(self._scrub(f"Could not stage {self.folder} for push '{commit_message}': {_describe(err)}. "
                                     f"{self.manual_push_hint()}"))
            with self._lock:
                self._last_ok = False
            return
        with self._lock:
            # Latest wins: a push still waiting behind a running one is cancelled (HfApi runs futures one at a time).
            if self._latest is not None and self._latest[0].cancel():
                shutil.rmtree(self._latest[1], ignore_errors=True)
            future = self._api.run_as_future(self._upload, commit_message, staging)
            self._latest = (future, staging)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the queued and running pushes are done.

        Args:
            timeout: seconds to wait at most; ``None`` waits for the retries to run out.

        Returns:
            True if the last push landed (or nothing was pushed), False if it failed or did not finish in time;
            the failure has been logged with the command to push by hand.
        """
        with self._lock:
            latest = self._latest
        finished = latest is None or not futures.wait([latest[0]], timeout).not_done  # FIFO: older ones are done
        if not finished:
            logger.error(self._scrub(f"The push to {self.repo_id} did not finish within {timeout} s. "
                                     f"{self.manual_push_hint()}"))
            return False
        with self._lock:
            return self._last_ok is not False

    def manual_push_command(self) -> str:
        """The shell command that pushes the export folder by hand with the same exclusions (no token in it)."""
        args = ["hf", "upload", self.repo_id, str(self.folder), ".", "--commit-message", "Upload export by hand"]
        args += [f"--exclude={pattern}" for pattern in self.ignore_patterns]
        if self.private:
            args.append("--private")
        command = shlex.join(args)
        endpoint = self.endpoint or constants.ENDPOINT
        if endpoint.rstrip("/") != "https://huggingface.co":
            command = f"HF_ENDPOINT={shlex.quote(endpoint)} {command}"
        return command

    def manual_push_hint(self) -> str:
        return (f"The local export in {self.folder} is intact; push it by hand (log in with `hf auth login` or set "
                f"HF_TOKEN first) with:\n  {self.manual_push_command()}")

    # ---------------------------------------------------------------- internals
    def _scrub(self, text: str) -> str:
        return scrub_secrets(text, (self._token,))

    def _create_once(self) -> str:
        url = self._api.create_repo(self.repo_id, private=self.private, exist_ok=True, repo_type="model")
        self.repo_id = url.repo_id  # a bare name gets the token user's namespace
        self._repo_url = str(url)
        logger.info("Hub repo ready: %s (private=%s)", self._repo_url, self.private)
        return self._repo_url

    def _snapshot(self) -> Path:
        if not self.folder.is_dir():
            raise FileNotFoundError(f"folder {str(self.folder)!r} to push does not exist")
        staging = Path(tempfile.mkdtemp(prefix="ddpm_hf-push-"))
        files = [p.relative_to(self.folder).as_posix() for p in self.folder.rglob("*") if p.is_file()]
        for rel in filter_repo_objects(files, ignore_patterns=list(self.ignore_patterns)):
            target = staging / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(self.folder / rel, target)
        return staging

    def _upload(self, message: str, staging: Path) -> bool:
        def attempt():
            if self._repo_url is None:
                self._create_once()
            return self._api.upload_folder(
                repo_id=self.repo_id,
                folder_path=staging,
                commit_message=message,
                repo_type="model",
                ignore_patterns=list(self.ignore_patterns),
            )

        try:
            info = self._retrying(attempt, f"push '{message}'")
            ok = True
        except Exception as err:  # noqa: BLE001 - a failed push must never kill training
            logger.error(self._scrub(f"Push '{message}' to {self.repo_id} failed: {_describe(err)}. "
                                     f"{self.manual_push_hint()}"))
            ok = False
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        with self._lock:
            self._last_ok = ok
        if ok:
            logger.info(self._scrub(f"Pushed '{message}' to {self.repo_id}: {getattr(info, 'commit_url', info)}"))
        return ok

    def _retrying(self, fn, what: str, max_attempts: int | None = None):
        # huggingface_hub retries each upload request 5 times over ~23 s but never create_repo, and an outage of
        # minutes outlasts its retries: whole attempts, spaced further apart, are what it cannot do.
        max_attempts = max_attempts or self.max_attempts
        delay, attempt = self.backoff_s, 1
        while True:
            try:
                return fn()
            except Exception as err:  # noqa: BLE001 - classified below
                if not is_transient(err):
                    raise HubPushError(self._scrub(f"{what} on {self.repo_id} failed: {_describe(err)}")) from None
                if attempt >= max_attempts:
                    raise
                logger.warning(self._scrub(f"{what} on {self.repo_id} failed (attempt {attempt}/{max_attempts}: "
                                           f"{_describe(err)}); retrying in {delay:.1f} s"))
            time.sleep(delay)
            delay, attempt = min(delay * 2, self.max_backoff_s), attempt + 1

def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"
