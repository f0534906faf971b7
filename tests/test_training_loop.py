"""Parts of `ddpm_hf.training.loop` on their own: the throughput observer."""

from ddpm_hf.training import ThroughputMeter


def test_throughput_meter_counts_after_warmup_only():
    """Time to first step from the start; images/s over the steps after the warm-up (a resumed run warms up again)."""
    now = [10.0]
    meter = ThroughputMeter(started=10.0, warmup_steps=2, clock=lambda: now[0])
    meter.on_train_start(4)  # resumed at step 4
    for step, seconds in zip(range(5, 10), (3.0, 1.0, 0.5, 0.5, 0.5)):
        now[0] += seconds
        meter.on_step(step, images=64)
    meter.on_train_end()
    # first step after 3 s; the clock starts at step 6 (4 + 2), then steps 7, 8, 9 bring 3 * 64 images in 1.5 s
    assert meter.metrics() == {"time_to_first_step_s": 3.0, "images_per_sec": 3 * 64 / 1.5}


def test_run_clock_adds_the_checkpointed_time_to_this_session():
    from ddpm_hf.checkpointing import RunClock

    clock = RunClock()
    clock.resume_from(100.0)
    session = clock.session_s()
    assert 100.0 + session <= clock.total_s() <= 100.0 + clock.session_s()


def test_the_parts_assemble_into_a_run_with_observers(tmp_path):
    """The loop reused from Python as docs/training.md shows: an observer sees every optimizer step and its images."""
    from test_training import tiny_flags, train_state_reset

    from ddpm_hf.checkpointing import RunClock
    from ddpm_hf.data import build_train_dataset
    from ddpm_hf.training import build_run, finish, parse_args, prepare_output_dir, resume, setup_accelerator, train_loop

    class Recorder:
        def __init__(self):
            self.events = []

        def on_train_start(self, step):
            self.events.append(("start", step))

        def on_step(self, step, images):
            self.events.append((step, images))

        def on_train_end(self):
            self.events.append(("end",))

    try:
        clock = RunClock()
        data_args, model_args, args = parse_args(tiny_flags(tmp_path, max_train_steps=3, train_batch_size=100))
        accelerator = setup_accelerator(args)
        run = build_run(accelerator, build_train_dataset(data_args, seed=args.seed), data_args, model_args, args,
                        clock)
        prepare_output_dir(run)
        resume(run)
        recorder, ends = Recorder(), []
        metrics = train_loop(run, on_step_end=lambda step, m: ends.append(step), observers=[recorder])
        finish(run, metrics)
    finally:
        train_state_reset()
    assert recorder.events == [("start", 0), (1, 100), (2, 100), (3, 100), ("end",)]
    assert ends == [1, 2, 3] and metrics["global_step"] == 3
    assert (tmp_path / "out" / "model_index.json").is_file() and (tmp_path / "out" / "checkpoint-3").is_dir()


def test_a_signal_at_the_last_step_stops_after_the_final_checkpoint_before_the_export(tmp_path):
    """SIGTERM while the last step's hook runs: the final checkpoint is written, then the loop stops (no export,
    which can take minutes), status 143, and the previous handler is back."""
    import signal

    import pytest
    from test_training import tiny_flags, train_state_reset

    from ddpm_hf.checkpointing import RunClock, list_checkpoints
    from ddpm_hf.data import build_train_dataset
    from ddpm_hf.training import build_run, parse_args, prepare_output_dir, setup_accelerator, train_loop
    from ddpm_hf.training.interrupts import TrainingInterrupted

    def on_step_end(step, metrics):
        if step == 3:
            signal.raise_signal(signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    try:
        data_args, model_args, args = parse_args(tiny_flags(tmp_path, max_train_steps=3, train_batch_size=100))
        accelerator = setup_accelerator(args)
        run = build_run(accelerator, build_train_dataset(data_args, seed=args.seed), data_args, model_args, args,
                        RunClock())
        prepare_output_dir(run)
        with pytest.raises(TrainingInterrupted, match="interrupted by SIGTERM after optimizer step 3 of 3") as caught:
            train_loop(run, on_step_end=on_step_end)
    finally:
        train_state_reset()
    assert caught.value.exit_code == 143
    assert [step for step, _ in list_checkpoints(str(tmp_path / "out"))] == [3]
    assert not (tmp_path / "out" / "model_index.json").exists()
    assert signal.getsignal(signal.SIGTERM) == before
