#!/usr/bin/env python
"""Train an unconditional DDPM with `accelerate`: `accelerate launch training/train.py [flags | config.json]`.

With no flags it trains the tiny preset on the built-in sklearn digits (16x16, 1 channel) and writes a
stock-loadable pipeline, sample grids and a model card to ``./ddpm-digits``. Read top to bottom:
arguments -> accelerator -> data -> model -> optimiser -> (resume) -> loop -> export.

Where diffusers' ``train_unconditional.py`` goes wrong, this script does not (see docs/training.md): the LR
schedule counts optimizer steps, ``--seed`` is honoured, noising and the loss run in fp32 under mixed precision,
the EMA is checkpointed and resumed, checkpoints are atomic, resume is exact, and only the export is pushed.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import asdict

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from PIL import Image
from tqdm.auto import tqdm
from transformers import HfArgumentParser

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from args import MODEL_PRESETS, DataArguments, ModelArguments, TrainingArguments, validate  # noqa: E402

from ddpm_hf import diffusion_math as dm  # noqa: E402
from ddpm_hf.checkpointing import (  # noqa: E402
    StateHooks, TrainProgress, remove_partial, resolve_checkpoint, save_checkpoint)
from ddpm_hf.data import DIGITS_NAME, EpochShuffleSampler, build_train_dataset, load_digits_tensor  # noqa: E402
from ddpm_hf.ema import EMA  # noqa: E402
from ddpm_hf.losses import hybrid_loss, min_snr_weights, simple_loss, training_target  # noqa: E402

logger = logging.getLogger("ddpm_hf.train")
GRID_FILENAME = "samples.png"
WARMUP_STEPS = 5  # steps excluded from the reported images/s


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf and --skip_nonfinite_steps was not given."""


# ---- set-up ----------------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> tuple[DataArguments, ModelArguments, TrainingArguments]:
    """Flags, or a single JSON file holding the same keys."""
    parser = HfArgumentParser((DataArguments, ModelArguments, TrainingArguments))
    if len(argv) == 1 and argv[0].endswith(".json"):
        parsed = parser.parse_json_file(os.path.abspath(argv[0]))
    else:
        parsed = parser.parse_args_into_dataclasses(args=argv)
    data_args, model_args, train_args = parsed
    validate(data_args, model_args, train_args)
    return data_args, model_args, train_args


def pipeline_classes():
    """Our drop-ins for diffusers' UNet2DModel, DDPMScheduler, DDIMScheduler and DDPMPipeline."""
    from ddpm_hf import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

    return UNet2DModel, DDPMScheduler, DDIMScheduler, DDPMPipeline


def configure_threads(requested: int | None, device: torch.device) -> int:
    """Pin torch's CPU threads: 1 unless asked or OMP_NUM_THREADS says otherwise.

    On a small shared CPU torch's default (one thread per core) was 3-12x slower for this tiny net than one
    thread whenever another process wanted a core (docs/training.md).
    """
    if requested is None:
        requested = int(os.environ.get("OMP_NUM_THREADS", "1")) if device.type == "cpu" else torch.get_num_threads()
    torch.set_num_threads(max(1, requested))
    return torch.get_num_threads()


