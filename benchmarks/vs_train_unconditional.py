#!/usr/bin/env python
"""Training images/s of ``training/train.py`` against diffusers' own ``train_unconditional.py``, interleaved.

Same network (the tiny preset with 3 channels, because the example converts every image to RGB), the same
1,797 digits as 16x16 RGB PNGs in an image folder (ours with ``--eval_holdout 0``: it trains on all of them, as the
example does, so both epochs end in the same short batch of 5), batch 64, EMA on, 1 torch thread, no loader workers,
no loss weighting in either (``--snr_gamma 0`` for ours). Each run is one process; the time between its 6th and
its second-to-last ``accelerator.backward`` call is the steady-state training time of both loops (start-up,
compilation, the epoch's short last batch, the example's per-epoch sampling and our export fall outside it).

Arms, at equal dtype: ours and the example in fp32, ours with ``--torch_compile`` (fp32; each compiled run gets a
fresh, empty Inductor cache, so its compile cost is a cold one), and ours and the example with
``--mixed_precision bf16``. The compile cost is reported separately: the compiled run's time from process start
to its second backward call (its first optimizer step done) minus the eager run's.

The example is not in the diffusers wheel: bring the public repository (e.g. ``git clone`` or the project's
``fetch``) and extract it into the git-ignored ``.peers/``::

    git --git-dir <diffusers>/.git show HEAD:examples/unconditional_image_generation/train_unconditional.py \
        > .peers/train_unconditional.py
    OMP_NUM_THREADS=1 python benchmarks/vs_train_unconditional.py --rounds 3

It imports torchvision for its transforms only; torchvision's PyPI build does not import beside torch 2.13.0, so
this script injects a module of equivalent PIL/torch transforms at run time (`_torchvision_stub`).
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import statistics
import subprocess
import sys
import tempfile
import time
import types

import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER = os.path.join(ROOT, ".peers", "train_unconditional.py")
SKIP = 5  # backward calls left out at the start (allocator and oneDNN warm-up)


class _StopAfterTraining(Exception):
    """Raised at the example's first sampling call: its training epoch is over."""


def _torchvision_stub() -> types.ModuleType:
    """torchvision.transforms as the example uses it (Resize, crops, flip, ToTensor, Normalize, ...), in PIL/torch."""
    tv, tf = types.ModuleType("torchvision"), types.ModuleType("torchvision.transforms")

    class InterpolationMode:
        BILINEAR = Image.BILINEAR

    def resize(size, interpolation=Image.BILINEAR):
        def apply(img):
            w, h = img.size
            scale = size / min(w, h)
            return img.resize((max(size, round(w * scale)), max(size, round(h * scale))), interpolation)
        return apply

    def random_crop(size):
        def apply(img):
            w, h = img.size
            left, top = int(torch.randint(0, w - size + 1, ())), int(torch.randint(0, h - size + 1, ()))
            return img.crop((left, top, left + size, top + size))
        return apply

    def center_crop(size):
        def apply(img):
            w, h = img.size
            left, top = (w - size) // 2, (h - size) // 2
            return img.crop((left, top, left + size, top + size))
        return apply

    def flip():
        return lambda img: img.transpose(Image.FLIP_LEFT_RIGHT) if torch.rand(()) < 0.5 else img

    def to_tensor():
        return lambda img: torch.from_numpy(__import__("numpy").asarray(img, dtype="float32") / 255.0).permute(2, 0, 1)

    def normalize(mean, std):
        return lambda x: (x - mean[0]) / std[0]

    def compose(fns):
        def apply(x):
            for fn in fns:
                x = fn(x)
            return x
        return apply

    tf.InterpolationMode, tf.Resize, tf.RandomCrop, tf.CenterCrop = InterpolationMode, resize, random_crop, center_crop
    tf.RandomHorizontalFlip, tf.ToTensor, tf.Normalize, tf.Compose = flip, to_tensor, normalize, compose
    tf.Lambda = lambda fn: fn
    tf.PILToTensor = lambda: (lambda img: torch.from_numpy(__import__("numpy").array(img)).permute(2, 0, 1))
    tf.ConvertImageDtype = lambda dtype: (lambda x: x.to(dtype) / 255.0)  # --preserve_input_precision only
    tv.transforms = tf
    return tv


def _timed_backward() -> list[float]:
    """Record the time of every `Accelerator.backward` call (both loops call it once per micro-batch)."""
    import accelerate

    stamps: list[float] = []
    original = accelerate.Accelerator.backward

    def backward(self, loss, **kwargs):
        stamps.append(time.perf_counter())
        return original(self, loss, **kwargs)

    accelerate.Accelerator.backward = backward
    return stamps


