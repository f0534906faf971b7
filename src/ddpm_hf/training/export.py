"""What a run leaves behind: the stock-loadable export folder, the sample grid, the model card, the evaluation
and the Hub push, written periodically and at the end (main process only).

The export is written to ``.export.partial/`` and swapped in entry by entry, ``model_index.json`` last, so a
reader that sees it sees complete component folders. ``unet/`` holds the EMA weights (the raw ones without
EMA), ``unet_raw/`` the trained ones.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import shutil
import time
from typing import Any, Iterator

import numpy as np
import torch
from diffusers.utils import make_image_grid
from PIL import Image, ImageOps

from . import loss_history
from .args import public_args
from .components import TrainingRun, base_model
from .evaluation import evaluate_run

logger = logging.getLogger("ddpm_hf.train")
GRID_FILENAME = "samples.png"
GRID_PER_CLASS = 8  # a class-conditional grid: one row of this many samples per class


def build_pipeline(run: TrainingRun) -> Any:
    """A pipeline on the EMA weights (or the raw ones without EMA); the training model is not touched."""
    unet = copy.deepcopy(base_model(run.accelerator, run.model)).float().eval()
    if run.ema is not None:
        run.ema.copy_to(unet.parameters())
    return run.classes.pipeline(unet=unet, scheduler=run.noise_scheduler, **label_kwargs(run))


def label_kwargs(run: TrainingRun) -> dict[str, Any]:
    """The pipeline's class names, ``{"id2label": {id: name}}``, for a class-conditional run; else nothing."""
    if not run.data_args.class_conditional:
        return {}
    return {"id2label": dict(enumerate(run.dataset.info.class_names))}


def save_export(run: TrainingRun, pipeline: Any) -> None:
    """Write the stock-loadable pipeline (EMA unet) and ``unet_raw/``, swapping each entry in atomically."""
    output_dir = run.args.output_dir
    staging = os.path.join(output_dir, ".export.partial")
    shutil.rmtree(staging, ignore_errors=True)
    pipeline.save_pretrained(staging)
    if run.ema is not None:
        base_model(run.accelerator, run.model).save_pretrained(os.path.join(staging, "unet_raw"))
    # model_index.json last: a reader that sees it sees complete component folders.
    names = sorted(os.listdir(staging), key=lambda n: n == "model_index.json")
    for name in names:
        target = os.path.join(output_dir, name)
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(os.path.join(staging, name), target)
    shutil.rmtree(staging, ignore_errors=True)


def sampling_pipeline(run: TrainingRun, pipeline: Any) -> Any:
    """The exported pipeline with the --grid_sampler scheduler (DDIM shares the DDPM config's betas)."""
    if run.model_args.grid_sampler == "ddpm":
        return pipeline
    scheduler = run.classes.ddim_scheduler.from_config(pipeline.scheduler.config)
    sampler = type(pipeline)(unet=pipeline.unet, scheduler=scheduler, **label_kwargs(run))
    sampler.set_progress_bar_config(disable=True)
    return sampler


def sample_grid(pipeline: Any, num_inference_steps: int, num_images: int, seed: int, cols: int | None = None,
                **call_kwargs: Any) -> Image.Image:
    """Sample a grid with a fixed generator (the same noise every time, so grids compare across steps).

    Args:
        pipeline: the sampling pipeline.
        num_inference_steps: sampling steps.
        num_images: samples in the grid.
        seed: the generator's seed.
        cols: tiles per row (default: near-square).
        call_kwargs: further pipeline arguments (``class_labels``, ``guidance_scale``).

    Returns:
        The grid.
    """
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with torch.inference_mode():
        images = pipeline(batch_size=num_images, generator=generator, num_inference_steps=num_inference_steps,
                          output_type="np", **call_kwargs).images
    return make_grid(np.asarray(images), cols=cols)


def grid_request(run: TrainingRun) -> dict[str, Any]:
    """What the run's grid samples: ``--eval_batch_size`` images, or for a class-conditional run one row of
    `GRID_PER_CLASS` per class (row k = class k) guided at ``--guidance_scale``; `sample_grid`'s arguments."""
    if not run.data_args.class_conditional:
        return {"num_images": run.args.eval_batch_size}
    num_classes = len(run.dataset.info.class_names)
    return {"num_images": num_classes * GRID_PER_CLASS, "cols": GRID_PER_CLASS,
            "class_labels": torch.arange(num_classes).repeat_interleave(GRID_PER_CLASS),
            "guidance_scale": run.model_args.guidance_scale}