def check_world_size(accelerator: Accelerator) -> None:
    """Refuse N launched processes that each think they are alone (they would all write the same files).

    accelerate 1.15 does this on a GPU-less machine for `accelerate launch --multi_gpu` without
    ACCELERATE_USE_CPU=1 (and `--cpu --num_processes 2` starts only one process).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and accelerator.num_processes != world_size:
        raise RuntimeError(
            f"launched {world_size} processes but accelerate set up {accelerator.num_processes} "
            f"({accelerator.distributed_type}); on a machine without GPUs set ACCELERATE_USE_CPU=1, e.g. "
            "`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 training/train.py`"
        )


def unet_config(model_args: ModelArguments, resolution: int, channels: int, unet_cls) -> dict:
    """The network config: a preset or a config file, with size and channels from the data."""
    if model_args.model_config_name_or_path is not None:
        config = dict(unet_cls.load_config(model_args.model_config_name_or_path))
        config = {k: v for k, v in config.items() if not k.startswith("_")}
    else:
        config = dict(MODEL_PRESETS[model_args.model_preset])
    out_channels = 2 * channels if model_args.variance_type == "learned_range" else channels
    config.update(sample_size=resolution, in_channels=channels, out_channels=out_channels)
    factor = 2 ** (len(config.get("down_block_types", ())) - 1)
    if resolution % factor:
        raise ValueError(
            f"--resolution {resolution} cannot go through this network: it halves the image "
            f"{int(math.log2(factor))} times, so the resolution must be a multiple of {factor}"
        )
    return config


def make_dataloader(dataset, batch_size: int, seed: int, num_workers: int) -> torch.utils.data.DataLoader:
    sampler = EpochShuffleSampler(len(dataset), seed)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                                       drop_last=False)


# ---- one step ----------------------------------------------------------------------------------------------------


def compute_loss(model, x0: torch.Tensor, alphas_cumprod: torch.Tensor, generator: torch.Generator,
                 model_args: ModelArguments, snr_gamma: float | None) -> torch.Tensor:
    """Draw t and eps, noise x0 in fp32, and return the fp32 loss for this micro-batch."""
    x0 = x0.float()
    timesteps = torch.randint(0, alphas_cumprod.numel(), (x0.shape[0],), generator=generator, device=x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=torch.float32)
    alpha_prod = alphas_cumprod[timesteps.to(alphas_cumprod.device)]
    x_t = dm.q_sample(x0, noise, alpha_prod)  # float32 whatever --mixed_precision says
    model_output = model(x_t, timesteps).sample
    weights = min_snr_weights(alpha_prod, snr_gamma, model_args.prediction_type) if snr_gamma else None
    if model_args.variance_type == "learned_range":
        return hybrid_loss(model_output, x0, noise, x_t, timesteps, alphas_cumprod, model_args.prediction_type,
                           weights=weights)
    target = training_target(x0, noise, alpha_prod, model_args.prediction_type)
    return simple_loss(model_output, target, weights)


def all_finite(accelerator: Accelerator, loss_sum: torch.Tensor) -> bool:
    """Whether every process's loss for this step is finite (all processes must agree to skip or stop)."""
    bad = (~torch.isfinite(loss_sum)).float().reshape(1)
    return accelerator.reduce(bad, "sum").item() == 0 if accelerator.num_processes > 1 else bad.item() == 0


# ---- outputs -----------------------------------------------------------------------------------------------------


def build_pipeline(accelerator: Accelerator, model, ema: EMA | None, noise_scheduler, pipeline_cls):
    """A pipeline on the EMA weights (or the raw ones without EMA); the training model is not touched."""
    unet = copy.deepcopy(accelerator.unwrap_model(model)).float().eval()
    if ema is not None:
        ema.copy_to(unet.parameters())
    return pipeline_cls(unet=unet, scheduler=noise_scheduler)


def export(accelerator: Accelerator, model, pipeline, use_ema: bool, output_dir: str) -> None:
    """Write the stock-loadable pipeline (EMA unet) and ``unet_raw/``, swapping each entry in atomically."""
    staging = os.path.join(output_dir, ".export.partial")
    shutil.rmtree(staging, ignore_errors=True)
    pipeline.save_pretrained(staging)
    if use_ema:
        accelerator.unwrap_model(model).save_pretrained(os.path.join(staging, "unet_raw"))
    # model_index.json last: a reader that sees it sees complete component folders.
    names = sorted(os.listdir(staging), key=lambda n: n == "model_index.json")
    for name in names:
        target = os.path.join(output_dir, name)
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(os.path.join(staging, name), target)
    shutil.rmtree(staging, ignore_errors=True)


def sampling_pipeline(pipeline, ddim_cls, model_args: ModelArguments):
    """The exported pipeline with the --grid_sampler scheduler (DDIM shares the DDPM config's betas)."""
    if model_args.grid_sampler == "ddpm":
        return pipeline
    sampler = type(pipeline)(unet=pipeline.unet, scheduler=ddim_cls.from_config(pipeline.scheduler.config))
    sampler.set_progress_bar_config(disable=True)
    return sampler


