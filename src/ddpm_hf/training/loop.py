"""The training loop over a `TrainingRun`: the output-folder checks, accumulation groups, the non-finite-loss
policy, logging, checkpoints (by steps, by the clock, and on SIGINT/SIGTERM), periodic exports, and resuming.

Accumulation groups end at every ``--gradient_accumulation_steps``-th micro-batch and at the epoch end, the LR
schedule is stepped once per optimizer step, and the position in the epoch is part of the checkpointed
progress, so a resumed run replays exactly the batches, noise and updates of an uninterrupted one.

Observers (e.g. `ThroughputMeter`) see each optimizer step without being part of the loop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch
from tqdm.auto import tqdm

from ..checkpointing import TrainProgress, data_state_owner, remove_partial, resolve_checkpoint, save_checkpoint
from .args import public_args
from .components import TrainingRun, base_model
from .interrupts import CheckpointTimer, StopRequest, TrainingInterrupted, step_decisions
from .output_folder import check_output_dir, clear_run_outputs, run_identity, run_outputs, write_run_file

logger = logging.getLogger("ddpm_hf.train")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf and --skip_nonfinite_steps was not given."""


class StepObserver(Protocol):
    """Told about every optimizer step; for measurements that are not part of training."""

    def on_train_start(self, step: int) -> None:
        """Before the first step; ``step`` is where the run stands (non-zero after a resume)."""

    def on_step(self, step: int, images: int) -> None:
        """After optimizer step ``step``, which consumed ``images`` images over all processes."""

    def on_train_end(self) -> None:
        """After the last step, before the final checkpoint."""


@dataclass
class _Group:
    """One accumulation group: where it starts, its size, the RNG state before it, its loss and images."""

    start: int
    size: int
    rng_snapshot: tuple[torch.Tensor, torch.Tensor]
    loss_sum: torch.Tensor
    images: int = 0
    taken: int = 0
    grad_norm: torch.Tensor | None = None
    ema_decay: float | None = None
    data_snapshot: dict[str, Any] | None = None


@dataclass
class _LogWindow:
    """Scalars accumulated between two log lines."""

    loss: torch.Tensor
    images: int = 0
    steps: int = 0
    start: float = field(default_factory=time.perf_counter)


# ---- before the loop ---------------------------------------------------------------------------------------------


def prepare_output_dir(run: TrainingRun) -> None:
    """Check ``--output_dir`` against this run, then create it and record the run's identity in it.

    Every process checks first (`ddpm_hf.training.output_folder.check_output_dir`: another run's export or
    checkpoints, a checkpoint of another identity), before anything is written; with ``--overwrite_output_dir``
    the previous run's outputs are removed by name and other files kept. Leftovers of interrupted saves are
    dropped. Called only once data and network are validated, so a bad flag leaves nothing behind.

    Raises:
        ValueError: the folder holds another run (names what and the differing settings).
    """
    args, accelerator = run.args, run.accelerator
    identity = run_identity(run)
    check_output_dir(run, identity)
    accelerator.wait_for_everyone()  # nobody writes before every process has checked
    if accelerator.is_main_process:
        if args.overwrite_output_dir and os.path.isdir(args.output_dir):
            removed = clear_run_outputs(args.output_dir, args.logging_dir)
            kept = sorted(set(os.listdir(args.output_dir)) - set(run_outputs(args.output_dir, args.logging_dir)))
            logger.info("--overwrite_output_dir: removed %s from %s%s", ", ".join(removed) or "nothing",
                        args.output_dir, f"; kept other files: {', '.join(kept)}" if kept else "")
        os.makedirs(args.output_dir, exist_ok=True)
        remove_partial(args.output_dir)
        write_run_file(args.output_dir, identity)
    accelerator.wait_for_everyone()


