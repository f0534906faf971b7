"""The card's YAML holds the evaluation as ``model-index`` results (the Hub's convention), values as passed in;
the card states the skipped-image count and refuses a loss plot that is not there."""

import pytest
from huggingface_hub import ModelCard
from test_model_card import EVAL, card, folder, saved  # noqa: F401 - the fixtures

METRICS = {"fid_digits": 1.234567, "fid_digits_floor": 0.5, "class_balance": 0.97, "classifier_confidence": 0.93,
           "bits_per_dim": 3.1}  # the scalar metrics of test_model_card.RESULTS, written out again


def test_model_index_results_are_the_metrics_passed_in(folder):  # noqa: F811
    data, _, path = card(folder, dataset_name="huggan/smithsonian_butterflies_subset")
    (index,) = data["model-index"]
    assert index["name"] == "ddpm-digits"
    (result,) = index["results"]
    assert result["task"]["type"] == "unconditional-image-generation"
    assert result["dataset"] == {"name": EVAL.reference, "type": "huggan/smithsonian_butterflies_subset"}
    assert {m["type"]: m["value"] for m in result["metrics"]} == METRICS
    # huggingface_hub parses it back into the same EvalResults
    parsed = ModelCard.load(path).data.eval_results
    assert {r.metric_type: r.metric_value for r in parsed} == METRICS


def test_no_evaluation_no_model_index(folder):  # noqa: F811
    data, body, _ = card(folder, evaluation=None, metrics={})
    assert "model-index" not in data and "Unreadable images" not in body


def test_the_skipped_image_count_is_stated(folder):  # noqa: F811
    _, body, _ = card(folder, metrics={"skipped_unreadable_images": 3})
    assert "- Unreadable images skipped while reading the data: 3" in body


def test_a_missing_loss_plot_is_named(folder):  # noqa: F811
    with pytest.raises(ValueError, match="loss_plot"):
        card(folder, loss_plot="loss.png")
    (folder / "loss.png").write_bytes(b"png")
    _, body, _ = card(folder, loss_plot="loss.png")
    assert "![Training loss](loss.png)" in body