def _timed_parts() -> dict[str, list[float]]:
    """Record how long each step's parts take in either loop: the loader's next batch, the network's training
    forward, ``Accelerator.backward`` and AdamW's step (medians go into the child's JSON as ``parts_ms``)."""
    import accelerate
    import diffusers
    import torch.utils.data.dataloader as loader

    import ddpm_hf

    parts: dict[str, list[float]] = {"data": [], "forward": [], "backward": [], "adamw": []}
    targets = [(loader._BaseDataLoaderIter, "__next__", "data"), (diffusers.UNet2DModel, "forward", "forward"),
               (ddpm_hf.UNet2DModel, "forward", "forward"), (accelerate.Accelerator, "backward", "backward"),
               (torch.optim.AdamW, "step", "adamw")]
    for owner, name, part in targets:
        original = getattr(owner, name)

        def timed(*args, _original=original, _part=part, **kwargs):
            if _part == "forward" and not torch.is_grad_enabled():  # sampling for grids is not a training step
                return _original(*args, **kwargs)
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                parts[_part].append(time.perf_counter() - start)

        setattr(owner, name, timed)
    return parts


def child(which: str, argv: list[str], batch: int) -> None:
    """Run one loop in this process and print its steady-state images/s and time to first step as JSON."""
    started = time.perf_counter()
    torch.set_num_threads(1)
    parts = _timed_parts()
    stamps = _timed_backward()
    if which == "peer":
        # First: diffusers and datasets probe for torchvision at import time, and must find none.
        import datasets  # noqa: F401
        import diffusers
        import diffusers.optimization
        import diffusers.training_utils  # noqa: F401

        sys.modules["torchvision"] = _torchvision_stub()
        sys.modules["torchvision.transforms"] = sys.modules["torchvision"].transforms

        def stop(*args, **kwargs):
            raise _StopAfterTraining

        diffusers.DDPMPipeline.__call__ = stop
        script = PEER
    else:
        script = os.path.join(ROOT, "training", "train.py")
    sys.argv = [script] + argv
    try:
        runpy.run_path(script, run_name="__main__")
    except _StopAfterTraining:
        pass
    # The window ends at the last batch's backward: the epoch's last, short batch (1,797 = 28 x 64 + 29) is left out
    # of it, because a compiled network compiles once more for a new batch size there; its time is printed apart.
    steps = len(stamps) - 2 - SKIP
    print(json.dumps({"images_per_sec": batch * steps / (stamps[-2] - stamps[SKIP]), "steps": steps,
                      "first_step_s": stamps[1] - started, "short_batch_s": stamps[-1] - stamps[-2],
                      "threads": torch.get_num_threads(),
                      "parts_ms": {k: 1e3 * statistics.median(v[SKIP:]) for k, v in parts.items() if v[SKIP:]}}))


