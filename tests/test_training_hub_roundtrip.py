"""The whole sharing path: train with --push_to_hub against the local Hub, then load the repo with stock diffusers.

A user with only diffusers installed runs ``DiffusionPipeline.from_pretrained(repo_id)`` and must get the same
images as the local export gives (and as ddpm_hf's own pipeline gives from that export).
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import torch
from fault_injection import tiny_train_args

from ddpm_hf import DDPMPipeline

REPO_ID = "test-user/digits-roundtrip"
# Runs where ddpm_hf cannot be imported at all.
STOCK_LOAD = textwrap.dedent("""
    import json, sys
    sys.modules["ddpm_hf"] = None
    import numpy as np, torch
    from diffusers import DiffusionPipeline
    names = []
    for source, out in json.loads(sys.argv[1]):
        pipe = DiffusionPipeline.from_pretrained(source)
        pipe.set_progress_bar_config(disable=True)
        names.append([type(pipe).__name__, type(pipe.unet).__module__])
        np.save(out, pipe(batch_size=2, num_inference_steps=5, output_type="np",
                          generator=torch.Generator().manual_seed(0)).images)
    print(json.dumps(names))
""")


def test_pushed_export_loads_in_stock_diffusers_with_the_local_exports_images(training_runner, hub, tmp_path):
    out = tmp_path / "out"
    result = training_runner.run(tiny_train_args(out, 4, "--push_to_hub", "--hub_model_id", REPO_ID))
    assert result.returncode == 0, result.stderr[-3000:]
    landed = hub.files(REPO_ID)
    assert not [path for path in landed if path.startswith(("checkpoint-", "logs/"))]

    jobs = [(REPO_ID, str(tmp_path / "hub.npy")), (str(out), str(tmp_path / "local.npy"))]
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "fresh_hf_home"), "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    proc = subprocess.run([sys.executable, "-c", STOCK_LOAD, json.dumps(jobs)], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [["DDPMPipeline", "diffusers.models.unets.unet_2d"]] * 2
    from_hub, from_local = np.load(jobs[0][1]), np.load(jobs[1][1])
    np.testing.assert_array_equal(from_hub, from_local)

    ours = DDPMPipeline.from_pretrained(out)
    ours.set_progress_bar_config(disable=True)
    images = ours(batch_size=2, num_inference_steps=5, output_type="np", generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(images.images, from_hub, atol=1e-4, rtol=0)
