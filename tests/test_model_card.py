"""The rendered model card: YAML header that survives any user string, every hyperparameter, no secrets."""

import pytest
import yaml
from huggingface_hub import ModelCard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ddpm_hf.model_card import TEMPLATE_PATH, strip_secrets, write_model_card

TOKEN = "hf_" + "Kp4" * 12
ARGS = {
    "learning_rate": 2e-4,
    "train_batch_size": 64,
    "ddpm_beta_schedule": "linear",
    "use_ema": True,
    "block_out_channels": [32, 64],
    "hub_token": TOKEN,
    "HF_TOKEN": TOKEN,
    "note": f"pushed with {TOKEN}",
}
METRICS = {"fid_digits": 1.234567, "fid_digits_floor": 0.5, "bits_per_dim": 3.1}


def header(path):
    text = open(path, encoding="utf-8").read()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("\n---\n", 1)[0][4:]), text


def test_card_has_metadata_hyperparameters_metrics_grid_and_usage(tmp_path):
    path = write_model_card(str(tmp_path), ARGS, METRICS, "alice/ddpm-digits", "sklearn digits (8x8, upscaled)",
                            "samples/grid 100.png", global_step=1500, wall_time_s=605.2)
    data, text = header(path)
    assert data["library_name"] == "diffusers"
    assert data["pipeline_tag"] == "unconditional-image-generation"
    assert {"ddpm", "diffusers-ddpm", "ddpm_hf"} <= set(data["tags"])
    assert data["datasets"] == ["sklearn digits (8x8, upscaled)"] and data["license"] == "apache-2.0"
    for name in ("learning_rate", "train_batch_size", "ddpm_beta_schedule", "use_ema", "block_out_channels"):
        assert f"| {name} |" in text
    assert "| 0.0002 |" in text and "[32, 64]" in text
    assert "1500" in text and "10 min 05 s" in text
    assert "1.23457" in text and "Bits/dim" in text
    assert "![Samples from the model](samples/grid%20100.png)" in text
    assert "DDPMPipeline.from_pretrained('alice/ddpm-digits')" in text
    assert "from ddpm_hf import" in text
    assert TOKEN not in text and "hub_token" not in text and "HF_TOKEN" not in text
    assert ModelCard.load(path).data.library_name == "diffusers"


def test_card_without_repo_grid_or_metrics(tmp_path):
    path = write_model_card(str(tmp_path), {}, {}, None, "my data", None)
    text = open(path, encoding="utf-8").read()
    assert f"from_pretrained('./{tmp_path.name}')" in text
    assert "No sample grid" in text and "not evaluated" in text and "not recorded" in text


NASTY = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=40
).filter(lambda s: s.strip()) | st.sampled_from(
    ["---", "a\n---\nb: c", "'quoted' \"double\"", "key: value", "- list", "\r\n---\r\n", "{{ card_data }}",
     "name: |\n  x", "# not a heading", "x | y | z", "\u2028---\u2029", "```", "... ", "@at", "!!python/object"]
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(dataset_name=NASTY, note=NASTY)
def test_user_strings_never_break_the_yaml_header(tmp_path, dataset_name, note):
    path = write_model_card(str(tmp_path), {"note": note, note: 1}, {"custom": note}, "alice/x", dataset_name, None)
    data, _ = header(path)
    assert data["datasets"] == [dataset_name]
    assert data["library_name"] == "diffusers" and data["pipeline_tag"] == "unconditional-image-generation"
    card = ModelCard.load(path)  # huggingface_hub's own parser agrees
    assert card.data.datasets == [dataset_name]


@pytest.mark.parametrize("bad", ["", "a/b/c", "has space/x", "x" * 200])
def test_invalid_repo_ids_are_rejected(tmp_path, bad):
    with pytest.raises(ValueError):
        write_model_card(str(tmp_path), {}, {}, bad, "d", None)


def test_other_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="output_dir"):
        write_model_card(str(tmp_path / "missing"), {}, {}, None, "d", None)
    with pytest.raises(ValueError, match="dataset_name"):
        write_model_card(str(tmp_path), {}, {}, None, "  ", None)
    with pytest.raises(ValueError, match="wall_time_s"):
        write_model_card(str(tmp_path), {}, {}, None, "d", None, wall_time_s=float("nan"))
    with pytest.raises(TypeError, match="training_args"):
        write_model_card(str(tmp_path), ["lr"], {}, None, "d", None)


def test_strip_secrets_is_recursive_and_masks_token_shaped_values():
    clean = strip_secrets({"a": 1, "nested": {"api_key": "k", "ok": f"x {TOKEN}"}, "Password": "p"})
    assert clean == {"a": 1, "nested": {"ok": "x ***"}}


def test_template_is_the_repo_root_file():
    assert TEMPLATE_PATH.name == "model_card.md" and TEMPLATE_PATH.is_file()
    assert "{{ card_data }}" in TEMPLATE_PATH.read_text()
