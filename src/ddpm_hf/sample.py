"""Draw a grid of samples from a saved pipeline without writing Python.

``python -m ddpm_hf.sample EXPORT --num_images 64 --scheduler ddim --steps 50 --seed 0 --out grid.png
[--class_labels 7 3 --guidance_scale 1.25]``

EXPORT is a folder (or Hub repo id) that ``ddpm_hf.DDPMPipeline.from_pretrained`` loads: one written by the
training script, by stock diffusers, or by ddpm_hf. The scheduler is rebuilt on the saved noise schedule with
``from_config``, so every choice samples the model it was trained as.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

import torch
from diffusers.utils import make_image_grid

SCHEDULER_CHOICES = ("saved", "ddpm", "ddim", "dpmsolver")


def _scheduler_class(name: str) -> Any:
    """The class behind each ``--scheduler`` choice (``saved`` keeps the folder's own scheduler)."""
    import diffusers

    from .schedulers import DDIMScheduler, DDPMScheduler

    return {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpmsolver": diffusers.DPMSolverMultistepScheduler}[name]


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ddpm_hf.sample", description=__doc__.split("\n")[0])
    p.add_argument("pipeline", help="a saved pipeline folder or Hub repo id")
    p.add_argument("--num_images", type=_positive, default=64, help="images in the grid (default 64)")
    p.add_argument("--scheduler", choices=SCHEDULER_CHOICES, default="saved",
                   help="sampler: the saved one, DDPM (ancestral), DDIM (eta 0) or DPM-Solver++ (multistep)")
    p.add_argument("--steps", type=_positive, default=None, help="sampling steps (default: the scheduler's own)")
    p.add_argument("--seed", type=int, default=0, help="seed of the starting noise")
    p.add_argument("--batch_size", type=_positive, default=64, help="images per network batch")
    p.add_argument("--class_labels", nargs="+", default=None,
                   help="class-conditional models: classes (names or ids) to draw, cycled over the images")
    p.add_argument("--guidance_scale", type=float, default=None,
                   help="classifier-free guidance scale w (default 1: the conditional model alone)")
    p.add_argument("--out", default="grid.png", help="where to write the PNG grid")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    return p


def _class_label(text: str) -> int | str:
    return int(text) if text.isdigit() else text  # ids as ints; anything else is a class name


def sample_grid(pipeline: Any, num_images: int, steps: int | None, seed: int, batch_size: int,
                class_labels: list[int | str] | None = None, **guidance: Any) -> Any:
    """Sample ``num_images`` images in batches from one seeded generator and tile them into a near-square grid.

    Args:
        class_labels: for a class-conditional pipeline, the classes cycled over the images (names or ids).
        guidance: ``guidance_scale`` and the like, passed to the pipeline.

    Returns:
        The grid as a PIL image.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    images = []
    for start in range(0, num_images, batch_size):
        count = min(batch_size, num_images - start)
        kwargs = dict(guidance)
        if class_labels:
            kwargs["class_labels"] = [class_labels[(start + i) % len(class_labels)] for i in range(count)]
        images += pipeline(batch_size=count, generator=generator, num_inference_steps=steps, **kwargs).images
    cols = math.ceil(math.sqrt(num_images))
    rows = math.ceil(num_images / cols)
    images += [images[0].point(lambda _: 255)] * (rows * cols - num_images)  # white tiles fill the last row
    return make_image_grid(images, rows=rows, cols=cols).convert(images[0].mode)  # it pastes onto RGB


def main(argv: list[str] | None = None) -> str:
    """Load, sample, write the grid; returns the path written."""
    args = _parser().parse_args(argv)
    from .pipeline import DDPMPipeline

    pipeline = DDPMPipeline.from_pretrained(args.pipeline).to(args.device)
    if args.scheduler != "saved":
        pipeline.scheduler = _scheduler_class(args.scheduler).from_config(pipeline.scheduler.config)
    labels = [_class_label(c) for c in args.class_labels] if args.class_labels else None
    guidance = {} if args.guidance_scale is None else {"guidance_scale": args.guidance_scale}
    grid = sample_grid(pipeline, args.num_images, args.steps, args.seed, args.batch_size, labels, **guidance)
    grid.save(args.out)
    print(f"wrote {args.out}: {args.num_images} images, scheduler {type(pipeline.scheduler).__name__}, "
          f"seed {args.seed}", file=sys.stderr)
    return args.out


if __name__ == "__main__":
    main()
