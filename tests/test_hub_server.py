"""The local Hub server speaks enough of the protocol for the real huggingface_hub client and diffusers."""

import hashlib
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError


def _upload(tmp_path, repo_id, files, private=False):
    folder = tmp_path / "upload"
    for rel, content in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(content)
    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="add files")


def test_create_upload_and_download_round_trip(hub, tmp_path):
    files = {"a.txt": b"hello", "sub/dir/b.bin": bytes(range(256)) * 10}
    commit = _upload(tmp_path, "alice/round", files)
    assert hub.files("alice/round") == {".gitattributes": hub.files("alice/round")[".gitattributes"], **files}
    assert commit.oid == HfApi().model_info("alice/round").sha

    local = snapshot_download("alice/round")
    for rel, content in files.items():
        assert (Path(local) / rel).read_bytes() == content
    info = HfApi().model_info("alice/round")
    assert sorted(s.rfilename for s in info.siblings) == [".gitattributes", "a.txt", "sub/dir/b.bin"]
    assert hub.unhandled == []


def test_existing_repo_and_unchanged_upload_make_no_new_commit(hub, tmp_path):
    _upload(tmp_path, "alice/same", {"a.txt": b"x"})
    commits_before = len(hub.repos["model:alice/same"].commits)
    HfApi().create_repo("alice/same", exist_ok=True)  # 409 with a url: exist_ok must accept it
    _upload(tmp_path, "alice/same", {"a.txt": b"x"})
    assert len(hub.repos["model:alice/same"].commits) == commits_before


def test_error_codes_map_to_the_clients_exceptions(hub, tmp_path):
    _upload(tmp_path, "alice/errs", {"a.txt": b"x"})
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("alice/errs", "missing.txt")
    with pytest.raises(RepositoryNotFoundError):
        HfApi().model_info("alice/nope")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("alice/errs", "a.txt", revision="0" * 40)


def test_private_repo_is_recorded_and_hidden_from_anonymous_reads(hub, tmp_path):
    api = HfApi(token="hf_test_token_for_private_repo_0000")
    api.create_repo("alice/secret", private=True)
    assert hub.repos["model:alice/secret"].private is True
    assert api.model_info("alice/secret").private is True
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=False).model_info("alice/secret")


@pytest.mark.filterwarnings("ignore:Use .content=:DeprecationWarning")  # huggingface_hub's own LFS PUT
def test_lfs_upload_path_without_xet(hub, tmp_path, monkeypatch):
    # With HF_HUB_DISABLE_XET the client uses the LFS batch API + PUT for files the server marks "lfs".
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    hub.lfs_min_size = 100
    big = bytes(range(256)) * 8
    _upload(tmp_path, "alice/lfs", {"weights.safetensors": big, "small.json": b"{}"})
    stored = hub.repos["model:alice/lfs"].head.files
    assert stored["weights.safetensors"].lfs_sha256 == hashlib.sha256(big).hexdigest()
    assert stored["small.json"].lfs_sha256 is None
    assert any(path.endswith("/info/lfs/objects/batch") for _, path in hub.requests)
    assert open(hf_hub_download("alice/lfs", "weights.safetensors"), "rb").read() == big
    tree = {f.path: f for f in HfApi().list_repo_tree("alice/lfs", recursive=True)}
    assert tree["weights.safetensors"].lfs.sha256 == hashlib.sha256(big).hexdigest()


def test_faults_500_then_recovery_through_the_clients_own_retries(hub, tmp_path):
    hub.fail_next(2, 500, match="preupload")
    _upload(tmp_path, "alice/flaky", {"a.txt": b"x"})
    assert sum("preupload" in path for _, path in hub.requests) == 3
    assert hub.files("alice/flaky")["a.txt"] == b"x"


def test_go_down_refuses_connections_and_comes_back(hub, tmp_path):
    _upload(tmp_path, "alice/down", {"a.txt": b"x"})
    hub.go_down()
    with pytest.raises(Exception) as excinfo:
        HfApi().model_info("alice/down")
    assert not isinstance(excinfo.value, HfHubHTTPError)  # a connection error, not an HTTP reply
    hub.come_up()
    assert HfApi().model_info("alice/down").id == "alice/down"


def test_diffusers_pipeline_loads_from_the_server(hub, tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=10)).save_pretrained(tmp_path / "export")
    api = HfApi()
    api.create_repo("alice/tiny-ddpm")
    api.upload_folder(repo_id="alice/tiny-ddpm", folder_path=tmp_path / "export")

    loaded = DiffusionPipeline.from_pretrained("alice/tiny-ddpm")
    assert type(loaded).__name__ == "DDPMPipeline"
    for name, tensor in unet.state_dict().items():
        assert torch.equal(loaded.unet.state_dict()[name], tensor), name
    assert hub.unhandled == []
