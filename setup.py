import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py


class BuildPyWithCardTemplate(build_py):
    """Ship the repo-root model_card.md template inside the built package."""

    def run(self) -> None:
        super().run()
        if not self.editable_mode:
            shutil.copy(Path(__file__).parent / "model_card.md", Path(self.build_lib) / "ddpm_hf" / "model_card.md")


setup(
    name="ddpm_hf",
    version="0.1.0",
    description="DDPM and DDIM the Hugging Face way: diffusers-compatible schedulers, a faster UNet2DModel, "
    "a pipeline and an accelerate training script.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    cmdclass={"build_py": BuildPyWithCardTemplate},
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
    ],
    extras_require={"test": ["pytest>=8", "pytest-xdist>=3", "hypothesis>=6"]},
)