def resume(run: TrainingRun) -> None:
    """Load ``--resume_from_checkpoint`` (``latest``: the newest complete checkpoint, if any) into the run.

    Raises:
        ValueError: the checkpoint cannot be loaded into this run (names it and the reason).
    """
    args = run.args
    path = resolve_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if path is None:
        if args.resume_from_checkpoint is not None:
            logger.info("No checkpoint in %s yet: starting from scratch", args.output_dir)
        return
    try:
        run.accelerator.load_state(path)
    except (RuntimeError, KeyError, ValueError) as err:  # e.g. another network config: shape mismatch
        raise ValueError(f"cannot resume from {path}: {err}") from err
    progress = run.progress
    logger.info("Resumed from %s at step %d (epoch %d, batch %d)", path, progress.global_step, progress.epoch,
                progress.batches_in_epoch)


def start_trackers(run: TrainingRun) -> None:
    """Start accelerate's trackers (tensorboard, ...) on the main process, with the scalar arguments as config."""
    if run.accelerator.is_main_process:
        config = public_args(run.data_args, run.model_args, run.args)
        run.accelerator.init_trackers("train", config={k: v for k, v in config.items()
                                                       if isinstance(v, (int, float, str, bool))})


# ---- the loop ----------------------------------------------------------------------------------------------------


def train_loop(run: TrainingRun, on_step_end: Callable[[int, dict[str, Any]], None] | None = None,
               observers: Sequence[StepObserver] = ()) -> dict[str, Any]:
    """Train until ``run.max_steps`` optimizer steps, then save the final checkpoint (every process calls this).

    Args:
        run: the run, possibly resumed.
        on_step_end: ``on_step_end(step, metrics)``, called after each optimizer step's logging and checkpoint
            (the periodic exports hang here); None for none.
        observers: told about the start, each optimizer step and the end.

    Checkpoints are saved every ``--checkpointing_steps`` steps, when ``--checkpointing_minutes`` have passed
    since the last one (by the main process's clock), and at the end. SIGINT/SIGTERM end the loop after the
    current optimizer step with a checkpoint.

    Returns:
        The metrics: ``train_loss`` (the last logged mean), ``global_step``, ``wall_time_minutes`` (the whole run
        so far), ``skipped_nonfinite_steps``, ``num_processes``, and ``skipped_unreadable_images`` (all processes)
        where the dataset counts the images it skips as it reads (a stream, a lazy dataset).

    Raises:
        NonFiniteLossError: a non-finite loss without ``--skip_nonfinite_steps`` (after checkpointing the last
            good state).
        TrainingInterrupted: SIGINT/SIGTERM, after checkpointing the step in progress (says how to resume).
    """
    progress, metrics = run.progress, {}
    bar = tqdm(total=run.max_steps, initial=progress.global_step,
               disable=not run.accelerator.is_local_main_process, desc="train")
    window = _LogWindow(torch.zeros((), device=run.accelerator.device))
    timer = CheckpointTimer(run.args.checkpointing_minutes)
    _warn_if_warmup_never_ends(run)
    for observer in observers:
        observer.on_train_start(progress.global_step)
    run.model.train()
    with StopRequest() as stop:
        while progress.global_step < run.max_steps:
            for group in _groups(run):
                window.images += group.images  # skipped steps' images count too: they took the time
                finite, stopping, due = step_decisions(run.accelerator, group.loss_sum, stop.requested,
                                                       timer.due() and run.accelerator.is_main_process)
                stepped = _optimizer_step(run, group, finite)
                if stepped:
                    _report_step(run, window, group, bar, metrics, observers)
                step = progress.global_step
                periodic = stepped and (step % run.args.checkpointing_steps == 0 or due)
                if stopping or (periodic and step < run.max_steps):
                    _save(run, step, timer)
                if stopping:
                    bar.close()
                    _interrupted(run, stop.signum or signal.SIGTERM, step)  # another rank's signal: SIGTERM's code
                if stepped and on_step_end is not None:
                    on_step_end(step, metrics)
                if step >= run.max_steps:
                    break
        for observer in observers:
            observer.on_train_end()
        bar.close()
        _save(run, progress.global_step, timer)  # still inside: a signal now stops before the export
        if stop.requested:
            _interrupted(run, stop.signum, progress.global_step)
    skipped = _skipped_images(run)
    if skipped is not None:
        metrics["skipped_unreadable_images"] = skipped
        if skipped:
            logger.warning("Skipped %d unreadable image(s) while training", skipped)
    metrics.update(global_step=progress.global_step, wall_time_minutes=run.clock.total_s() / 60,
                   skipped_nonfinite_steps=progress.skipped_nonfinite, num_processes=run.accelerator.num_processes)
    return metrics


