"""Repo-root files the library reads at run time (the model-card template, the Hub pipeline file).

Each has one source in the repository; a wheel carries a copy inside the package (``setup.py``'s ``SHIPPED`` lists them),
so an installed ddpm_hf and a source checkout read the same text.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def shipped_file(packaged_name: str, repo_path: str) -> Path:
    """The packaged copy ``ddpm_hf/<packaged_name>`` if present, else ``<repo root>/<repo_path>``."""
    packaged = _PACKAGE_DIR / packaged_name
    return packaged if packaged.exists() else _PACKAGE_DIR.parents[1] / repo_path