def make_grid(images: np.ndarray, min_tile: int = 64, cols: int | None = None) -> Image.Image:
    """Tile ``(N, H, W, C)`` images in [0, 1] row by row into a grid (diffusers' ``make_image_grid``), with one
    pixel of white between tiles, upscaled so tiles are visible.

    Args:
        images: the images.
        min_tile: the grid is upscaled (nearest) by an integer factor so tiles have at least this many pixels.
        cols: tiles per row (default: a near-square grid).

    Returns:
        The grid (grey for one channel, else RGB); a short last row is filled with white tiles.
    """
    n, h, w, c = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    pixels = (images.clip(0, 1) * 255).round().astype(np.uint8)
    tiles = [Image.fromarray(p[:, :, 0] if c == 1 else p) for p in pixels]
    tiles += [Image.new(tiles[0].mode, (w, h), "white")] * (rows * cols - n)
    # make_image_grid has no spacing: each tile gets a white pixel above and left of it, the grid one right/below.
    tiles = [ImageOps.expand(t, border=(1, 1, 0, 0), fill="white") for t in tiles]
    grid = ImageOps.expand(make_image_grid(tiles, rows=rows, cols=cols), border=(0, 0, 1, 1), fill="white")
    grid = grid.convert("L") if c == 1 else grid  # make_image_grid pastes onto RGB
    scale = max(1, min_tile // h)
    return grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)


def log_grid(run: TrainingRun, grid: Image.Image, step: int) -> None:
    """Send the sample grid to the run's trackers as image ``samples`` at ``step`` (as diffusers' example does)."""
    for tracker in run.accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({"samples": np.asarray(grid.convert("RGB"))[None]}, step=step, dataformats="NHWC")
        elif hasattr(tracker, "log_images"):  # wandb and the others take a list of PIL images
            tracker.log_images({"samples": [grid]}, step=step)


def repo_id(run: TrainingRun) -> str:
    """The Hub repo: ``--hub_model_id``, else the output folder's name."""
    return run.args.hub_model_id or os.path.basename(os.path.abspath(run.args.output_dir))


# ---- the card ---------------------------------------------------------------------------------------------------


def write_card(run: TrainingRun, metrics: dict[str, Any], evaluation: Any = None, loss_plot: str | None = None) -> str:
    """The model card ``README.md`` from the run's facts (`ddpm_hf.model_card.RunFacts`); returns its path."""
    from ..model_card import GridFacts, RunFacts, write_model_card

    info, args, model_args = run.dataset.info, run.args, run.model_args
    conditional = run.data_args.class_conditional
    grid = GridFacts(filename=GRID_FILENAME, sampler=model_args.grid_sampler.upper(),
                     num_inference_steps=model_args.ddpm_num_inference_steps,
                     weights="EMA" if run.ema is not None else "raw", seed=args.seed,
                     guidance_scale=model_args.guidance_scale if conditional else None)
    facts = RunFacts(training_args=public_args(run.data_args, model_args, args), dataset_name=info.name,
                     dataset_is_local=info.is_local, train_split=info.split, global_step=run.progress.global_step,
                     wall_time_s=run.clock.total_s(), license=args.license,
                     repo_id=repo_id(run) if args.push_to_hub else None, grid=grid, metrics=metrics,
                     evaluation=evaluation, class_names=info.class_names if conditional else None,
                     loss_plot=loss_plot)
    return write_model_card(args.output_dir, facts)


