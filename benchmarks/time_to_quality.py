"""Time to quality: CPU seconds to draw 500 digits whose digits FID lies inside the real-vs-real floor band.

    OMP_NUM_THREADS=1 python benchmarks/time_to_quality.py [EXPORT] [--num-samples 500] [--repeats 3]

EXPORT (default /work/exports/ddpm-digits, the README main job's export) is loaded twice on the same weights:
as stock ``diffusers.UNet2DModel`` in ``diffusers.DDPMPipeline`` (fp32, eager: diffusers' default) and as
``ddpm_hf.DDPMPipeline`` on its fast path (bf16 network where this CPU has native bf16, else fp32; weight
prepacking). The quality yardstick is the digits classifier's FID (``ddpm_hf.features``) against the 450
held-out test digits the run never trained on, at the resolution the model was trained at; the floor band is
the same FID of real digits (``--floor-repeats`` random draws of ``--num-samples`` from the train split, the
count of the samples), and a sample set counts as good when its FID is at most the band's top.

Each sampler (DPMSolverMultistep, UniPC, DDIM; diffusers' own classes in both pipelines, ddpm_hf's DDIM in ours)
is tried at increasing step counts until its FID falls inside the band; the fastest good setting of each side is
then timed in one interleaved run (``time.process_time``: CPU seconds of this process, 1 torch thread) beside
diffusers' default, DDPM over all 1000 steps, whose time per step is measured at ``--ddpm-subset`` steps and
multiplied up to 1000 (the network and the respaced step cost the same per step). All arms start from the same
noise (seed 0). Prints the hardware, threads, dtypes, every FID and both peers' times; writes the JSON to
``--output``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import diffusers
import numpy as np
import torch

import ddpm_hf
from ddpm_hf.evaluate import digits_real_images, fid_from_features
from ddpm_hf.fast_path import cpu_bf16_native
from ddpm_hf.features import load_digits_classifier
from ddpm_hf.hardware import describe_hardware

STEP_GRID = (3, 4, 5, 6, 7, 8, 10, 12, 15, 20, 25, 30, 40, 50)
SAMPLERS = ("DPMSolverMultistep", "UniPC", "DDIM")


class _UniPC(diffusers.UniPCMultistepScheduler):
    """diffusers' UniPC in diffusers' ``DDPMPipeline``, whose loop passes ``generator=`` to ``step``; UniPC is
    deterministic and its ``step`` has no such argument, so the pipeline would raise without this shim."""

    def step(self, *args, generator=None, **kwargs):
        return super().step(*args, **kwargs)


@dataclass
class Quality:
    """The digits FID yardstick: reference features and the real-vs-real floor band at the sample count."""

    classifier: torch.nn.Module
    reference: torch.Tensor
    floors: list[float]

    def fid(self, images01: torch.Tensor) -> float:
        """FID of images in [0, 1] (N, C, H, W) against the held-out reference."""
        with torch.inference_mode():
            features = self.classifier.features(images01.float() * 2 - 1)
        return fid_from_features(features, self.reference)

    @property
    def band(self) -> tuple[float, float]:
        return min(self.floors), max(self.floors)

    def good(self, fid: float) -> bool:
        return fid <= self.band[1]


def build_quality(resolution: int, channels: int, num_samples: int, repeats: int) -> Quality:
    """Reference = the test split; floors = FID of ``repeats`` random ``num_samples``-draws of train digits."""
    classifier = load_digits_classifier()
    with torch.inference_mode():
        reference = classifier.features(digits_real_images("test", resolution, channels))
        pool = classifier.features(digits_real_images("train", resolution, channels))
    generator = torch.Generator().manual_seed(0)
    floors = [fid_from_features(pool[torch.randperm(len(pool), generator=generator)[:num_samples]], reference)
              for _ in range(repeats)]
    return Quality(classifier, reference, floors)


def stock_scheduler(name: str, config) -> diffusers.SchedulerMixin:
    cls = {"DPMSolverMultistep": diffusers.DPMSolverMultistepScheduler, "UniPC": _UniPC,
           "DDIM": diffusers.DDIMScheduler, "DDPM": diffusers.DDPMScheduler}[name]
    return cls.from_config(config)


def our_scheduler(name: str, config) -> diffusers.SchedulerMixin:
    if name == "DDIM":
        return ddpm_hf.DDIMScheduler.from_config(config)
    return stock_scheduler(name, config) if name != "UniPC" else diffusers.UniPCMultistepScheduler.from_config(config)


def load_peers(export: str) -> tuple[diffusers.DDPMPipeline, ddpm_hf.DDPMPipeline, torch.dtype]:
    """diffusers' pipeline (fp32 eager) and ours on its fast path, on the export's weights."""
    stock_unet = diffusers.UNet2DModel.from_pretrained(export, subfolder="unet").eval()
    stock = diffusers.DDPMPipeline(stock_unet, diffusers.DDPMScheduler.from_pretrained(export, subfolder="scheduler"))
    dtype = torch.bfloat16 if cpu_bf16_native() else torch.float32
    ours = ddpm_hf.DDPMPipeline.from_pretrained(export, torch_dtype=dtype)
    ours.unet.enable_weight_prepacking()
    for pipe in (stock, ours):
        pipe.set_progress_bar_config(disable=True)
    return stock, ours, dtype


def draw(pipe, scheduler, steps: int, num_samples: int) -> tuple[torch.Tensor, float, float]:
    """Images in [0, 1] as (N, C, H, W), CPU seconds and wall seconds of one call at batch ``num_samples``."""
    pipe.scheduler = scheduler
    cpu, wall = time.process_time(), time.perf_counter()
    images = pipe(batch_size=num_samples, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2), cpu, wall


def search(label: str, pipe, make_scheduler, quality: Quality, num_samples: int, log: list) -> dict | None:
    """Fewest steps of one sampler whose FID is inside the band (None if none in STEP_GRID)."""
    for steps in STEP_GRID:
        images, cpu, _ = draw(pipe, make_scheduler(), steps, num_samples)
        fid = quality.fid(images)
        log.append({"arm": label, "steps": steps, "fid": fid, "cpu_s": cpu})
        print(f"  {label:32s} {steps:3d} steps: FID {fid:6.2f} ({'inside' if quality.good(fid) else 'above'} "
              f"the band)  {cpu:6.2f} CPU-s", flush=True)
        if quality.good(fid):
            return {"arm": label, "steps": steps, "fid": fid}
    return None


def best_of(side: str, pipe, factory, quality: Quality, num_samples: int, log: list) -> dict:
    """The sampler whose in-band step count is smallest (one network call per step for all three)."""
    found = []
    for name in SAMPLERS:
        hit = search(f"{side} {name}", pipe, lambda n=name: factory(n, pipe.scheduler.config), quality,
                     num_samples, log)
        if hit is not None:
            found.append(hit | {"sampler": name})
    if not found:
        raise SystemExit(f"{side}: no sampler reached the floor band within {STEP_GRID[-1]} steps")
    return min(found, key=lambda r: r["steps"])


def timed_round(arms: list[tuple[str, object, object, int]], num_samples: int, repeats: int) -> dict[str, list]:
    """CPU seconds per arm, interleaved arm by arm within each round."""
    times: dict[str, list] = {name: [] for name, *_ in arms}
    for r in range(repeats):
        for name, pipe, make_scheduler, steps in arms:
            _, cpu, wall = draw(pipe, make_scheduler(), steps, num_samples)
            times[name].append(cpu)
            print(f"  round {r}: {name:28s} {steps:4d} steps  {cpu:7.2f} CPU-s  ({wall:6.2f} s wall)", flush=True)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", nargs="?", default="/work/exports/ddpm-digits")
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--floor-repeats", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds")
    parser.add_argument("--ddpm-subset", type=int, default=20, help="DDPM steps timed, then scaled to 1000")
    parser.add_argument("--output", default="benchmarks/results/time_to_quality.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(describe_hardware().summary())
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.2f} (other jobs share this machine)")
    stock, ours, dtype = load_peers(args.export)
    config = ours.unet.config
    quality = build_quality(config.sample_size, config.in_channels, args.num_samples, args.floor_repeats)
    print(f"export {args.export}; diffusers: fp32 eager; ours: {dtype} network (fp32 sampler maths), prepacked; "
          f"batch {args.num_samples}; floor band {quality.band[0]:.2f}-{quality.band[1]:.2f} "
          f"({args.floor_repeats} draws of {args.num_samples} train digits vs the 450 test digits)")
    log: list = []
    theirs = best_of("diffusers", stock, stock_scheduler, quality, args.num_samples, log)
    mine = best_of("ddpm_hf", ours, our_scheduler, quality, args.num_samples, log)
    arms = [("diffusers " + theirs["sampler"], stock, lambda: stock_scheduler(theirs["sampler"], stock.scheduler.config),
             theirs["steps"]),
            ("ddpm_hf " + mine["sampler"], ours, lambda: our_scheduler(mine["sampler"], ours.scheduler.config),
             mine["steps"]),
            ("diffusers DDPM (subset)", stock, lambda: stock_scheduler("DDPM", stock.scheduler.config),
             args.ddpm_subset)]
    print("timing (interleaved):")
    times = timed_round(arms, args.num_samples, args.repeats)
    t_theirs, t_mine, t_sub = (statistics.median(v) for v in times.values())
    t_ddpm = t_sub / args.ddpm_subset * 1000
    result = {"hardware": describe_hardware().summary(), "num_samples": args.num_samples, "our_dtype": str(dtype),
              "floor_band": quality.band, "floors": quality.floors, "search": log, "diffusers_best": theirs,
              "ours_best": mine, "cpu_s": {"diffusers_best": t_theirs, "ours_best": t_mine,
                                           "diffusers_ddpm1000_extrapolated": t_ddpm}, "times": times,
              "ratio_vs_ddpm1000": t_ddpm / t_mine, "ratio_vs_best_diffusers": t_theirs / t_mine}
    print(f"diffusers DDPM 1000 steps: {t_ddpm:.1f} CPU-s (extrapolated from {args.ddpm_subset} steps; quality not "
          f"measured)\ndiffusers best: {theirs['sampler']} {theirs['steps']} steps, FID {theirs['fid']:.2f}, "
          f"{t_theirs:.2f} CPU-s\nours best: {mine['sampler']} {mine['steps']} steps ({dtype}), FID "
          f"{mine['fid']:.2f}, {t_mine:.2f} CPU-s\nratio vs DDPM-1000: {result['ratio_vs_ddpm1000']:.0f}x; vs the "
          f"best diffusers scheduler: {result['ratio_vs_best_diffusers']:.2f}x")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
