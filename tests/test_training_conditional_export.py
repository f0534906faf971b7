"""What a class-conditional run leaves behind: a remote-code export that keeps its class names, a grid with one row
per class sampled with guidance, a card that lists the classes and whose class-conditional snippets run, the
per-class evaluation of --eval, and the Hub push."""

import json
import os
import re
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from test_card_snippets import python_blocks
from test_training import run, tiny_flags, train_state_reset

import ddpm_hf

DIGITS = {str(k): str(k) for k in range(10)}


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    train_state_reset()


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("conditional")
    metrics = run(tmp_path, class_conditional="true", max_train_steps=2, guidance_scale=3.0)
    train_state_reset()
    return tmp_path / "out", metrics


def test_the_export_keeps_the_class_names_and_the_null_class(export):
    out, _ = export
    index = json.loads((out / "model_index.json").read_text())
    assert index["id2label"] == DIGITS and (out / "pipeline_ddpm_hf.py").exists()
    assert json.loads((out / "unet" / "config.json").read_text())["num_class_embeds"] == 11
    pipeline = ddpm_hf.DDPMPipeline.from_pretrained(out)
    assert pipeline.id2label == {int(k): v for k, v in DIGITS.items()}


def test_the_grid_has_one_row_of_eight_per_class(export):
    out, _ = export
    grid = np.asarray(Image.open(out / "samples.png"))
    scale = 64 // 8  # 8x8 tiles upscaled to 64 pixels, one white pixel between tiles
    assert grid.shape == ((10 * 9 + 1) * scale, (8 * 9 + 1) * scale)


def test_the_card_lists_the_classes_and_says_how_the_grid_was_guided(export):
    out, _ = export
    readme = (out / "README.md").read_text()
    assert "class-conditional" in readme.split("---")[1]  # a tag in the YAML header
    assert "unconditional-image-generation" not in readme.split("---")[1]
    for k in range(10):
        assert f"| {k} | {k} |" in readme
    assert re.search(r"null class \(id\s+10,", readme)
    assert re.search(r"guidance scale w = 3 \(samples.png\)\. One row per class, top to bottom: 0, 1, 2, .*, 9 "
                     r"\(classifier-free guidance\)\.", readme)
    remote, ours, fastest = python_blocks(readme)
    for block in (remote, ours, fastest):
        assert "class_labels=['7'] * 16, guidance_scale=3.0" in block
    assert "trust_remote_code=True" in remote


def test_the_cards_class_conditional_snippets_run(export, monkeypatch):
    out, _ = export
    monkeypatch.chdir(out.parent)
    for block in python_blocks((out / "README.md").read_text()):
        block = re.sub(r"num_inference_steps=\d+", "num_inference_steps=2", block)  # the tiny net: 2 steps do
        namespace = {"__name__": "__main__"}
        exec(compile(block, "card-snippet", "exec"), namespace)
        assert len(namespace["images"]) == 16
        image = np.asarray(Image.open("sample.png"), dtype=np.float64)
        assert image.shape == (8, 8) and np.isfinite(image).all()
        os.remove("sample.png")


def test_eval_measures_per_class_and_push_sends_the_export(tmp_path, monkeypatch):
    import ddpm_hf.hub

    calls = []

    class FakePusher:
        def __init__(self, repo_id, token, private, folder, **kwargs):
            calls.append(("init", repo_id, private))

        def create(self, **kwargs):
            calls.append(("create",))

        def push(self, message):
            calls.append(("push", message))

        def wait(self):
            return True

    monkeypatch.setattr(ddpm_hf.hub, "HubPusher", FakePusher)
    metrics = run(tmp_path, class_conditional="true", max_train_steps=2, eval="true", push_to_hub="true",
                  hub_model_id="me/cfg-digits")
    assert calls[0] == ("init", "me/cfg-digits", False) and calls[-1] == ("push", "Step 2 (final)")
    assert 0 <= metrics["conditional_accuracy"] <= 1 and len(metrics["fid_digits_per_class"]) == 10
    assert metrics["guidance_scale"] == 1.25 and metrics["nfe_per_sample"] == 4  # 2 DDIM steps x 2 passes
    assert metrics["classifier_accuracy_real"] > 0.9
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "Conditional accuracy (the digits classifier names the requested class)" in readme
    assert "Classifier accuracy on real images (reference for the conditional accuracy)" in readme
    assert "FID, digits features, per class (class order)" in readme


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed (gloo)")
def test_two_processes_shard_images_and_labels_together(tmp_path):
    """A real 2-rank gloo run: accelerate shards the (images, labels) batches field by field."""
    from fault_injection import free_port
    from test_training_resume import SCRIPT, _env

    command = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), SCRIPT]
    flags = tiny_flags(tmp_path, max_train_steps=3, train_batch_size=64, class_conditional="true")
    result = subprocess.run(command + flags, env=dict(_env(), ACCELERATE_USE_CPU="1"), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "num_processes=2" in result.stderr and "total batch 128" in result.stderr
    assert "Class-conditional: 10 classes" in result.stderr
    assert json.loads((tmp_path / "out" / "model_index.json").read_text())["id2label"] == DIGITS
