"""Class-conditional evaluation: conditional accuracy with its ceiling, FID per class with floors, NFE, the CLI."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import ddpm_hf
from ddpm_hf import evaluate
from ddpm_hf.class_metrics import digits_real_labels
from ddpm_hf.evaluate import digits_real_images, evaluate_conditional, load_digits_classifier


class ClassReplay:
    """Returns real digits of the requested class (``shift`` = 1: of the next class instead) in a random order.

    The digits classifier was trained on the train split, so its features of train images are not distributed as
    those of unseen ones: the replay draws from the held-out images themselves (a model that reproduces them)."""

    def __init__(self, images, labels, shift=0):
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(7))
        images, labels = images[order], labels[order]
        self.pools = {c: list(images[labels == c]) for c in range(10)}
        self.shift, self.served = shift, []

    def __call__(self, batch_size, generator, output_type, class_labels, guidance_scale, guidance_rescale,
                 num_inference_steps=None):
        assert output_type == "np" and len(class_labels) == batch_size and guidance_scale == 3.0
        batch = torch.stack([self.pools[(int(y) + self.shift) % 10].pop(0) for y in class_labels])
        self.served.append(batch)
        return SimpleNamespace(images=((batch.permute(0, 2, 3, 1) + 1) / 2).numpy())


@pytest.fixture(scope="module")
def digits():
    return {s: (digits_real_images(s, 16, 1), digits_real_labels(s)) for s in ("train", "test")}


def test_replaying_real_digits_scores_the_classifier_ceiling_and_about_the_floor(digits):
    test, test_y = digits["test"]
    replay = ClassReplay(test, test_y)
    m = evaluate_conditional(replay, test, test_y, guidance_scale=3.0, num_inference_steps=None, batch_size=37)
    served = torch.cat(replay.served)
    requested = torch.arange(10).repeat_interleave(m["num_per_class"])
    classifier = load_digits_classifier()
    with torch.no_grad():  # independently: the classifier on exactly the images served, and on the real test set
        expected = (classifier(served).argmax(-1) == requested).double().mean().item()
        ceiling = (classifier(test).argmax(-1) == test_y).double().mean().item()
    assert m["conditional_accuracy"] == pytest.approx(expected, abs=1e-12)
    assert m["classifier_accuracy_real"] == pytest.approx(ceiling, abs=1e-12) and ceiling > 0.9
    assert m["conditional_accuracy"] > 0.9
    assert m["num_per_class"] == min(int((test_y == c).sum()) // 2 for c in range(10))
    assert m["nfe_per_sample"] is None and m["classes"] == list(range(10))
    # held-out digits of the right class: FID about its floor overall and in every class
    assert m["fid_digits"] < 1.5 * m["fid_digits_floor"]
    assert all(f < 2.0 * fl for f, fl in zip(m["fid_digits_per_class"], m["fid_digits_floor_per_class"]))


def test_the_wrong_class_is_caught_by_accuracy_and_per_class_fid_not_by_overall_fid(digits):
    test, test_y = digits["test"]
    m = evaluate_conditional(ClassReplay(test, test_y, shift=1), test, test_y, guidance_scale=3.0)
    assert m["conditional_accuracy"] < 0.1
    assert m["fid_digits"] < 1.5 * m["fid_digits_floor"]  # the classes as a whole are still right
    assert all(f > 3.0 * fl for f, fl in zip(m["fid_digits_per_class"], m["fid_digits_floor_per_class"]))


def test_floors_are_at_matched_counts(digits):
    test, test_y = digits["test"]
    seen = []

    def pixels(images):
        seen.append(len(images))
        return images.flatten(1)[:, ::8]

    m = evaluate_conditional(ClassReplay(test, test_y), test, test_y, guidance_scale=3.0, num_per_class=6,
                             feature_extractor={"pixels": pixels}, batch_size=10_000)
    assert m["num_per_class"] == 6 and seen == [60, len(test)]
    b = m["num_real_b_per_class"]
    assert sum(b) + 10 * 6 <= len(test) and all(n >= (test_y == c).sum() // 2 for c, n in enumerate(b))


def test_bad_arguments_name_them(digits):
    test, test_y = digits["test"]
    with pytest.raises(ValueError, match="real_labels"):
        evaluate_conditional(None, test, test_y[:-1])
    with pytest.raises(ValueError, match="num_per_class"):
        evaluate_conditional(None, test, test_y, num_per_class=1)
    with pytest.raises(ValueError, match="at least 4"):
        evaluate_conditional(None, test[:12], test_y[:12])


def _cfg_export(tmp_path):
    torch.manual_seed(0)
    unet = ddpm_hf.UNet2DModel(sample_size=16, in_channels=1, out_channels=1, layers_per_block=1,
                               block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                               up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4, num_class_embeds=11)
    pipe = ddpm_hf.DDPMPipeline(unet.eval(), ddpm_hf.DDIMScheduler(num_train_timesteps=50),
                                id2label={i: str(i) for i in range(10)})
    pipe.save_pretrained(tmp_path)
    return pipe


@pytest.mark.parametrize("w, nfe", [(1.0, 3), (2.0, 6)])
def test_network_evaluations_are_counted_with_guidance_as_two(tmp_path, digits, w, nfe):
    pipe = _cfg_export(tmp_path)
    test, test_y = digits["test"]
    m = evaluate_conditional(pipe, test, test_y, guidance_scale=w, num_per_class=2, num_inference_steps=3)
    assert m["nfe_per_sample"] == nfe and m["guidance_scale"] == w
    assert not pipe.unet._forward_pre_hooks  # the counter is removed


def test_cli_reports_conditional_metrics_for_a_conditional_export(tmp_path, capsys):
    _cfg_export(tmp_path)
    m = evaluate.main([str(tmp_path), "--guidance_scale", "2", "--num_per_class", "2", "--num_inference_steps", "2",
                       "--feature_extractor", "digits"])
    assert m["nfe_per_sample"] == 4 and m["guidance_scale"] == 2.0 and m["num_per_class"] == 2
    assert {"conditional_accuracy", "classifier_accuracy_real", "fid_digits", "fid_digits_floor",
            "fid_digits_per_class", "fid_digits_floor_per_class"} <= set(m)
    assert '"conditional_accuracy"' in capsys.readouterr().out
