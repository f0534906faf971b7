"""Run ``training/train.py`` in child processes with faults injected by monkeypatching library functions.

No production hooks: a fault replaces a library attribute (``module:Qualified.name``, e.g. the EMA update,
the optimizer step, accelerate's checkpoint writer, ``ModelMixin.save_pretrained``, ``HfApi.upload_folder``)
with a wrapper that counts calls and, at the chosen call, SIGKILLs its own process, raises an ``OSError``
(disk full, permission denied) or turns the result into NaN/inf. The script then runs exactly as
``python training/train.py ARGS`` would (``runpy`` with ``__name__ == "__main__"``, so its own ``main()`` and
its exit handling are what run).

Importing torch, diffusers, accelerate and transformers takes ~6 s per process here, more than a tiny
training run. So :class:`TrainingRunner` starts one helper process (``python tests/fault_injection.py``)
that imports the stack once and then forks a fresh child per run: each run is still its own process, with
its own pid to kill, its own stdout/stderr files and its own exit status, but starts in ~0.1 s.

Protocol on the helper's stdin/stdout: one JSON request per line, one JSON reply per line::

    {"argv": [...], "faults": [Fault...], "env": {"NAME": "value" | null}, "kwdefaults": {"mod:Class.fn": {...}},
     "stdout": "/path", "stderr": "/path", "timeout": seconds}  ->  {"returncode": int, "timed_out": bool}

(returncode -9 when the run was SIGKILLed; a run still going after ``timeout`` seconds is SIGKILLed by the helper
and reported as timed out, so that a hung run fails its test instead of hanging the suite.)
"""

from __future__ import annotations

import errno
import importlib
import json
import os
import runpy
import signal
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = str(ROOT / "training" / "train.py")
# A 45k-parameter net with one attention block: its checkpoints take milliseconds.
TINY_UNET_CONFIG = {"block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4,
                    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
                    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "attention_head_dim": None}
ACTIONS = ("kill", "kill_after", "raise_enospc", "raise_eacces", "nan", "inf", "require_weights_only", "hang")


@dataclass
class Fault:
    """One injected fault.

    Args:
        target: ``"module.path:Attr.name"``; the attribute is replaced in the child before the script runs.
        action: ``kill`` (SIGKILL before the call), ``kill_after`` (SIGKILL after the call returned), ``raise_enospc``
            / ``raise_eacces`` (``OSError`` before the call, naming no path, like a failing ``write``), ``nan`` /
            ``inf`` (the call's tensor result times NaN / +inf), ``require_weights_only`` (fail any call that
            does not pass ``weights_only=True``; for ``torch.load``), ``hang`` (sleep before the call until the
            runner's timeout kills the process: a rank that stops answering).
        at_call: the 1-based call number at which the action fires (and, for ``nan``/``inf``, only that one).
    """

    target: str
    action: str
    at_call: int = 1

    def __post_init__(self):
        if self.action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, got {self.action!r}")
        if ":" not in self.target:
            raise ValueError(f"target must look like 'module.path:Attr.name', got {self.target!r}")


@dataclass
class RunResult:
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool = False

    @property
    def killed(self) -> bool:
        """SIGKILLed by an injected fault (not by the runner's timeout)."""
        return self.returncode == -signal.SIGKILL and not self.timed_out


@dataclass
class RunRequest:
    argv: list[str]
    stdout: str
    stderr: str
    faults: list[dict] = field(default_factory=list)
    env: dict[str, str | None] = field(default_factory=dict)
    kwdefaults: dict[str, dict] = field(default_factory=dict)
    timeout: float = 300


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a rendezvous or a local server)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Each rank writes its own file: two ranks printing to one pipe can interleave their lines.
_PROBE = """
import os, sys
from pathlib import Path
from accelerate import Accelerator
a = Accelerator()
Path(sys.argv[1], f"rank{a.process_index}.txt").write_text(REPORT)
"""


