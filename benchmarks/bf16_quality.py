"""Does the bf16 fast path cost sample quality? Digits FID of bf16 samples against fp32 samples, same seeds.

    OMP_NUM_THREADS=1 python benchmarks/bf16_quality.py [EXPORT] [--num-samples 500] [--samplers DDPM:100,...]

For each sampler (``NAME:STEPS``; NAME as in ``time_to_quality.py``, plus DDPM) ``ddpm_hf.DDPMPipeline`` draws
``--num-samples`` digits twice from the same noise (seed 0): with the export's unet in fp32 and in bf16 (the fast
path: network in bf16, sampler maths in fp32). Each set's digits FID is taken against the 450 held-out test
digits; the real-vs-real noise is the spread of the floor band (``--floor-repeats`` draws of as many train
digits). The bf16 and fp32 FIDs count as equal when they differ by less than that spread (max - min of the
band). Also printed: the FID between the bf16 and the fp32 sample sets themselves, and their mean pixel
difference. Writes the JSON to ``--output``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import diffusers
import torch

import ddpm_hf
from ddpm_hf.evaluate import fid_from_features
from ddpm_hf.hardware import describe_hardware
from time_to_quality import build_quality, draw, our_scheduler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", nargs="?", default="/work/exports/ddpm-digits")
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--floor-repeats", type=int, default=20)
    parser.add_argument("--samplers", default="DPMSolverMultistep:10,DDPM:100")
    parser.add_argument("--output", default="benchmarks/results/bf16_quality.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(describe_hardware().summary())
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.2f} (other jobs share this machine)")
    pipes = {}
    for dtype in (torch.float32, torch.bfloat16):
        pipes[dtype] = ddpm_hf.DDPMPipeline.from_pretrained(args.export, torch_dtype=dtype)
        pipes[dtype].set_progress_bar_config(disable=True)
    config = pipes[torch.float32].unet.config
    quality = build_quality(config.sample_size, config.in_channels, args.num_samples, args.floor_repeats)
    spread = quality.band[1] - quality.band[0]
    print(f"floor band {quality.band[0]:.2f}-{quality.band[1]:.2f} (spread {spread:.2f}, {args.floor_repeats} draws "
          f"of {args.num_samples} train digits vs the 450 test digits)")
    rows = []
    for item in args.samplers.split(","):
        name, steps = item.split(":")
        images, fids, cpu = {}, {}, {}
        for dtype, pipe in pipes.items():
            scheduler = (ddpm_hf.DDPMScheduler.from_config(pipe.scheduler.config) if name == "DDPM"
                         else our_scheduler(name, pipe.scheduler.config))
            images[dtype], cpu[dtype], _ = draw(pipe, scheduler, int(steps), args.num_samples)
            fids[dtype] = quality.fid(images[dtype])
        with torch.inference_mode():
            features = {d: quality.classifier.features(x.float() * 2 - 1) for d, x in images.items()}
        row = {"sampler": name, "steps": int(steps), "fid_fp32": fids[torch.float32], "fid_bf16": fids[torch.bfloat16],
               "fid_bf16_vs_fp32": fid_from_features(features[torch.bfloat16], features[torch.float32]),
               "mean_abs_pixel_difference": (images[torch.bfloat16] - images[torch.float32]).abs().mean().item(),
               "cpu_s_fp32": cpu[torch.float32], "cpu_s_bf16": cpu[torch.bfloat16]}
        row["equal_within_noise"] = abs(row["fid_bf16"] - row["fid_fp32"]) < spread
        rows.append(row)
        print(f"{name} {steps} steps: FID fp32 {row['fid_fp32']:.2f}, bf16 {row['fid_bf16']:.2f} (difference "
              f"{row['fid_bf16'] - row['fid_fp32']:+.2f}, band spread {spread:.2f}: "
              f"{'equal within' if row['equal_within_noise'] else 'OUTSIDE'} the real-vs-real noise); FID bf16 vs "
              f"fp32 samples {row['fid_bf16_vs_fp32']:.2f}; mean |pixel difference| "
              f"{row['mean_abs_pixel_difference']:.4f}; CPU-s fp32 {row['cpu_s_fp32']:.1f}, bf16 "
              f"{row['cpu_s_bf16']:.1f}", flush=True)
    result = {"hardware": describe_hardware().summary(), "export": args.export, "num_samples": args.num_samples,
              "floor_band": quality.band, "floors": quality.floors, "rows": rows}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