def sample_grid(pipeline, num_inference_steps: int, num_images: int, seed: int) -> Image.Image:
    """Sample a grid with a fixed generator (the same noise every time, so grids compare across steps)."""
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with torch.inference_mode():
        images = pipeline(batch_size=num_images, generator=generator, num_inference_steps=num_inference_steps,
                          output_type="np").images
    return make_grid(np.asarray(images))


def make_grid(images: np.ndarray, min_tile: int = 64) -> Image.Image:
    """Tile ``(N, H, W, C)`` images in [0, 1] into a near-square grid, upscaled so tiles are visible."""
    n, h, w, c = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    canvas = np.ones((rows * (h + 1) + 1, cols * (w + 1) + 1, c), dtype=np.float32)
    for i, image in enumerate(images):
        r, col = divmod(i, cols)
        canvas[1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + col * (w + 1): 1 + col * (w + 1) + w] = image
    pixels = (canvas.clip(0, 1) * 255).round().astype(np.uint8)
    grid = Image.fromarray(pixels[:, :, 0] if c == 1 else pixels)
    scale = max(1, min_tile // h)
    return grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)


def public_args(*arg_groups) -> dict:
    """All arguments as one dict, minus the token."""
    merged = {}
    for group in arg_groups:
        merged.update(asdict(group))
    merged.pop("hub_token", None)
    return merged


def real_images_for_eval(dataset, resolution: int, limit: int) -> torch.Tensor:
    if hasattr(dataset, "images"):
        return load_digits_tensor(resolution)
    return torch.stack([dataset[i] for i in range(min(limit, len(dataset)))])


def write_outputs(accelerator, model, ema, noise_scheduler, classes, args, model_args, data_args, dataset,
                  step: int, metrics: dict, pusher, final: bool) -> None:
    """Export, grid, model card (and on the final call, evaluation), then an async push. Main process only."""
    _, _, ddim_cls, pipeline_cls = classes
    pipeline = build_pipeline(accelerator, model, ema, noise_scheduler, pipeline_cls)
    sampler = sampling_pipeline(pipeline, ddim_cls, model_args)
    if final and args.eval:
        from ddpm_hf.evaluate import evaluate_pipeline

        real = real_images_for_eval(dataset, data_args.resolution, 2048)
        metrics.update(evaluate_pipeline(sampler, real, num_samples=args.eval_num_samples,
                                         num_inference_steps=model_args.ddpm_num_inference_steps,
                                         generator=torch.Generator().manual_seed(args.seed),
                                         likelihood_pipeline=pipeline))
        logger.info("Evaluation: %s", metrics)
    export(accelerator, model, pipeline, ema is not None, args.output_dir)
    grid = sample_grid(sampler, model_args.ddpm_num_inference_steps, args.eval_batch_size, args.seed)
    grid.save(os.path.join(args.output_dir, GRID_FILENAME))
    write_card(args, model_args, data_args, metrics)
    if pusher is not None:
        pusher.push(f"Step {step}" + (" (final)" if final else ""))


def write_card(args, model_args, data_args, metrics: dict) -> None:
    from ddpm_hf.model_card import write_model_card

    dataset_name = data_args.dataset_name or data_args.train_data_dir or DIGITS_NAME
    repo_id = (args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))) if args.push_to_hub else None
    write_model_card(args.output_dir, public_args(data_args, model_args, args), metrics, repo_id, dataset_name,
                     GRID_FILENAME, global_step=metrics.get("global_step"),
                     wall_time_s=metrics.get("wall_time_minutes", 0.0) * 60)


