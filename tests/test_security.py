"""Security: no unsafe deserialisation in our code, nothing of ours needs remote code, and tokens never leak.

The token test runs a push-enabled training (its own process, tests/fault_injection.py) against the local Hub
server with distinctive fake tokens, then greps every byte the run left: the output folder (export, model
card, configs, checkpoints, tensorboard events), every file of every commit on the server, stdout and stderr.
"""

import ast
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from fault_injection import Fault, tiny_train_args

from ddpm_hf import UNet2DModel

ROOT = Path(__file__).resolve().parent.parent
SCANNED = [ROOT / name for name in ("src", "training", "pipelines") if (ROOT / name).is_dir()]
FLAG_TOKEN = "hf_ReliabilityFlagToken" + "Q9x" * 6
ENV_TOKEN = "hf_ReliabilityEnvToken" + "Z7k" * 6


def unsafe_calls(source: str) -> list[str]:
    """`torch.load` without `weights_only=True`, any `pickle.load(s)`, and `trust_remote_code=True`, by line."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = f"{getattr(func.value, 'id', '?')}.{func.attr}" if isinstance(func, ast.Attribute) else ""
        keywords = {k.arg: k.value for k in node.keywords}
        safe = isinstance(keywords.get("weights_only"), ast.Constant) and keywords["weights_only"].value is True
        if name == "torch.load" and not safe:
            found.append(f"line {node.lineno}: torch.load without weights_only=True")
        if name in ("pickle.load", "pickle.loads", "dill.load", "cloudpickle.load"):
            found.append(f"line {node.lineno}: {name}")
        remote = keywords.get("trust_remote_code")
        if remote is not None and not (isinstance(remote, ast.Constant) and remote.value is False):
            found.append(f"line {node.lineno}: trust_remote_code={ast.unparse(remote)}")
    return found


def test_the_scanner_catches_what_it_looks_for():
    bad = ("torch.load(p)\ntorch.load(p, weights_only=False)\npickle.load(f)\n"
           "DiffusionPipeline.from_pretrained(r, trust_remote_code=True)\n")
    assert len(unsafe_calls(bad)) == 4
    assert unsafe_calls("torch.load(p, weights_only=True)\nf(trust_remote_code=False)\n") == []


def test_no_unsafe_deserialisation_or_remote_code_in_our_source():
    assert SCANNED, "nothing to scan"
    problems = {}
    for folder in SCANNED:
        for path in folder.rglob("*.py"):
            found = unsafe_calls(path.read_text())
            if found:
                problems[str(path.relative_to(ROOT))] = found
    assert not problems, problems


def all_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def leaks(texts: dict[str, bytes], *tokens: str) -> list[str]:
    return [f"{name} holds {token[:12]}..." for name, content in texts.items() for token in tokens
            if token.encode() in content]


def test_tokens_never_written_anywhere(training_runner, hub, tmp_path):
    out = tmp_path / "out"
    repo = "test-user/secret-check"
    hub.fail_next(1, status=500, match=r"/commit/")  # a retried failure: its log lines must be clean too
    args = tiny_train_args(out, 4, "--push_to_hub", "--hub_model_id", repo, "--hub_private_repo", "--hub_token",
                           FLAG_TOKEN, "--logger", "tensorboard")
    fast = {"ddpm_hf.hub:HubPusher.__init__": {"backoff_s": 0.05, "max_attempts": 4}}
    result = training_runner.run(args, env={"HF_TOKEN": ENV_TOKEN}, kwdefaults=fast)
    assert result.returncode == 0, result.stderr[-3000:]
    assert any(FLAG_TOKEN in header for header in hub.auth_headers)  # the token was really used...
    assert list((out / "logs").rglob("events.out.tfevents*"))  # ...and tensorboard really wrote events
    assert hub.repos[f"model:{repo}"].private is True
    stored = {f"hub:{commit.oid}/{path}": f.content for key, r in hub.repos.items() for commit in r.commits
              for path, f in commit.files.items()}
    written = {**all_bytes(out), **stored, "stdout": result.stdout.encode(), "stderr": result.stderr.encode()}
    assert not leaks(written, FLAG_TOKEN, ENV_TOKEN)


def test_token_not_in_exception_messages(training_runner, hub, tmp_path):
    """A rejected token (401 on repo creation) stops the run at once; the error and logs do not repeat it."""
    out = tmp_path / "out"
    hub.fail_next(1, status=401, match=r"/api/repos/create")
    args = tiny_train_args(out, 2, "--push_to_hub", "--hub_model_id", "test-user/denied", "--logger", "tensorboard")
    result = training_runner.run(args, env={"HF_TOKEN": ENV_TOKEN})
    assert result.returncode == 1
    assert "HubPushError" in result.stderr and "401" in result.stderr
    assert any(ENV_TOKEN in header for header in hub.auth_headers)
    assert not leaks({**all_bytes(out), "stdout": result.stdout.encode(), "stderr": result.stderr.encode()},
                     ENV_TOKEN)


@pytest.fixture(scope="module")
def trained(training_runner, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "out"
    result = training_runner.run(tiny_train_args(out, 4))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_export_is_plain_diffusers_and_safetensors(trained):
    index = json.loads((trained / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DModel"] and index["scheduler"][0] == "diffusers"
    export = [p.relative_to(trained) for p in trained.rglob("*") if p.is_file()
              and not p.relative_to(trained).parts[0].startswith(("checkpoint-", "logs"))]
    assert not [p for p in export if p.suffix in (".py", ".bin", ".pt", ".pth", ".pkl", ".ckpt")], export
    assert {p.suffix for p in export if "diffusion_pytorch_model" in p.name} == {".safetensors"}


def test_resume_loads_every_pickle_with_weights_only(training_runner, trained):
    """Every torch.load during resume (optimizer state, RNG states) passes weights_only=True."""
    guard = Fault("torch:load", "require_weights_only")
    result = training_runner.run(tiny_train_args(trained, 6, "--resume_from_checkpoint", "checkpoint-4"),
                                 faults=[guard])
    assert result.returncode == 0, result.stderr[-3000:]


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("filename", ["optimizer.bin", "random_states_0.pkl"])
@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_malicious_pickle_in_a_checkpoint_is_not_executed(training_runner, trained, tmp_path, filename, writer):
    marker = tmp_path / "payload-ran"
    path = trained / "checkpoint-2" / filename
    original = path.read_bytes()
    try:
        if writer == "pickle":
            path.write_bytes(pickle.dumps(_Payload(marker)))
        else:  # torch's own zip format passes the pre-check and reaches torch.load(weights_only=True)
            torch.save(_Payload(marker), path)
        result = training_runner.run(tiny_train_args(trained, 6, "--resume_from_checkpoint", "checkpoint-2"))
    finally:
        path.write_bytes(original)
    assert not marker.exists()
    assert result.returncode == 1
    if writer == "pickle":  # refused before any unpickling, naming the file
        assert f"{filename} is unreadable" in result.stderr
    else:
        assert "Weights only load failed" in result.stderr


def test_malicious_bin_weights_are_not_executed(tmp_path):
    """A unet folder holding only a pickled .bin: diffusers loads it with weights_only=True, so it fails safely."""
    marker = tmp_path / "payload-ran"
    UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                norm_num_groups=4, attention_head_dim=None).save_pretrained(tmp_path / "unet")
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({"weight": _Payload(marker)}, tmp_path / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(OSError, match="diffusion_pytorch_model.bin"):
        UNet2DModel.from_pretrained(tmp_path / "unet")
    assert not marker.exists()
