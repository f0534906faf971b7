"""The rendered model card: YAML that survives any user string, every hyperparameter, no secrets, and only
statements that are true of the saved folder and the run (the snippets themselves run in test_card_snippets.py)."""

import dataclasses
import json
import shutil

import pytest
import yaml
from huggingface_hub import ModelCard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import ddpm_hf
from ddpm_hf.data import DIGITS_NAME
from ddpm_hf.model_card import TEMPLATE_PATH, EvalFacts, GridFacts, RunFacts, strip_secrets, write_model_card
from ddpm_hf.schedulers.registry import contract_for

TOKEN = "hf_" + "Kp4" * 12
ARGS = {
    "learning_rate": 2e-4,
    "train_batch_size": 64,
    "ddpm_beta_schedule": "linear",
    "use_ema": True,
    "block_out_channels": [32, 64],
    "output_dir": "/home/alice/runs/ddpm-digits",
    "hub_token": TOKEN,
    "HF_TOKEN": TOKEN,
    "note": f"pushed with {TOKEN}",
}
TINY = dict(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
            down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
            norm_num_groups=4)
GRID = GridFacts(filename="samples/grid 100.png", sampler="DDIM", num_inference_steps=25, weights="EMA", seed=7)
RESULTS = {"num_generated": 64, "num_real_a": 64, "num_real_b": 225, "num_bpd_images": 32, "fid_digits": 1.234567,
           "fid_digits_floor": 0.5, "class_balance": 0.97, "classifier_confidence": 0.93, "bits_per_dim": 3.1}
EVAL = EvalFacts(reference="the 450 digits of the fixed test split", heldout=True, sampler="DDIM",
                 num_inference_steps=25, weights="EMA", seed=0, results=RESULTS)