# ---- main --------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    """Run training; returns the final metrics (loss, steps, wall time, evaluation)."""
    data_args, model_args, args = parse_args(sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        log_with=None if args.logger == "none" else args.logger,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, args.logging_dir)),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if accelerator.is_main_process else logging.WARNING, force=True)
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per saved file otherwise
    check_world_size(accelerator)
    threads = configure_threads(args.num_threads, accelerator.device)
    logger.info("num_processes=%d device=%s mixed_precision=%s torch_threads=%d", accelerator.num_processes,
                accelerator.device, accelerator.mixed_precision, threads)
    set_seed(args.seed)

    # Data. Every process shuffles with the same (seed, epoch) permutation; accelerate shards the batches.
    dataset = build_train_dataset(data_args.dataset_name, data_args.train_data_dir, data_args.resolution,
                                  data_args.center_crop, data_args.random_flip, data_args.image_column,
                                  data_args.num_channels, args.seed, data_args.dataset_config_name,
                                  data_args.cache_dir)
    logger.info("Training images: %d (%d channel(s), %dx%d), skipped unreadable: %d", len(dataset),
                dataset.num_channels, data_args.resolution, data_args.resolution, getattr(dataset, "num_skipped", 0))
    train_dataloader = make_dataloader(dataset, args.train_batch_size, args.seed, data_args.dataloader_num_workers)

    # Model, diffusion tables (float64, from the maths core) and the scheduler saved with the export.
    classes = pipeline_classes()
    unet_cls, ddpm_cls, _, _ = classes
    model = unet_cls.from_config(unet_config(model_args, data_args.resolution, dataset.num_channels, unet_cls))
    logger.info("UNet parameters: %d", sum(p.numel() for p in model.parameters()))
    noise_scheduler = ddpm_cls(num_train_timesteps=model_args.ddpm_num_steps,
                               beta_schedule=model_args.ddpm_beta_schedule,
                               prediction_type=model_args.prediction_type, variance_type=model_args.variance_type)
    cfg = noise_scheduler.config
    alphas_cumprod = dm.alphas_cumprod_from_betas(
        dm.make_betas(cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end, cfg.beta_schedule)
    ).to(accelerator.device)

    # The fused kernel: 3x faster than the per-tensor loop torch picks for CPU tensors.
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon,
                                  fused=accelerator.device.type in ("cpu", "cuda"))
    model, optimizer, train_dataloader = accelerator.prepare(model, optimizer, train_dataloader)

    # Schedule lengths in optimizer steps: accumulation groups end at every `accum`-th batch and at the epoch end.
    accum = args.gradient_accumulation_steps
    batches_per_epoch = len(train_dataloader)
    steps_per_epoch = math.ceil(batches_per_epoch / accum)
    max_steps = args.max_train_steps or args.num_epochs * steps_per_epoch
    # Not passed to accelerator.prepare: accelerate would step it num_processes times per optimizer step.
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps,
                                 num_training_steps=max_steps)
    ema = EMA(accelerator.unwrap_model(model).parameters(), max_decay=args.ema_max_decay, warmup=args.ema_warmup,
              inv_gamma=args.ema_inv_gamma, power=args.ema_power) if args.use_ema else None
    generator = torch.Generator(device=accelerator.device).manual_seed(args.seed * 7919 + accelerator.process_index)
    progress = TrainProgress()
    StateHooks(progress, lr_scheduler, generator, ema, accelerator.process_index).register(accelerator)

    # Only now, with data and network validated, touch the output folder (a bad flag leaves nothing behind).
    if accelerator.is_main_process:
        if args.overwrite_output_dir and os.path.isdir(args.output_dir):
            shutil.rmtree(args.output_dir)
        os.makedirs(args.output_dir, exist_ok=True)
        remove_partial(args.output_dir)
    accelerator.wait_for_everyone()
    resume_path = resolve_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if resume_path is not None:
        try:
            accelerator.load_state(resume_path)
        except (RuntimeError, KeyError, ValueError) as err:  # e.g. another network config: shape mismatch
            raise ValueError(f"cannot resume from {resume_path}: {err}") from err
        logger.info("Resumed from %s at step %d (epoch %d, batch %d)", resume_path, progress.global_step,
                    progress.epoch, progress.batches_in_epoch)
    elif args.resume_from_checkpoint is not None:
        logger.info("No checkpoint in %s yet: starting from scratch", args.output_dir)

    pusher = None
    if args.push_to_hub and accelerator.is_main_process:
        from ddpm_hf.hub import HubPusher

        repo_id = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
        pusher = HubPusher(repo_id, args.hub_token, args.hub_private_repo, args.output_dir)
        pusher.create()
    if accelerator.is_main_process:
        accelerator.init_trackers("train", config={k: v for k, v in public_args(data_args, model_args, args).items()
                                                   if isinstance(v, (int, float, str, bool))})

    logger.info("Steps: %d optimizer steps, %d per epoch; total batch %d", max_steps, steps_per_epoch,
                args.train_batch_size * accum * accelerator.num_processes)
    bar = tqdm(total=max_steps, initial=progress.global_step, disable=not accelerator.is_local_main_process,
               desc="train")
    params = list(model.parameters())
    loss_sum = torch.zeros((), device=accelerator.device)
    log_loss, log_images, log_steps = torch.zeros((), device=accelerator.device), 0, 0
    log_start = time.perf_counter()
    metrics: dict = {}
    first_step_time, first_step = None, progress.global_step
    warm_start, warm_images = None, 0  # throughput after WARMUP_STEPS steps (allocator, caches warmed up)
    model.train()
    while progress.global_step < max_steps:
        loader = train_dataloader
        if progress.batches_in_epoch:
            loader = accelerator.skip_first_batches(train_dataloader, progress.batches_in_epoch)
        loader.set_epoch(progress.epoch)  # sampler permutation and augmentation of this epoch
        for batch in loader:
            index = progress.batches_in_epoch
            group_start = index - index % accum
            group_size = min(accum, batches_per_epoch - group_start)
            if index == group_start:
                # Enough to rewind to the end of the last good step if this one turns out non-finite.
                snapshot = (generator.get_state(), torch.get_rng_state())
                loss_sum.zero_()
                group_images = 0
            last_in_group = index - group_start + 1 == group_size
            sync = contextlib.nullcontext() if last_in_group else accelerator.no_sync(model)
            with sync:
                loss = compute_loss(model, batch, alphas_cumprod, generator, model_args, args.snr_gamma)
                accelerator.backward(loss / group_size)
            loss_sum += loss.detach() / group_size
            progress.batches_in_epoch += 1
            log_images += batch.shape[0] * accelerator.num_processes
            group_images += batch.shape[0] * accelerator.num_processes
            if not last_in_group:
                continue

            if not all_finite(accelerator, loss_sum):
                optimizer.zero_grad(set_to_none=True)
                if args.skip_nonfinite_steps:
                    progress.skipped_nonfinite += 1
                    logger.warning("Non-finite loss at step %d: update skipped (%d skipped so far)",
                                   progress.global_step + 1, progress.skipped_nonfinite)
                    finish_epoch_if_done(progress, batches_per_epoch)
                    continue
                stop_on_nonfinite(accelerator, args, progress, generator, snapshot, group_start, loss_sum)
            grad_norm = accelerator.clip_grad_norm_(params, args.max_grad_norm) if args.max_grad_norm else None
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            ema_decay = ema.update(accelerator.unwrap_model(model).parameters()) if ema is not None else None
            progress.global_step += 1
            finish_epoch_if_done(progress, batches_per_epoch)
            bar.update(1)
            if first_step_time is None:
                first_step_time = time.perf_counter() - started
                logger.info("Time to first step: %.2f s", first_step_time)
            if progress.global_step == first_step + WARMUP_STEPS:
                warm_start, warm_images = time.perf_counter(), 0
            elif warm_start is not None:
                warm_images += group_images

            step = progress.global_step
            log_loss += loss_sum
            log_steps += 1
            if step % args.logging_steps == 0 or step == max_steps:
                elapsed = time.perf_counter() - log_start
                scalars = {"loss": accelerator.reduce(log_loss, "mean").item() / log_steps,
                           "lr": lr_scheduler.get_last_lr()[0], "images_per_sec": log_images / max(elapsed, 1e-9)}
                if grad_norm is not None:
                    scalars["grad_norm"] = float(grad_norm)
                if ema_decay is not None:
                    scalars["ema_decay"] = ema_decay
                accelerator.log(scalars, step=step)
                bar.set_postfix(loss=f"{scalars['loss']:.4f}", lr=f"{scalars['lr']:.2e}")
                metrics["train_loss"] = scalars["loss"]
                log_loss.zero_()
                log_images, log_steps, log_start = 0, 0, time.perf_counter()
            if step % args.checkpointing_steps == 0 and step < max_steps:
                save_checkpoint(accelerator, args.output_dir, step, args.checkpoints_total_limit)
            periodic_images = args.save_images_steps and step % args.save_images_steps == 0
            periodic_model = args.save_model_steps and step % args.save_model_steps == 0
            if accelerator.is_main_process and step < max_steps and (periodic_images or periodic_model):
                metrics.update(global_step=step, wall_time_minutes=(time.perf_counter() - started) / 60)
                write_outputs(accelerator, model, ema, noise_scheduler, classes, args, model_args, data_args,
                              dataset, step, metrics, pusher if periodic_model else None, final=False)
            if step >= max_steps:
                break
    loop_end = time.perf_counter()
    bar.close()

    save_checkpoint(accelerator, args.output_dir, progress.global_step, args.checkpoints_total_limit)
    metrics.update(global_step=progress.global_step, wall_time_minutes=(time.perf_counter() - started) / 60,
                   skipped_nonfinite_steps=progress.skipped_nonfinite, num_processes=accelerator.num_processes)
    if first_step_time is not None:
        metrics["time_to_first_step_s"] = first_step_time
    if warm_start is not None and warm_images:
        metrics["images_per_sec"] = warm_images / (loop_end - warm_start)
    pushed = True
    if accelerator.is_main_process:
        write_outputs(accelerator, model, ema, noise_scheduler, classes, args, model_args, data_args, dataset,
                      progress.global_step, metrics, pusher, final=True)
        pushed = pusher.wait() if pusher is not None else True
        logger.info("Done: %s", metrics)
    accelerator.end_training()
    if not pushed:
        raise SystemExit(f"training finished and the export is in {args.output_dir}, but the final push failed "
                         "(see the log above for the command to push it by hand)")
    return metrics