def _epoch_batches(run: TrainingRun) -> Iterator[Any]:
    """The rest of this epoch's map-style batches, from where the progress stands."""
    progress, loader = run.progress, run.dataloader
    if progress.batches_in_epoch:
        loader = run.accelerator.skip_first_batches(run.dataloader, progress.batches_in_epoch)
    loader.set_epoch(progress.epoch)  # sampler permutation and augmentation of this epoch
    yield from loader


def _stream_batches(run: TrainingRun) -> Iterator[torch.Tensor]:
    """A stream's batches from its checkpointed position on, epoch after epoch (without end: the loop stops at
    ``max_steps``); ``run.progress`` mirrors the epoch and its batches for the log.

    Raises:
        ValueError: an epoch from its start gave no readable image (names the source).
    """
    dataset, progress, device = run.dataset, run.progress, run.accelerator.device
    while True:
        from_start, any_images = dataset.position == 0, False
        progress.epoch, progress.batches_in_epoch = dataset.epoch, -(-dataset.position // dataset.batch_size)
        for item in run.dataloader:
            dataset.advance(item)  # consumer side: what a checkpoint after this batch's step must skip
            if item.images is not None:
                any_images = True
                yield item.images.to(device, non_blocking=True)
        if from_start and not any_images:
            raise ValueError(f"{dataset.source}: epoch {dataset.epoch} of process {dataset.rank} gave no readable "
                             f"image ({dataset.num_skipped_seen} unreadable so far)")
        dataset.next_epoch()


def _groups(run: TrainingRun) -> Iterator[_Group]:
    """Accumulation groups from where the progress stands, each yielded after its backward passes: to this epoch's
    end (map-style; the last group may be short), or without end for a stream (groups run across epoch ends)."""
    progress, accelerator, accum = run.progress, run.accelerator, run.args.gradient_accumulation_steps
    streaming = run.batches_per_epoch is None
    batches = _stream_batches(run) if streaming else _epoch_batches(run)
    # Only a stream's position must be rewound after a non-finite loss; a map-style dataset's skip count is
    # idempotent under the replay, and its state (O(images)) must not be copied on every step.
    owner = data_state_owner(run.dataset) if streaming else None
    data_snapshot = owner.state_dict() if owner is not None else None
    group = None
    for batch in batches:
        if group is None:
            index = progress.batches_in_epoch
            start = index if streaming else index - index % accum
            # Enough to rewind to the end of the last good step if this one turns out non-finite.
            group = _Group(start, accum if streaming else min(accum, run.batches_per_epoch - start),
                           (run.generator.get_state(), torch.get_rng_state()),
                           torch.zeros((), device=accelerator.device), data_snapshot=data_snapshot)
        group.taken += 1
        last_in_group = group.taken == group.size
        with contextlib.nullcontext() if last_in_group else accelerator.no_sync(run.model):
            # Unconditional: labels in run.dataset.info are recorded, not used (they will be class_labels here).
            loss = run.objective.loss(run.model, batch, run.generator, model_kwargs={})
            accelerator.backward(loss / group.size)
        group.loss_sum += loss.detach() / group.size
        progress.batches_in_epoch += 1
        group.images += batch.shape[0] * accelerator.num_processes
        if last_in_group:
            yield group
            group = None
            data_snapshot = owner.state_dict() if owner is not None else None


def _warn_if_warmup_never_ends(run: TrainingRun) -> None:
    """A run no longer than its LR warmup never trains at ``--learning_rate`` (its samples stay noise): say so."""
    args = run.args
    if args.lr_scheduler == "constant" or args.lr_warmup_steps < run.max_steps or not run.accelerator.is_main_process:
        return  # diffusers' "constant" schedule has no warmup
    logger.warning("--lr_warmup_steps %d is not below the run's %d optimizer steps: the learning rate never reaches "
                   "--learning_rate %g (it ends at %.3g). Lower --lr_warmup_steps (e.g. to %d) or train longer",
                   args.lr_warmup_steps, run.max_steps, args.learning_rate,
                   args.learning_rate * run.max_steps / max(args.lr_warmup_steps, 1), max(run.max_steps // 10, 1))


def _save(run: TrainingRun, step: int, timer: CheckpointTimer | None = None) -> str:
    """Checkpoint ``step`` with the run's identity in its marker (restarting the checkpoint clock)."""
    path = save_checkpoint(run.accelerator, run.args.output_dir, step, run.args.checkpoints_total_limit,
                           identity=run_identity(run))
    if timer is not None:
        timer.reset()
    return path


def _interrupted(run: TrainingRun, signum: int, step: int) -> None:
    """Raise `TrainingInterrupted`: where the checkpoint is and how to resume."""
    name = signal.Signals(signum).name
    path = os.path.join(run.args.output_dir, f"checkpoint-{step}")
    raise TrainingInterrupted(signum, f"interrupted by {name} after optimizer step {step} of {run.max_steps}: "
                              f"saved {path}. To continue, rerun with the same flags plus "
                              "--resume_from_checkpoint latest", main_process=run.accelerator.is_main_process)


def _optimizer_step(run: TrainingRun, group: _Group, finite: bool) -> bool:
    """Clip, step the optimizer, LR schedule and EMA; False when a non-finite loss was skipped instead.

    Args:
        run: the run.
        group: the accumulation group whose gradients are ready.
        finite: whether the loss was finite on every process (`step_decisions`).
    """
    accelerator, progress = run.accelerator, run.progress
    if not finite:
        run.optimizer.zero_grad(set_to_none=True)
        if not run.args.skip_nonfinite_steps:
            _stop_on_nonfinite(run, group)
        progress.skipped_nonfinite += 1
        logger.warning("Non-finite loss at step %d: update skipped (%d skipped so far)", progress.global_step + 1,
                       progress.skipped_nonfinite)
        _finish_epoch_if_done(progress, run.batches_per_epoch)
        return False
    max_norm = run.args.max_grad_norm
    group.grad_norm = accelerator.clip_grad_norm_(run.model.parameters(), max_norm) if max_norm else None
    run.optimizer.step()
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    group.ema_decay = run.ema.update(base_model(accelerator, run.model).parameters()) if run.ema else None
    progress.global_step += 1
    _finish_epoch_if_done(progress, run.batches_per_epoch)
    return True


def _report_step(run: TrainingRun, window: _LogWindow, group: _Group, bar: tqdm, metrics: dict,
                 observers: Sequence[StepObserver]) -> None:
    """Tell the progress bar, the observers and the log about the optimizer step just taken."""
    bar.update(1)
    for observer in observers:
        observer.on_step(run.progress.global_step, group.images)
    _log_step(run, window, group, bar, metrics)


def _log_step(run: TrainingRun, window: _LogWindow, group: _Group, bar: tqdm, metrics: dict) -> None:
    """Accumulate the step's loss; every ``--logging_steps`` (and at the end) log the window's means."""
    step = run.progress.global_step
    window.loss += group.loss_sum
    window.steps += 1
    if step % run.args.logging_steps and step != run.max_steps:
        return
    elapsed = time.perf_counter() - window.start
    scalars = {"loss": run.accelerator.reduce(window.loss, "mean").item() / window.steps,
               "lr": run.lr_scheduler.get_last_lr()[0], "images_per_sec": window.images / max(elapsed, 1e-9)}
    if group.grad_norm is not None:
        scalars["grad_norm"] = float(group.grad_norm)
    if group.ema_decay is not None:
        scalars["ema_decay"] = group.ema_decay
    skipped = _skipped_images(run)
    if skipped is not None:
        scalars["skipped_unreadable_images"] = metrics["skipped_unreadable_images"] = skipped
    run.accelerator.log(scalars, step=step)
    bar.set_postfix(loss=f"{scalars['loss']:.4f}", lr=f"{scalars['lr']:.2e}")
    metrics["train_loss"] = scalars["loss"]
    window.loss.zero_()
    window.images, window.steps, window.start = 0, 0, time.perf_counter()


def _skipped_images(run: TrainingRun) -> int | None:
    """Unreadable images skipped so far by all processes (the dataset's ``num_skipped_seen``, summed: one small
    collective, at logging steps and the end only); None when the dataset does not count them as it reads."""
    counter = data_state_owner(run.dataset)
    if not hasattr(counter, "num_skipped_seen"):
        return None
    count = torch.tensor(int(counter.num_skipped_seen), device=run.accelerator.device)
    return int(run.accelerator.reduce(count, "sum").item())


def _finish_epoch_if_done(progress: TrainProgress, batches_per_epoch: int | None) -> None:
    """Move to the next epoch once all its batches are consumed (checkpoints then resume at its start); a stream
    (None) moves on when it ends."""
    if batches_per_epoch is not None and progress.batches_in_epoch == batches_per_epoch:
        progress.epoch, progress.batches_in_epoch = progress.epoch + 1, 0


def _stop_on_nonfinite(run: TrainingRun, group: _Group) -> None:
    """Rewind to the end of the last good step, checkpoint it, and raise with the step and likely causes."""
    progress = run.progress
    run.generator.set_state(group.rng_snapshot[0])
    torch.set_rng_state(group.rng_snapshot[1])
    progress.batches_in_epoch = group.start
    if group.data_snapshot is not None:
        data_state_owner(run.dataset).load_state_dict(group.data_snapshot)
    saved = None
    if progress.global_step > 0:
        saved = _save(run, progress.global_step)
    raise NonFiniteLossError(
        f"loss is {group.loss_sum.item()} at optimizer step {progress.global_step + 1} (epoch {progress.epoch}, "
        f"batch {group.start}). Likely causes: a learning rate too high for this model (--learning_rate), "
        "fp16 overflow (try --mixed_precision bf16 or no), NaN/inf in the input data, or a --snr_gamma / "
        "--prediction_type combination that divides by a zero SNR. "
        + (f"The last good state is saved as {saved}: --resume_from_checkpoint latest --skip_nonfinite_steps true "
           "continues from it skipping such steps (a checkpoint resumes only under the settings that wrote it, so "
           "after changing --learning_rate, the precision or the data, start a new run with "
           "--overwrite_output_dir true or another --output_dir)."
           if saved else "No step had completed, so there is nothing to save; fix the cause, or pass "
           "--skip_nonfinite_steps to skip such steps.")
    )


# ---- measurement -------------------------------------------------------------------------------------------------


class ThroughputMeter:
    """Time to the first optimizer step and images/s after ``warmup_steps`` steps (allocator and caches warm).

    Args:
        started: the ``clock()`` reading the time to first step counts from.
        warmup_steps: steps left out of the images/s figure.
        clock: seconds, monotonic (``time.perf_counter``).
    """

    def __init__(self, started: float, warmup_steps: int = 5, clock: Callable[[], float] = time.perf_counter):
        self.started = started
        self.clock = clock
        self.warmup_steps = warmup_steps
        self.first_step = 0
        self.time_to_first_step: float | None = None
        self.warm_start: float | None = None
        self.warm_images = 0
        self.end: float | None = None

    def on_train_start(self, step: int) -> None:
        """Count the warm-up from ``step`` (a resumed run warms up again)."""
        self.first_step = step

    def on_step(self, step: int, images: int) -> None:
        """Log the time to the first step; count images once warmed up."""
        now = self.clock()
        if self.time_to_first_step is None:
            self.time_to_first_step = now - self.started
            logger.info("Time to first step: %.2f s", self.time_to_first_step)
        if step == self.first_step + self.warmup_steps:
            self.warm_start, self.warm_images = now, 0
        elif self.warm_start is not None:
            self.warm_images += images

    def on_train_end(self) -> None:
        """Stop the images/s clock."""
        self.end = self.clock()

    def metrics(self) -> dict[str, float]:
        """``time_to_first_step_s`` and ``images_per_sec``, where measured."""
        out = {}
        if self.time_to_first_step is not None:
            out["time_to_first_step_s"] = self.time_to_first_step
        if self.warm_start is not None and self.warm_images:
            out["images_per_sec"] = self.warm_images / (self.end - self.warm_start)
        return out