def _save(folder, scheduler):
    ddpm_hf.DDPMPipeline(ddpm_hf.UNet2DModel(**TINY), scheduler).save_pretrained(folder)
    (folder / "samples").mkdir()
    Image.new("L", (16, 16)).save(folder / "samples" / "grid 100.png")
    return folder


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two saved folders: a stock one (DDPM, T = 50) and a remote-code one (fixed_large_log)."""
    root = tmp_path_factory.mktemp("saved")
    return {"stock": _save(root / "stock", ddpm_hf.DDPMScheduler(num_train_timesteps=50)),
            "remote": _save(root / "remote", ddpm_hf.DDPMScheduler(num_train_timesteps=40,
                                                                    variance_type="fixed_large_log"))}


@pytest.fixture
def folder(saved, tmp_path):
    return shutil.copytree(saved["stock"], tmp_path / "ddpm-digits")


def run_facts(**changes):
    base = RunFacts(training_args=ARGS, dataset_name=DIGITS_NAME, dataset_is_local=False,
                    train_split="1,347 of the 1,797 digits (the fixed train split)", global_step=1500,
                    wall_time_s=605.2, repo_id="alice/ddpm-digits", grid=GRID, metrics={"loss": 0.04},
                    evaluation=EVAL)
    return dataclasses.replace(base, **changes)


def card(folder, **changes):
    path = write_model_card(str(folder), run_facts(**changes))
    text = open(path, encoding="utf-8").read()
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body, path


def test_metadata_hyperparameters_grid_and_whole_run_facts(folder):
    data, body, path = card(folder)
    assert data["library_name"] == "diffusers" and data["pipeline_tag"] == "unconditional-image-generation"
    assert {"ddpm", "diffusers-ddpm", "ddpm_hf"} <= set(data["tags"])
    for name in ("learning_rate", "train_batch_size", "ddpm_beta_schedule", "use_ema", "block_out_channels"):
        assert f"| {name} |" in body
    assert "| 0.0002 |" in body and "[32, 64]" in body
    assert "Optimizer steps: 1500" in body
    assert "Wall time of the whole run (all resumed stretches, export and evaluation included): 10 min 05 s" in body
    assert "1,347 of the 1,797 digits (the fixed train split)" in body
    assert "![Samples from the model](samples/grid%20100.png)" in body
    assert "with DDIM, 25 steps, EMA weights, seed 7" in body  # the grid's sampler in its caption
    assert "ddpm_hf.DDPMPipeline.from_pretrained('alice/ddpm-digits')" in body
    assert "num_inference_steps=25, generator=torch.manual_seed(7)" in body  # the ddpm_hf snippet = the grid's
    assert "| loss | 0.04 |" in body
    assert TOKEN not in body and "hub_token" not in body and "HF_TOKEN" not in body
    assert "/home/alice" not in body and "| output_dir | ddpm-digits |" in body
    assert ModelCard.load(path).data.library_name == "diffusers"


def test_stock_folder_snippet_uses_a_step_count_the_saved_scheduler_accepts(folder):
    _, body, _ = card(folder)
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"
    assert "from diffusers import DDPMPipeline" in body and "num_inference_steps=50," in body
    assert "num_inference_steps=1000" not in body and "trust_remote_code" not in body
    assert "no remote code and no ddpm_hf are needed" in body


def test_remote_code_folder_says_so_and_why(saved, tmp_path):
    folder = shutil.copytree(saved["remote"], tmp_path / "remote")
    assert (folder / "pipeline_ddpm_hf.py").is_file()  # what the card's claim rests on
    _, body, _ = card(folder)
    assert "no remote code" not in body.lower() and "from diffusers import DDPMPipeline" not in body
    assert "DiffusionPipeline.from_pretrained('alice/ddpm-digits', trust_remote_code=True)" in body
    assert "pipeline_ddpm_hf.py" in body and "pip install ddpm_hf" in body
    # the reasons the scheduler contract gives for the saved config, all named on the card
    saved = ddpm_hf.DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    reasons = contract_for(saved).stock_divergences()
    assert reasons and all(f"- {reason}" in body for reason in reasons)
    assert "num_inference_steps=40," in body and "40 training\ntimesteps" in body


def test_no_evaluation_means_no_metric_text(folder):
    _, body, _ = card(folder, evaluation=None)
    section = body.split("## Evaluation", 1)[1]
    assert section.strip() == "Not evaluated (run with --eval or python -m ddpm_hf.evaluate)."
    for word in ("FID", "fid", "Bits/dim", "bits_per_dim", "floor", "held"):
        assert word not in body
    with pytest.raises(ValueError, match="evaluation is None"):
        card(folder, evaluation=None, metrics={"loss": 0.1, "fid_digits": 3.0})


def test_evaluation_states_reference_and_the_counts_beside_every_number(folder):
    _, body, _ = card(folder)
    section = body.split("## Evaluation", 1)[1]
    assert "the 450 digits of the fixed test split. These images were held out: training never saw them." in section
    assert "Samples: DDIM, 25 steps, EMA weights, seed 0." in section
    assert "| FID, digits features | 1.23457 | 64 generated vs 225 real (half B) |" in section
    assert "| FID floor (real vs real), digits features | 0.5 | 64 real (half A) vs 225 real (half B) |" in section
    assert "| Bits/dim (variational bound; lower is better) | 3.1 | 32 of the reference images |" in section
    assert "| Class balance of samples (normalised entropy, 1 = uniform) | 0.97 | 64 generated |" in section
    assert "images training never saw" in section and "num_generated" not in section
    assert "the floor uses" not in section.lower()  # matched counts: no warning


def test_kid_is_labelled_with_its_counts(folder):
    results = {**RESULTS, "kid_digits": 0.0123, "kid_digits_std": 0.002}
    _, body, _ = card(folder, evaluation=dataclasses.replace(EVAL, results=results))
    section = body.split("## Evaluation", 1)[1]
    assert "| KID, digits features | 0.0123 | 64 generated vs 225 real (half B) |" in section
    assert "| KID std over subsets, digits features | 0.002 | 64 generated vs 225 real (half B) |" in section
    assert "polynomial-kernel MMD" in section


def test_evaluation_on_training_data_is_never_called_held_out(folder):
    train = dataclasses.replace(EVAL, reference="the 1,347 digits the model trained on", heldout=False)
    _, body, _ = card(folder, evaluation=train)
    assert "held" not in body.lower() and "training-set bound" in body
    assert "These are training data: the model trained on them, so the numbers do not measure generalisation." in body
    for claim in ("the held-out digits", "digits training never seen", "Held Out digits (not held out)"):
        with pytest.raises(ValueError, match="held out"):
            card(folder, evaluation=dataclasses.replace(train, reference=claim))
    _, body, _ = card(folder, evaluation=dataclasses.replace(train, reference="1,347 training images (not held out)"))
    assert "1,347 training images (not held out). These are training data:" in body


def test_unmatched_floor_count_is_stated(folder):
    results = {**RESULTS, "num_generated": 512}
    _, body, _ = card(folder, evaluation=dataclasses.replace(EVAL, results=results))
    assert "512 generated vs 225 real" in body and "The floor uses 64 real images where the FID uses 512" in body


def test_counts_must_accompany_metrics(folder):
    for key in ("num_generated", "num_real_a", "num_real_b", "num_bpd_images"):
        results = {k: v for k, v in RESULTS.items() if k != key}
        with pytest.raises(ValueError, match=key):
            card(folder, evaluation=dataclasses.replace(EVAL, results=results))


def test_license_only_when_chosen(folder):
    data, body, _ = card(folder)
    assert "license" not in data and "License: none chosen (no license is claimed for this model)" in body
    data, body, _ = card(folder, license="mit")
    assert data["license"] == "mit" and "License: mit" in body
    with pytest.raises(ValueError, match="license"):
        card(folder, license="Apache 2.0: do what you want")


def test_datasets_yaml_holds_only_a_hub_dataset_id(folder):
    data, body, _ = card(folder, dataset_name="/home/alice/pictures/my_cats/", dataset_is_local=True)
    assert "datasets" not in data and 'a local folder named "my_cats"' in body
    assert "/home/alice" not in (folder / "README.md").read_text()
    data, body, _ = card(folder)
    assert "datasets" not in data and "sklearn.datasets.load_digits" in body
    data, body, _ = card(folder, dataset_name="huggan/smithsonian_butterflies_subset")
    assert data["datasets"] == ["huggan/smithsonian_butterflies_subset"]
    assert "the Hub dataset `huggan/smithsonian_butterflies_subset`" in body
    with pytest.raises(ValueError, match="dataset_is_local"):
        card(folder, dataset_name="data/my pictures")


def test_without_repo_grid_or_statistics(folder):
    data, body, _ = card(folder, repo_id=None, grid=None, metrics={}, evaluation=None, training_args={})
    assert "from_pretrained('./ddpm-digits')" in body and "No sample grid" in body
    assert "Training statistics" not in body
    assert "num_inference_steps=50, generator=torch.manual_seed(0)" in body  # the saved scheduler's own chain


NASTY = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=40
).filter(lambda s: s.strip()) | st.sampled_from(
    ["---", "a\n---\nb: c", "'quoted' \"double\"", "key: value", "- list", "\r\n---\r\n", "{{ card_data }}",
     "name: |\n  x", "# not a heading", "x | y | z", "\u2028---\u2029", "```", "... ", "@at", "!!python/object"]
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(dataset_name=NASTY, note=NASTY)
def test_user_strings_never_break_the_yaml_header(folder, dataset_name, note):
    changes = dict(training_args={"note": note, note: 1}, metrics={"custom": note}, train_split=note,
                   dataset_name=dataset_name, dataset_is_local=True,
                   evaluation=dataclasses.replace(EVAL, reference=f"real {note}", heldout=True))
    data, _, path = card(folder, **changes)
    index = data.pop("model-index")
    assert data == {"library_name": "diffusers", "pipeline_tag": "unconditional-image-generation",
                    "tags": list(ddpm_hf.model_card.TAGS)}
    assert {r["dataset"]["name"] for r in index[0]["results"]} == {f"real {note}".strip()}  # intact through YAML
    assert ModelCard.load(path).data.library_name == "diffusers"  # huggingface_hub's own parser agrees


@pytest.mark.parametrize("bad", ["", "a/b/c", "has space/x", "x" * 200])
def test_invalid_repo_ids_are_rejected(folder, bad):
    with pytest.raises(ValueError):
        card(folder, repo_id=bad)


@pytest.mark.parametrize("changes, match", [
    ({"wall_time_s": float("nan")}, "wall_time_s"),
    ({"wall_time_s": None}, "wall_time_s"),
    ({"global_step": -1}, "global_step"),
    ({"train_split": " "}, "train_split"),
    ({"dataset_name": ""}, "dataset_name"),
    ({"training_args": ["lr"]}, "training_args"),
    ({"grid": dataclasses.replace(GRID, num_inference_steps=51)}, r"grid.num_inference_steps .*\[1, 50\]"),
    ({"grid": dataclasses.replace(GRID, sampler="ddim")}, "grid.sampler"),
    ({"grid": dataclasses.replace(GRID, weights="ema")}, "grid.weights"),
    ({"grid": dataclasses.replace(GRID, filename="missing.png")}, "grid.filename"),
    ({"evaluation": dataclasses.replace(EVAL, reference="")}, "evaluation.reference"),
    ({"evaluation": dataclasses.replace(EVAL, results={})}, "evaluation.results"),
])
def test_bad_run_facts_name_the_field(folder, changes, match):
    with pytest.raises((ValueError, TypeError), match=match):
        card(folder, **changes)


def test_bad_folder_is_named(folder, tmp_path):
    with pytest.raises(ValueError, match="output_dir"):
        write_model_card(str(tmp_path / "missing"), run_facts())
    (folder / "scheduler" / "scheduler_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="scheduler_config.json"):
        write_model_card(str(folder), run_facts())
    (folder / "model_index.json").unlink()
    with pytest.raises(ValueError, match="model_index.json"):
        write_model_card(str(folder), run_facts())


def test_strip_secrets_is_recursive_and_masks_token_shaped_values():
    clean = strip_secrets({"a": 1, "nested": {"api_key": "k", "ok": f"x {TOKEN}"}, "Password": "p"})
    assert clean == {"a": 1, "nested": {"ok": "x ***"}}


def test_template_is_the_repo_root_file():
    assert TEMPLATE_PATH.name == "model_card.md" and TEMPLATE_PATH.is_file()
    assert "{{ card_data }}" in TEMPLATE_PATH.read_text()


# ---- class-conditional cards -------------------------------------------------------------------------------------

CONDITIONAL_RESULTS = {"conditional_accuracy": 0.9, "conditional_accuracy_per_class": [0.8, 1.0],
                       "classifier_accuracy_real": 0.97, "fid_digits": 2.5, "fid_digits_floor": 1.5,
                       "fid_digits_per_class": [3.0, 4.0], "fid_digits_floor_per_class": [2.0, 2.25],
                       "nfe_per_sample": 50.0, "classes": [0, 1], "num_per_class": 22,
                       "num_real_b_per_class": [23, 22], "guidance_scale": 2.0, "guidance_rescale": 0.0}


@pytest.fixture
def conditional_folder(tmp_path):
    pipeline = ddpm_hf.DDPMPipeline(ddpm_hf.UNet2DModel(**TINY, num_class_embeds=3),
                                    ddpm_hf.DDPMScheduler(num_train_timesteps=50), id2label={0: "cat", 1: "dog"})
    pipeline.save_pretrained(tmp_path / "cfg")
    (tmp_path / "cfg" / "samples").mkdir()
    Image.new("L", (16, 16)).save(tmp_path / "cfg" / "samples" / "grid 100.png")
    return tmp_path / "cfg"


def test_a_class_conditional_card_lists_the_classes_and_the_per_class_evaluation(conditional_folder):
    grid = dataclasses.replace(GRID, guidance_scale=2.0)
    evaluation = dataclasses.replace(EVAL, results=CONDITIONAL_RESULTS, guidance_scale=2.0)
    data, body, _ = card(conditional_folder, class_names=("cat", "dog"), grid=grid, evaluation=evaluation)
    assert "pipeline_tag" not in data and "class-conditional" in data["tags"]
    assert "| 0 | cat |" in body and "| 1 | dog |" in body and "One row per class, top to bottom: cat, dog" in body
    assert "class_labels=['dog'] * 16, guidance_scale=2.0" in body  # the example class: index min(7, K - 1)
    assert "| Conditional accuracy per class (class order) | [0.8, 1] | 22 generated per class |" in body
    assert "| FID floor (real vs real), digits features, per class (class order) | [2, 2.25] | each class: 22 real" \
        in body
    assert "guidance scale w = 2" in body and "guided samples, more prototypical than real ones" in body


@pytest.mark.parametrize("changes,message", [
    ({"class_names": None}, r"class-conditional \(num_class_embeds=3\) but RunFacts.class_names is None"),
    ({"class_names": ("cat", "dog", "eel")}, "has 3 classes, so the saved unet needs num_class_embeds=4"),
    ({"class_names": ("cat", "cat")}, "at least 2 distinct non-empty strings"),
    ({"class_names": ("cat", "dog"), "grid": GRID}, "grid.guidance_scale must say"),
])
def test_class_facts_that_contradict_the_folder_are_refused(conditional_folder, changes, message):
    with pytest.raises(ValueError, match=message):
        card(conditional_folder, evaluation=None, **changes)


def test_class_names_on_an_unconditional_folder_are_refused(folder):
    with pytest.raises(ValueError, match="saved unet needs num_class_embeds=3 .* but it has None"):
        card(folder, class_names=("cat", "dog"), grid=dataclasses.replace(GRID, guidance_scale=1.0))
