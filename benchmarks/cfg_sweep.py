#!/usr/bin/env python
"""Classifier-free guidance sweep on the built-in digits: conditional accuracy and FID (with its floor) against w.

Trains a class-conditional digits model with the default recipe (`training/train.py --class_conditional true`,
1,056 steps, one torch thread) unless ``--model`` names an export already trained that way, then samples every
class of the held-out test split with DDIM at ``--steps`` steps for each guidance scale and scores the samples
with `ddpm_hf.evaluate.evaluate_conditional` (the digits classifier's agreement with the requested class, beside
its accuracy on the real test digits, the ceiling; FID in the classifier's features against the test digits,
with the real-vs-real floor at the same counts). The best w is the one with the lowest FID among those reaching
the target accuracy (0.97), else the most accurate; there the evaluation is repeated with ``--repeats`` seeds
(another per-class split and other noise) to give the floor's band. The classifier's accuracy on the real test
digits is printed beside the samples' for reference: guided samples, more prototypical than real digits, can
exceed it.

    python benchmarks/cfg_sweep.py --out benchmarks/results [--model EXPORT] [--work /tmp/cfg_sweep]

Writes ``cfg_sweep.md`` (table), ``cfg_sweep.json`` (raw) and ``cfg_sweep.png`` (plot) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_SCRIPT = os.path.join(ROOT, "training", "train.py")
SCALES = (0.0, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0)  # the six, and 1.25 where accuracy and FID cross
TARGET_ACCURACY = 0.97


def train(work: str) -> tuple[str, float]:
    """Train the default recipe with labels into ``work/cfg-digits``; returns (export folder, wall seconds)."""
    out = os.path.join(work, "cfg-digits")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    start = time.perf_counter()
    subprocess.run([sys.executable, TRAIN_SCRIPT, "--class_conditional", "true", "--output_dir", out,
                    "--overwrite_output_dir", "true", "--logger", "none"], check=True, env=env)
    return out, time.perf_counter() - start


def recorded_wall_time(export: str) -> float | None:
    """The whole run's wall time (all resumed stretches) from the export's last checkpoint, if it has one."""
    from ddpm_hf import checkpointing

    last = checkpointing.resolve_checkpoint(export, "latest")
    if last is None:
        return None
    with open(os.path.join(last, checkpointing.STATE_FILE)) as f:
        return json.load(f)["progress"]["wall_time_s"]


def sampler(export: str):
    """The export as a class-conditional DDIM sampler (eta 0)."""
    import ddpm_hf

    pipeline = ddpm_hf.DDPMPipeline.from_pretrained(export)
    pipeline.scheduler = ddpm_hf.DDIMScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def evaluate(pipeline, scale: float, steps: int, seed: int) -> dict:
    from ddpm_hf.evaluate import digits_real_images, evaluate_conditional
    from ddpm_hf.class_metrics import digits_real_labels

    size = pipeline.unet.config.sample_size
    real = digits_real_images("test", size if isinstance(size, int) else size[0], pipeline.unet.config.in_channels)
    return evaluate_conditional(pipeline, real, digits_real_labels("test"), guidance_scale=scale,
                                num_inference_steps=steps, generator=torch.Generator().manual_seed(seed))


def table(rows: list[dict], band: dict, header: list[str]) -> str:
    """The markdown results: context lines, one row per w, and the band at the best w."""
    lines = header + ["", "| w | network evaluations / sample | conditional accuracy | FID (digits features) | "
                          "FID floor (real vs real) | FID - floor |", "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['guidance_scale']:g} | {r['nfe_per_sample']:.0f} | {r['conditional_accuracy']:.4f} | "
                     f"{r['fid_digits']:.3f} | {r['fid_digits_floor']:.3f} | "
                     f"{r['fid_digits'] - r['fid_digits_floor']:+.3f} |")
    lines += ["", f"Classifier accuracy on the real test digits (for reference; guided samples can exceed it): "
                  f"{rows[0]['classifier_accuracy_real']:.4f}.", "",
              f"Best w (lowest FID among those with accuracy >= {TARGET_ACCURACY}, else the most accurate): "
              f"w = {band['w']:g}, {len(band['fid'])} seeds (split and noise): conditional accuracy "
              f"{min(band['accuracy']):.4f}-{max(band['accuracy']):.4f}, FID {min(band['fid']):.3f}-"
              f"{max(band['fid']):.3f}, floor band {min(band['floor']):.3f}-{max(band['floor']):.3f}."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], band: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = [r["guidance_scale"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    left.plot(w, [r["conditional_accuracy"] for r in rows], "o-", label="samples")
    left.axhline(rows[0]["classifier_accuracy_real"], color="grey", ls="--", label="real test digits")
    left.set(xlabel="guidance scale w", ylabel="conditional accuracy", title="Classifier agrees with the label")
    left.legend(loc="lower right")
    right.plot(w, [r["fid_digits"] for r in rows], "o-", label="samples")
    right.plot(w, [r["fid_digits_floor"] for r in rows], "s--", color="grey", label="floor (real vs real)")
    right.axhspan(min(band["floor"]), max(band["floor"]), color="grey", alpha=0.2,
                  label=f"floor band ({len(band['floor'])} seeds)")
    right.set(xlabel="guidance scale w", ylabel="FID (digits features, log scale)", yscale="log",
              title="FID vs held-out test digits")
    right.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--model", default=None, help="an export of the conditional recipe (skips training)")
    parser.add_argument("--work", default="/tmp/cfg_sweep", help="where training writes its export")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps (a guided step costs 2 evaluations)")
    parser.add_argument("--repeats", type=int, default=3, help="seeds at the best w, for the band")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from ddpm_hf.hardware import describe_hardware

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    header = [f"Hardware: {describe_hardware().summary()}",
              f"Load average at start (1/5/15 min): {' / '.join(f'{x:.2f}' for x in os.getloadavg())}"]
    if args.model is None:
        export, wall = train(args.work)
        header.append(f"Training: `python training/train.py --class_conditional true` (default recipe, "
                      f"1 torch thread): {wall / 60:.1f} min wall for the whole command")
    else:
        export, wall = args.model, recorded_wall_time(args.model)
        header.append(f"Training: the export {os.path.basename(os.path.normpath(export))!r} of the default "
                      f"recipe with --class_conditional true; recorded wall time of the run: "
                      + (f"{wall / 60:.1f} min" if wall is not None else "unknown"))
    header.append(f"Sampling: DDIM {args.steps} steps (eta 0), EMA weights; evaluation seed {args.seed}")
    for line in header:
        print(line, flush=True)
    pipeline = sampler(export)
    rows = []
    for scale in SCALES:
        start = time.perf_counter()
        rows.append(evaluate(pipeline, scale, args.steps, args.seed))
        r = rows[-1]
        print(f"w={scale:g}: accuracy {r['conditional_accuracy']:.4f} (real {r['classifier_accuracy_real']:.4f}), "
              f"FID {r['fid_digits']:.3f} (floor {r['fid_digits_floor']:.3f}), NFE/sample {r['nfe_per_sample']}, "
              f"{time.perf_counter() - start:.0f} s", flush=True)
    reaching = [r for r in rows if r["conditional_accuracy"] >= TARGET_ACCURACY]
    best = (min(reaching, key=lambda r: r["fid_digits"]) if reaching
            else max(rows, key=lambda r: (r["conditional_accuracy"], -r["fid_digits"])))
    repeats = [best] + [evaluate(pipeline, best["guidance_scale"], args.steps, args.seed + k)
                        for k in range(1, args.repeats)]
    band = {"w": best["guidance_scale"], "accuracy": [r["conditional_accuracy"] for r in repeats],
            "fid": [r["fid_digits"] for r in repeats], "floor": [r["fid_digits_floor"] for r in repeats]}
    header.append(f"Load average at the end (1/5/15 min): {' / '.join(f'{x:.2f}' for x in os.getloadavg())} "
                  "(the machine was shared with other jobs: wall times are upper bounds)")
    os.makedirs(args.out, exist_ok=True)
    text = table(rows, band, header)
    with open(os.path.join(args.out, "cfg_sweep.md"), "w") as f:
        f.write("# Classifier-free guidance sweep (built-in digits)\n\n" + text)
    with open(os.path.join(args.out, "cfg_sweep.json"), "w") as f:
        json.dump({"header": header, "rows": rows, "band": band, "training_wall_s": wall}, f, indent=1)
    plot(rows, band, os.path.join(args.out, "cfg_sweep.png"))
    print(text)


if __name__ == "__main__":
    main()