def write_outputs(run: TrainingRun, metrics: dict[str, Any], pusher: Any = None, final: bool = False) -> None:
    """Export, grid, model card (and on the final call, evaluation), then an async push. Main process only.

    Args:
        run: the run.
        metrics: training statistics so far; the final call adds the evaluation results to it.
        pusher: a `ddpm_hf.hub.HubPusher` to push the export with, or None.
        final: whether this is the end of training.
    """
    pipeline = build_pipeline(run)
    sampler = sampling_pipeline(run, pipeline)
    evaluation = None
    if final and run.args.eval:
        with phase(f"Evaluation (--eval: {run.args.eval_num_samples} samples)"):
            evaluation = evaluate_run(run, sampler, pipeline)
        metrics.update(evaluation.results)
    with phase(f"Export to {run.args.output_dir}"):
        save_export(run, pipeline)
    steps = run.model_args.ddpm_num_inference_steps
    with phase(f"Sample grid ({run.model_args.grid_sampler.upper()}, {steps} steps)"):
        grid = sample_grid(sampler, steps, seed=run.args.seed, **grid_request(run))
        grid.save(os.path.join(run.args.output_dir, GRID_FILENAME))
    log_grid(run, grid, run.progress.global_step)
    plotted = loss_history.plot_history(loss_history.read_history(run.args.output_dir),
                                        os.path.join(run.args.output_dir, loss_history.PLOT_FILENAME))
    metrics["wall_time_minutes"] = run.clock.total_s() / 60  # the card's time includes this export
    write_card(run, metrics, evaluation, loss_history.PLOT_FILENAME if plotted else None)
    if pusher is not None:
        pusher.push(f"Step {run.progress.global_step}" + (" (final)" if final else ""))


@contextlib.contextmanager
def phase(what: str) -> Iterator[None]:
    """Log ``what`` as it starts and, with its duration, as it ends (these steps take seconds to minutes)."""
    logger.info("%s ...", what)
    started = time.perf_counter()
    yield
    logger.info("%s done in %.1f s", what, time.perf_counter() - started)


class PeriodicOutputs:
    """The ``on_step_end`` hook of `train_loop`: the loss history at every logging step, grids and exports every
    ``--save_images_steps`` / ``--save_model_steps`` steps (the export is pushed only at ``--save_model_steps``),
    on the main process.

    Args:
        run: the run, resumed already (its history past the resumed step is dropped: those steps are replayed).
        pusher: the Hub pusher, or None.
    """

    def __init__(self, run: TrainingRun, pusher: Any = None):
        self.run = run
        self.pusher = pusher
        if run.accelerator.is_main_process:
            loss_history.truncate_history(run.args.output_dir, run.progress.global_step)

    def __call__(self, step: int, metrics: dict[str, Any]) -> None:
        args = self.run.args
        logged = step % args.logging_steps == 0 or step == self.run.max_steps  # the loop's logging steps
        if self.run.accelerator.is_main_process and logged and "train_loss" in metrics:
            loss_history.append_loss(args.output_dir, step, metrics["train_loss"])
        periodic_images = args.save_images_steps and step % args.save_images_steps == 0
        periodic_model = args.save_model_steps and step % args.save_model_steps == 0
        if self.run.accelerator.is_main_process and step < self.run.max_steps and (periodic_images or periodic_model):
            metrics.update(global_step=step, wall_time_minutes=self.run.clock.total_s() / 60)
            write_outputs(self.run, metrics, self.pusher if periodic_model else None, final=False)


# ---- the Hub and the end of the run ------------------------------------------------------------------------------


def start_pusher(run: TrainingRun) -> Any:
    """With ``--push_to_hub``, on the main process: a `ddpm_hf.hub.HubPusher` whose repo is created now (a bad
    token or repo id fails the run before training); else None."""
    if not (run.args.push_to_hub and run.accelerator.is_main_process):
        return None
    from .. import hub  # attribute access at call time: tests stand a fake pusher in for hub.HubPusher

    pusher = hub.HubPusher(repo_id(run), run.args.hub_token, run.args.hub_private_repo, run.args.output_dir)
    pusher.create(retry=False)  # one try: an unreachable Hub must not hold up the start (each push retries)
    return pusher


def finish(run: TrainingRun, metrics: dict[str, Any], pusher: Any = None) -> dict[str, Any]:
    """The final export, grid, card, evaluation and push (main process), then end the trackers.

    Returns:
        ``metrics`` with the evaluation results.

    Raises:
        SystemExit: the final push failed (the local export is intact; the log holds the command to push it).
    """
    pushed = True
    if run.accelerator.is_main_process:
        write_outputs(run, metrics, pusher, final=True)
        pushed = pusher.wait() if pusher is not None else True
        logger.info("Done: %s", metrics)
    run.accelerator.end_training()
    if not pushed:
        raise SystemExit(f"training finished and the export is in {run.args.output_dir}, but the final push failed "
                         "(see the log above for the command to push it by hand)")
    return metrics