def write_digits(folder: str) -> None:
    """The 1,797 sklearn digits as 16x16 RGB PNGs (the example converts to RGB anyway)."""
    from ddpm_hf.data import load_digits_tensor

    images = ((load_digits_tensor(16) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    os.makedirs(folder)
    for i, image in enumerate(images):
        Image.fromarray(image[0].numpy(), "L").convert("RGB").save(os.path.join(folder, f"{i:04d}.png"))


def write_unet_config(path: str) -> None:
    from ddpm_hf.models import UNET_PRESETS

    config = dict(UNET_PRESETS["tiny"], in_channels=3, out_channels=3, sample_size=16, _class_name="UNet2DModel")
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as handle:
        json.dump(config, handle)


# name: (loop, precision, extra flags of ours)
ARMS = {"ours": ("ours", "no", []), "peer": ("peer", "no", []),
        "ours --torch_compile": ("ours", "no", ["--torch_compile", "true"]),
        "ours bf16": ("ours", "bf16", []), "peer bf16": ("peer", "bf16", [])}


def arguments(arm: str, work: str, run: int, batch: int, steps: int) -> list[str]:
    which, precision, extra = ARMS[arm]
    out = os.path.join(work, f"{arm.replace(' ', '_')}-{run}")
    common = ["--train_data_dir", os.path.join(work, "digits"), "--resolution", "16", "--train_batch_size",
              str(batch), "--model_config_name_or_path", os.path.join(work, "unet"), "--output_dir", out,
              "--checkpointing_steps", "100000", "--mixed_precision", precision, "--logger", "tensorboard"]
    if which == "peer":
        return common + ["--num_epochs", "1", "--use_ema", "--save_model_epochs", "1000"]
    return common + ["--num_channels", "3", "--max_train_steps", str(steps), "--snr_gamma", "0", "--use_ema",
                     "true", "--eval_holdout", "0"] + extra


def run_arm(arm: str, work: str, run: int, batch: int, steps: int) -> dict:
    """One arm's run as a child process (a compiled one with its own empty Inductor cache: a cold compile)."""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               TORCHINDUCTOR_CACHE_DIR=os.path.join(work, f"inductor-{arm.replace(' ', '_')}-{run}"))
    command = [sys.executable, __file__, "--child", ARMS[arm][0], "--batch", str(batch), "--"] \
        + arguments(arm, work, run, batch, steps)
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        sys.exit(f"{arm} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(results: dict[str, list[dict]], batch: int, steps: int) -> None:
    """Medians per arm, the ratios at equal dtype, and the compile cost beside the compiled images/s."""
    from ddpm_hf.hardware import describe_hardware

    speed = {arm: statistics.median(r["images_per_sec"] for r in rows) for arm, rows in results.items()}
    first = {arm: statistics.median(r["first_step_s"] for r in rows) for arm, rows in results.items()}
    print(f"machine: {describe_hardware()}")
    print(f"load average (1, 5, 15 min) at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"1 torch thread, batch {batch}, tiny net (3 channels) at 16x16, {steps} steps per run")
    for arm in results:
        split = {k: statistics.median(r["parts_ms"][k] for r in results[arm]) for k in results[arm][0]["parts_ms"]}
        print(f"median {arm}: {speed[arm]:.1f} images/s, time to first step {first[arm]:.1f} s; a step's parts "
              f"(median ms): {', '.join(f'{k} {v:.1f}' for k, v in split.items())}")
    for dtype, mine, theirs in (("fp32", "ours", "peer"), ("bf16", "ours bf16", "peer bf16")):
        if mine in speed and theirs in speed:
            print(f"{dtype}: ours / diffusers' train_unconditional.py {speed[mine] / speed[theirs]:.2f}x")
    if "ours --torch_compile" in speed and "ours" in speed:
        _report_compile(results, speed)


def _report_compile(results: dict[str, list[dict]], speed: dict[str, float]) -> None:
    compile_cost = [c["first_step_s"] - e["first_step_s"] for c, e in zip(results["ours --torch_compile"],
                                                                           results["ours"])]
    short = {arm: statistics.median(r["short_batch_s"] for r in rows) for arm, rows in results.items()}
    print(f"fp32: ours --torch_compile / ours {speed['ours --torch_compile'] / speed['ours']:.2f}x in steady state; "
          f"its one-off compile cost (time to first step minus eager's, per round): "
          f"{', '.join(f'{c:.1f} s' for c in compile_cost)}, excluded from its images/s; the short last batch "
          f"(a new shape: one more compile) took {short['ours --torch_compile']:.1f} s compiled, "
          f"{short['ours']:.1f} s eager")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", choices=["ours", "peer"], help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS), help="a subset of the arms")
    args, rest = parser.parse_known_args()
    if args.child:
        return child(args.child, rest[1:] if rest[:1] == ["--"] else rest, args.batch)
    if not os.path.isfile(PEER):
        sys.exit(f"{PEER} is missing: extract diffusers' example there (see this script's docstring)")

    steps = -(-1797 // args.batch)  # the example trains one epoch; ours the same number of steps
    work = tempfile.mkdtemp(prefix="ddpm_hf-vs-example-")
    write_digits(os.path.join(work, "digits"))
    write_unet_config(os.path.join(work, "unet"))
    results: dict[str, list[dict]] = {arm: [] for arm in args.arms}
    for run in range(args.rounds):
        for arm in (args.arms if run % 2 == 0 else list(reversed(args.arms))):  # interleaved, order alternating
            line = run_arm(arm, work, run, args.batch, steps)
            results[arm].append(line)
            print(f"round {run} {arm}: {line['images_per_sec']:.1f} images/s over {line['steps']} steps, time to "
                  f"first step {line['first_step_s']:.1f} s, short last batch {line['short_batch_s']:.1f} s, "
                  f"{line['threads']} thread(s)", flush=True)
    report(results, args.batch, steps)


if __name__ == "__main__":
    main()