def finish_epoch_if_done(progress: TrainProgress, batches_per_epoch: int) -> None:
    """Move to the next epoch once all its batches are consumed (checkpoints then resume at its start)."""
    if progress.batches_in_epoch == batches_per_epoch:
        progress.epoch, progress.batches_in_epoch = progress.epoch + 1, 0


def stop_on_nonfinite(accelerator, args, progress: TrainProgress, generator, snapshot, group_start: int,
                      loss_sum: torch.Tensor) -> None:
    """Rewind to the end of the last good step, checkpoint it, and raise with the step and likely causes."""
    generator.set_state(snapshot[0])
    torch.set_rng_state(snapshot[1])
    progress.batches_in_epoch = group_start
    saved = None
    if progress.global_step > 0:
        saved = save_checkpoint(accelerator, args.output_dir, progress.global_step, args.checkpoints_total_limit)
    raise NonFiniteLossError(
        f"loss is {loss_sum.item()} at optimizer step {progress.global_step + 1} (epoch {progress.epoch}, "
        f"batch {group_start}). Likely causes: a learning rate too high for this model (--learning_rate), "
        "fp16 overflow (try --mixed_precision bf16 or no), NaN/inf in the input data, or a --snr_gamma / "
        "--prediction_type combination that divides by a zero SNR. "
        + (f"The last good state is saved as {saved}; fix the cause and rerun with --resume_from_checkpoint latest, "
           if saved else "No step had completed, so there is nothing to save; ")
        + "or pass --skip_nonfinite_steps to skip such steps."
    )


if __name__ == "__main__":
    try:
        main()
    except NonFiniteLossError as err:  # a diverged run: the message names the step, the causes and the checkpoint
        sys.exit(f"error: {err}")
    except (ValueError, TypeError) as err:  # bad input: the message names the flag, file or folder
        sys.exit(f"{type(err).__name__}: {err}")
