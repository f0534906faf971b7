#!/usr/bin/env python
"""Evidence for train.py's defaults: a sweep on the built-in digits at the default run's step budget.

Each configuration trains with `training/train.py` itself (or, for ``reference*``, the diffusers-example loop of
`bench_training.py`), then samples ``--num_samples`` digits with several samplers and scores them with
`digits_metrics`: a Frechet distance in the hidden layer of a small MLP digit classifier trained on the real
digits (with the real-vs-real floor of the same metric), mean classifier confidence, and class balance
(normalised entropy of the predicted labels; 1 = all ten digits equally often).

Steps, not seconds, are what transfer between machines, so the sweep can run on any device (it was run on a
GPU machine, all configurations in parallel); the CPU wall-clock budget enters through the step counts.

    python benchmarks/tune_defaults.py --out results_dir [--parallel 16] [--steps 1200] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_SCRIPT = os.path.join(ROOT, "training", "train.py")

BASE = ["--learning_rate", "2e-3", "--lr_warmup_steps", "100", "--ema_max_decay", "0.999"]
EXAMPLE = ["--learning_rate", "1e-4", "--lr_warmup_steps", "500", "--adam_beta1", "0.95", "--adam_weight_decay",
           "1e-6", "--ema_max_decay", "0.9999"]


def configs(steps: int) -> dict[str, list[str]]:
    """name -> train.py flags (``reference*``: the diffusers-example loop for that many steps)."""
    s = str(steps)
    return {
        "example_hparams": EXAMPLE + ["--max_train_steps", s],
        "lr5e-4": BASE[2:] + ["--learning_rate", "5e-4", "--max_train_steps", s],
        "lr1e-3": BASE[2:] + ["--learning_rate", "1e-3", "--max_train_steps", s],
        "lr2e-3": BASE + ["--max_train_steps", s],
        "lr4e-3": BASE[2:] + ["--learning_rate", "4e-3", "--max_train_steps", s],
        "lr2e-3_warmup500": BASE[:2] + ["--lr_warmup_steps", "500"] + BASE[4:] + ["--max_train_steps", s],
        "lr2e-3_ema_const0.995": BASE + ["--ema_warmup", "false", "--ema_max_decay", "0.995", "--ema_min_decay", "0.995",
                                          "--max_train_steps", s],
        "lr2e-3_ema_power2/3": BASE + ["--ema_power", str(2 / 3), "--max_train_steps", s],
        "lr2e-3_no_ema": BASE + ["--use_ema", "false", "--max_train_steps", s],
        "lr2e-3_batch32": BASE + ["--train_batch_size", "32", "--max_train_steps", str(2 * steps)],
        "lr2e-3_batch128": BASE + ["--train_batch_size", "128", "--max_train_steps", str(steps // 2)],
        "lr2e-3_snr5": BASE + ["--snr_gamma", "5", "--max_train_steps", s],
        "lr2e-3_vpred": BASE + ["--prediction_type", "v_prediction", "--max_train_steps", s],
        "lr1e-3_constant": BASE + ["--learning_rate", "1e-3", "--lr_scheduler", "constant_with_warmup",
                                   "--max_train_steps", s],
        "reference": [s],
        "reference_2/3_steps": [str(2 * steps // 3)],
        # The shipped defaults (36 epochs = 1,044 steps) against the example loop for the same CPU wall time
        # (bench_training.py: the two run at about the same images/s, so the same number of steps).
        "default": [],
        "reference_default_time": ["1044"],
    }


def digits_metrics(samples, real) -> dict:
    """Frechet distance in an MLP classifier's hidden layer, confidence and class balance of ``samples``.

    Args:
        samples, real: float tensors ``(N, 1, H, W)`` in [-1, 1].
    """
    import numpy as np
    from scipy import linalg
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier

    labels = load_digits().target
    x_real = real.flatten(1).numpy().astype(np.float64)
    clf = MLPClassifier(hidden_layer_sizes=(128,), max_iter=500, random_state=0).fit(x_real, labels)

    def features(x):
        return np.maximum(x @ clf.coefs_[0] + clf.intercepts_[0], 0)

    def frechet(a, b):
        mu1, mu2 = a.mean(0), b.mean(0)
        s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
        covmean = linalg.sqrtm(s1 @ s2).real
        return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))

    x_gen = samples.flatten(1).numpy().astype(np.float64)
    order = np.random.default_rng(0).permutation(len(x_real))
    half = len(x_real) // 2
    probs = clf.predict_proba(x_gen)
    counts = np.bincount(probs.argmax(1), minlength=10) / len(x_gen)
    entropy = -(counts[counts > 0] * np.log(counts[counts > 0])).sum() / np.log(10)
    return {"fd": frechet(features(x_gen), features(x_real)),
            "fd_real_floor": frechet(features(x_real[order[:half]]), features(x_real[order[half:]])),
            "confidence": float(probs.max(1).mean()), "class_balance": float(entropy)}


def evaluate(unet, num_samples: int, device: str, prediction_type: str = "epsilon", seed: int = 0) -> dict:
    """Sample with DDIM 20/50/100 (eta 0) and DDPM 1000, score each.

    (The recorded sweep of benchmarks/results/tune_defaults_h100.json predates ``prediction_type`` here: its
    ``lr2e-3_vpred`` row sampled a v-model as eps and is not a valid result.)
    """
    import torch
    from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler

    from ddpm_hf.data import load_digits_tensor

    real = load_digits_tensor(16)
    unet = unet.to(device).eval()
    results = {}
    ddim, ddpm = DDIMScheduler(prediction_type=prediction_type), DDPMScheduler(prediction_type=prediction_type)
    for name, scheduler, steps in (("ddim20", ddim, 20), ("ddim50", ddim, 50), ("ddim100", ddim, 100),
                                   ("ddpm1000", ddpm, 1000)):
        pipe = DDPMPipeline(unet=unet, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        with torch.inference_mode():
            images = pipe(batch_size=num_samples, generator=torch.Generator().manual_seed(seed),
                          num_inference_steps=steps, output_type="np").images
        samples = torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1
        results[name] = digits_metrics(samples, real)
    return results


def run_one(name: str, flags: list[str], out: str, num_samples: int) -> dict:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.time()
    if name.startswith("reference"):
        from bench_training import reference_train  # this script's folder is on sys.path when run as a script

        unet, ema, _ = reference_train(int(flags[0]), 64, device=device)
        ema.copy_to(unet.parameters())
        info = {"steps": int(flags[0])}
    else:
        from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

        from ddpm_hf.training import PipelineClasses

        # diffusers' classes, so the sweep measures hyperparameters, not work in progress elsewhere.
        classes = PipelineClasses(UNet2DModel, DDPMScheduler, DDIMScheduler, DDPMPipeline)
        train_main = runpy.run_path(TRAIN_SCRIPT, run_name="train_recipe")["main"]
        run_dir = os.path.join(out, name.replace("/", "_"))
        info = train_main(flags + ["--output_dir", run_dir, "--logger", "none", "--overwrite_output_dir", "true",
                                   "--checkpointing_steps", "100000"], classes=classes)
        unet = UNet2DModel.from_pretrained(os.path.join(run_dir, "unet"))
    result = {"name": name, "flags": flags, "train": info, "train_seconds": time.time() - started,
              "device": device, "eval": evaluate(unet, num_samples, device, _prediction_type(flags))}
    return result


def _prediction_type(flags: list[str]) -> str:
    return flags[flags.index("--prediction_type") + 1] if "--prediction_type" in flags else "epsilon"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--num_samples", type=int, default=900)
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    all_configs = configs(args.steps)
    os.makedirs(args.out, exist_ok=True)
    if args.worker:
        result = run_one(args.worker, all_configs[args.worker], args.out, args.num_samples)
        with open(os.path.join(args.out, args.worker.replace("/", "_") + ".json"), "w") as f:
            json.dump(result, f, indent=1)
        return
    names = args.only or list(all_configs)
    pending, running = list(names), []
    while pending or running:
        while pending and len(running) < args.parallel:
            name = pending.pop(0)
            cmd = [sys.executable, __file__, "--out", args.out, "--steps", str(args.steps), "--num_samples",
                   str(args.num_samples), "--worker", name]
            log = open(os.path.join(args.out, name.replace("/", "_") + ".log"), "w")
            running.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)))
        time.sleep(1)
        for item in [r for r in running if r[1].poll() is not None]:
            running.remove(item)
            print(f"{item[0]} exited {item[1].returncode}", flush=True)
    summarise(args.out, names)


def summarise(out: str, names: list[str]) -> None:
    print(f"{'config':24s} {'sampler':9s} {'FD':>8s} {'floor':>6s} {'conf':>6s} {'balance':>7s}")
    for name in names:
        path = os.path.join(out, name.replace("/", "_") + ".json")
        if not os.path.exists(path):
            print(f"{name:24s} (no result)")
            continue
        with open(path) as f:
            result = json.load(f)
        for sampler, m in result["eval"].items():
            print(f"{name:24s} {sampler:9s} {m['fd']:8.2f} {m['fd_real_floor']:6.2f} {m['confidence']:6.3f} "
                  f"{m['class_balance']:7.3f}")


if __name__ == "__main__":
    main()