def launch_probe(tmp_path: Path, config: Path, report: str) -> list[str]:
    """``accelerate launch --config_file config`` a script that builds an Accelerator ``a`` and has each rank
    report the f-string expression ``report``; returns the ranks' reports, sorted."""
    probe, reports = tmp_path / "probe.py", tmp_path / "reports"
    probe.write_text(_PROBE.replace("REPORT", report))
    reports.mkdir()
    command = ["accelerate", "launch", "--config_file", str(config), "--main_process_port", str(free_port()),
               str(probe), str(reports)]
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return sorted(path.read_text() for path in reports.glob("rank*.txt"))


def tiny_train_args(output_dir: str | os.PathLike, steps: int = 6, *extra: str) -> list[str]:
    """Flags for a ~0.5 s run on the built-in digits at 8x8: checkpoints every 2 steps, an export at step 4.

    The tiny net's config is written next to ``output_dir`` (so it survives ``--overwrite_output_dir``).
    """
    output_dir = Path(output_dir)
    config = output_dir.parent / "tiny_unet_config.json"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(json.dumps(TINY_UNET_CONFIG))
    return ["--output_dir", str(output_dir), "--resolution", "8", "--train_batch_size", "4", "--eval_batch_size", "2",
            "--max_train_steps", str(steps), "--checkpointing_steps", "2", "--save_model_steps", "4",
            "--ddpm_num_steps", "20", "--ddpm_num_inference_steps", "2", "--lr_warmup_steps", "1",
            "--logging_steps", "1", "--logger", "none", "--model_config_name_or_path", str(config), *extra]


def final_state(output_dir: str | os.PathLike, step: int = 6) -> dict[str, object]:
    """Every tensor a finished run leaves: exported EMA and raw weights, the last checkpoint's model and EMA."""
    from safetensors.torch import load_file

    output_dir = Path(output_dir)
    files = {"export unet": output_dir / "unet" / "diffusion_pytorch_model.safetensors",
             "export unet_raw": output_dir / "unet_raw" / "diffusion_pytorch_model.safetensors",
             "checkpoint model": output_dir / f"checkpoint-{step}" / "model.safetensors",
             "checkpoint ema": output_dir / f"checkpoint-{step}" / "ema.safetensors"}
    return {f"{label}/{key}": tensor for label, path in files.items() for key, tensor in load_file(path).items()}


def assert_same_state(got: dict, expected: dict) -> None:
    """Bit-for-bit equality of two `final_state` results."""
    import torch

    assert got.keys() == expected.keys()
    different = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not different, f"{len(different)} tensors differ from the uninterrupted run, e.g. {different[:3]}"


class TrainingRunner:
    """A helper process that forks one child per training run; use as a context manager or call `close`."""

    def __init__(self, log_dir: str | os.PathLike):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._count = 0
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self._proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=open(self.log_dir / "runner.err", "wb"), env=env, text=True,
                                      cwd=str(ROOT))

    def run(self, argv: list[str], faults: list[Fault] = (), env: dict[str, str | None] | None = None,
            kwdefaults: dict[str, dict] | None = None, timeout: float = 300) -> RunResult:
        """Run ``train.py argv`` in a fresh child with ``faults`` applied; returns its exit status and output."""
        self._count += 1
        out, err = self.log_dir / f"run{self._count}.out", self.log_dir / f"run{self._count}.err"
        request = RunRequest([str(a) for a in argv], str(out), str(err), [asdict(f) for f in faults], env or {},
                             kwdefaults or {}, timeout)
        if self._proc.poll() is not None:
            raise RuntimeError(f"the fault-injection runner died; see {self.log_dir / 'runner.err'}")
        self._proc.stdin.write(json.dumps(asdict(request)) + "\n")
        self._proc.stdin.flush()
        reply = self._proc.stdout.readline()
        if not reply:
            raise RuntimeError(f"the fault-injection runner died; see {self.log_dir / 'runner.err'}")
        reply = json.loads(reply)
        return RunResult(reply["returncode"], out.read_text(errors="replace"), err.read_text(errors="replace"),
                         reply["timed_out"])

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.close()
            self._proc.wait(timeout=30)

    def __enter__(self) -> "TrainingRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- inside the helper process and its children ------------------------------------------------------------------


