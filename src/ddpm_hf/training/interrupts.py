"""Stopping cleanly: SIGINT/SIGTERM end the run after the current optimizer step with a checkpoint,
``--checkpointing_minutes`` saves by the clock, and a lost peer process is reported in one line.

The loop asks both at every optimizer step; under several processes the answers are combined in the one
reduction it already does for the finiteness of the loss (`step_decisions`), so every rank stops, or saves,
after the same step and no extra collective is added.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Any, Callable

import torch

logger = logging.getLogger("ddpm_hf.train")

# A copy of the same Ctrl-C forwarded by a launcher (torch elastic sends its own SIGINT to the workers) arrives
# within milliseconds; a person pressing Ctrl-C again takes longer.
_REPEAT_AFTER_S = 1.0


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM stopped the run after a checkpoint was saved.

    Args:
        signum: the signal received.
        message: what happened and how to resume.
        main_process: whether this process is the one that reports it.
    """

    def __init__(self, signum: int, message: str, main_process: bool = True):
        super().__init__(message)
        self.signum = signum
        self.main_process = main_process

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as a shell reports a process ended by it (130 SIGINT, 143 SIGTERM)."""
        return 128 + self.signum


# What gloo and NCCL say when a peer process stopped answering (--ddp_timeout passed) or went away.
_PEER_LOST = ("Timed out waiting", "Connection closed by peer", "Connection reset by peer", "Broken pipe",
              "Watchdog caught collective operation timeout")


def lost_peer_message(err: BaseException) -> str | None:
    """The one-line report of a collective that failed because another process of the run hung or died, or
    None when ``err`` is something else.

    Args:
        err: an exception raised by the training loop.
    """
    text = str(err)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not distributed or not isinstance(err, RuntimeError) or not any(marker in text for marker in _PEER_LOST):
        return None  # e.g. a "Broken pipe" of a one-process run is not about a peer
    detail = text.strip().splitlines()[-1]  # non-empty: it holds a marker
    return (f"another process of this run stopped answering or died ({detail}); its own log says why. The saved "
            f"checkpoints are intact: rerun with --resume_from_checkpoint latest (--ddp_timeout sets how long a "
            f"process waits for the others)")


class StopRequest:
    """While entered (main thread only), the first SIGINT or SIGTERM asks the loop to stop after the current
    optimizer step; a second SIGINT at least a second later raises KeyboardInterrupt at once (no checkpoint).

    Args:
        clock: monotonic seconds (to tell a second Ctrl-C from a forwarded copy of the first).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.signum: int | None = None
        self._clock = clock
        self._received_at = 0.0
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        """Whether a stop was asked for."""
        return self.signum is not None

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # signal.signal works only there
            self._previous = {s: signal.signal(s, self.handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def handle(self, signum: int, frame: object = None) -> None:
        """The signal handler: record the first signal; abort on a repeated SIGINT."""
        now = self._clock()
        if self.signum is None:
            self.signum, self._received_at = signum, now
            logger.warning("Received %s: finishing the current optimizer step, then saving a checkpoint "
                           "(press Ctrl-C again to abort at once without saving)", signal.Signals(signum).name)
        elif signum == signal.SIGINT and now - self._received_at >= _REPEAT_AFTER_S:
            raise KeyboardInterrupt


class CheckpointTimer:
    """Whether ``minutes`` have passed since the last checkpoint (or the start); None: never.

    Args:
        minutes: ``--checkpointing_minutes``.
        clock: monotonic seconds.
    """

    def __init__(self, minutes: float | None, clock: Callable[[], float] = time.monotonic):
        self.interval_s = None if minutes is None else minutes * 60
        self._clock = clock
        self._last = clock()

    def due(self) -> bool:
        """Whether a checkpoint is due by the clock."""
        return self.interval_s is not None and self._clock() - self._last >= self.interval_s

    def reset(self) -> None:
        """A checkpoint was just saved."""
        self._last = self._clock()


def step_decisions(accelerator: Any, loss_sum: torch.Tensor, stop: bool, checkpoint_due: bool
                   ) -> tuple[bool, bool, bool]:
    """What every process does after this step: ``(loss finite everywhere, stop, save a checkpoint)``.

    One sum-reduction of three flags when there are several processes (the finiteness check needed it
    anyway); a rank's stop request or the main process's clock then decides for all.

    Args:
        accelerator: the run's accelerator.
        loss_sum: this process's loss of the step.
        stop: whether this process was asked to stop.
        checkpoint_due: whether this process's clock says a checkpoint is due (pass False except on the main one).
    """
    bad = ~torch.isfinite(loss_sum.detach()).reshape(1)
    if accelerator.num_processes == 1:
        return not bool(bad.item()), stop, checkpoint_due
    local = torch.tensor([float(stop), float(checkpoint_due)]).to(loss_sum.device, non_blocking=True)
    flags = accelerator.reduce(torch.cat([bad.float(), local]), "sum")
    bad_any, stop_any, due_any = (flags > 0).tolist()
    return not bad_any, stop_any, due_any
