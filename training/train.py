#!/usr/bin/env python
"""Train a DDPM with `accelerate`: `accelerate launch training/train.py [flags | config.json]`.

With no flags it trains the tiny preset on the built-in digits' fixed "train" split (16x16, 1 channel) and writes
a stock-loadable pipeline, a sample grid and a model card to ``./ddpm-digits``; ``--class_conditional true``
trains on the labels with classifier-free guidance. The recipe below is all there is
here; every step is a tested part of `ddpm_hf.training` (docs/training.md says how to reuse them from Python).
"""

from __future__ import annotations

import sys

from ddpm_hf.checkpointing import RunClock
from ddpm_hf.data import build_train_dataset
from ddpm_hf.streaming import build_streaming_dataset
from ddpm_hf.training import (NonFiniteLossError, PeriodicOutputs, PipelineClasses, ThroughputMeter, build_run, finish,
                              log_dataset, parse_args, prepare_output_dir, resume, setup_accelerator, start_pusher,
                              start_trackers, train_loop)
from ddpm_hf.training.interrupts import TrainingInterrupted, lost_peer_message


def main(argv: list[str] | None = None, classes: PipelineClasses | None = None) -> dict:
    """Run training; returns the final metrics (loss, steps, wall time, speed, evaluation).

    Args:
        argv: the flags (default: the command line).
        classes: the network, scheduler and pipeline classes (default: ddpm_hf's drop-ins).
    """
    clock = RunClock()  # the whole run's wall time: checkpointed, so it spans resumes
    data_args, model_args, args = parse_args(sys.argv[1:] if argv is None else argv)
    accelerator = setup_accelerator(args)

    # Data: every process shuffles with the same (seed, epoch) permutation; accelerate shards the batches. A stream
    # (--streaming) is split across processes by build_run.
    build = build_streaming_dataset if data_args.streaming else build_train_dataset
    dataset = build(data_args, seed=args.seed)
    log_dataset(dataset)

    # Network, noise scheduler and its objective, optimiser, LR schedule, EMA, loader.
    run = build_run(accelerator, dataset, data_args, model_args, args, clock, classes)

    # Only now, with data and network validated, touch the output folder (a bad flag leaves nothing behind).
    prepare_output_dir(run)
    resume(run)
    pusher = start_pusher(run)
    start_trackers(run)

    meter = ThroughputMeter(clock.started)
    metrics = train_loop(run, on_step_end=PeriodicOutputs(run, pusher), observers=[meter])
    metrics.update(meter.metrics())

    # Export, grid, evaluation, model card and push.
    return finish(run, metrics, pusher)


if __name__ == "__main__":
    try:
        main()
    except TrainingInterrupted as err:  # SIGINT/SIGTERM: the step in progress was finished and checkpointed
        if err.main_process:
            print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside the training loop: nothing more is saved
        print("error: aborted by Ctrl-C; nothing was saved since the last checkpoint (rerun with "
              "--resume_from_checkpoint latest to continue from it)", file=sys.stderr)
        sys.exit(130)
    except NonFiniteLossError as err:  # a diverged run: the message names the step, the causes and the checkpoint
        sys.exit(f"error: {err}")
    except (ValueError, TypeError) as err:  # bad input: the message names the flag, file or folder
        sys.exit(f"{type(err).__name__}: {err}")
    except RuntimeError as err:  # a collective failed because a peer hung (--ddp_timeout) or died
        message = lost_peer_message(err)
        if message is None:
            raise
        sys.exit(f"error: {message}")