def _resolve(target: str) -> tuple[object, str]:
    module_name, _, qualname = target.partition(":")
    owner = importlib.import_module(module_name)
    *parents, attr = qualname.split(".")
    for name in parents:
        owner = getattr(owner, name)
    getattr(owner, attr)  # fail loudly on a typo rather than patching nothing
    return owner, attr


def _wrap(original, fault: Fault):
    calls = 0

    def wrapper(*args, **kwargs):
        nonlocal calls
        calls += 1
        if fault.action == "require_weights_only":
            if kwargs.get("weights_only") is not True:
                raise RuntimeError(f"{fault.target} called without weights_only=True: {args[:1]!r}")
            return original(*args, **kwargs)
        if calls != fault.at_call:
            return original(*args, **kwargs)
        if fault.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if fault.action == "hang":
            while True:
                time.sleep(60)
        if fault.action in ("raise_enospc", "raise_eacces"):
            code = errno.ENOSPC if fault.action == "raise_enospc" else errno.EACCES
            raise OSError(code, os.strerror(code))
        result = original(*args, **kwargs)
        if fault.action == "kill_after":
            os.kill(os.getpid(), signal.SIGKILL)
        return result * float("nan" if fault.action == "nan" else "inf")

    return wrapper


def apply_faults(faults: list[Fault], kwdefaults: dict[str, dict]) -> None:
    """Monkeypatch every fault's target, and update keyword defaults (e.g. shorter Hub retry waits)."""
    for fault in faults:
        owner, attr = _resolve(fault.target)
        setattr(owner, attr, _wrap(getattr(owner, attr), fault))
    for target, defaults in kwdefaults.items():
        owner, attr = _resolve(target)
        getattr(owner, attr).__kwdefaults__.update(defaults)


class FastSleep:
    """Stands in for the ``time`` module inside huggingface_hub's HTTP backoff (1, 2, 4, 8 s): 1/100 of each sleep."""

    def __init__(self, real_time):
        self._time = real_time

    def sleep(self, seconds: float) -> None:
        self._time.sleep(seconds / 100)

    def __getattr__(self, name):
        return getattr(self._time, name)


def _preload() -> None:
    """Import what every run imports, so that forked children start warm."""
    runpy.run_path(TRAIN_SCRIPT, run_name="fault_injection_preload")
    import ddpm_hf
    import datasets  # noqa: F401 - imagefolder runs
    import huggingface_hub.hf_api  # noqa: F401
    from huggingface_hub.utils import _http
    from torch.utils.tensorboard import SummaryWriter  # noqa: F401

    for name in ddpm_hf.__all__:
        getattr(ddpm_hf, name)
    importlib.import_module("ddpm_hf.hub")
    _http.time = FastSleep(_http.time)


def _run_child(request: dict) -> int:
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(handle, fd)
        os.close(handle)
    for name, value in request["env"].items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    sys.argv = [TRAIN_SCRIPT] + request["argv"]
    try:
        apply_faults([Fault(**f) for f in request["faults"]], request["kwdefaults"])
        runpy.run_path(TRAIN_SCRIPT, run_name="__main__")
        return 0
    except SystemExit as exit_:  # what the interpreter does with SystemExit
        if exit_.code is None or isinstance(exit_.code, int):
            return exit_.code or 0
        print(exit_.code, file=sys.stderr)
        return 1
    except BaseException:  # noqa: BLE001 - an uncaught exception: traceback on stderr, status 1
        traceback.print_exc()
        return 1


def serve() -> None:
    """Read requests from stdin; fork a child for each; reply with its exit status."""
    _preload()
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _run_child(request)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        status, timed_out = _wait(pid, request["timeout"], request["stderr"])
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status), "timed_out": timed_out}), flush=True)


def _wait(pid: int, timeout: float, stderr_path: str) -> tuple[int, bool]:
    """The child's wait status, SIGKILLing it (and saying so at the end of its stderr) once ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status, False
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    with open(stderr_path, "a") as err:
        err.write(f"\nfault_injection: the run was still going after {timeout:g} s and was killed\n")
    return status, True


if __name__ == "__main__":
    serve()
