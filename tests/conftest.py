"""Shared fixtures: the real Fashion-MNIST folder (skips when absent) and a small digits shard set."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from shards.sources import digits_source, find_mnist_files
from shards.writer import write_shard_set

# The shared data sits beside the project folder (../shared), also in CI's fresh clone.
FMNIST_DIR = Path(os.environ.get(
    "VITSSL_FMNIST_DIR", Path(__file__).resolve().parents[2] / "shared" / "datasets" / "fashion-mnist"))


@pytest.fixture
def fmnist_dir() -> Path:
    """The folder with the four Fashion-MNIST IDX files (VITSSL_FMNIST_DIR); skips when they are absent."""
    try:
        find_mnist_files(FMNIST_DIR)
    except FileNotFoundError as e:
        pytest.skip(f"Fashion-MNIST IDX files not available (set VITSSL_FMNIST_DIR): {e}")
    return FMNIST_DIR


@pytest.fixture(scope="session")
def _digits_shards_once(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = digits_source()
    out = tmp_path_factory.mktemp("digits-once") / "digits"
    write_shard_set(source, out, classes=source.classes, source=source.description,
                    samples_per_shard=500, shard_multiple=4)
    return out


@pytest.fixture
def digits_shards(_digits_shards_once: Path, tmp_path: Path) -> Path:
    """scikit-learn's 1,797 digits as a shard set of your own in tmp_path/digits (free to damage):
    4 shards of 450/449/449/449, PNG, mode L, 8x8, labels 0..9 ("zero".."nine"), captions
    ("a handwritten digit seven") and `.json` {"index": i, ...}; keys f"{i:08d}" in order."""
    return Path(shutil.copytree(_digits_shards_once, tmp_path / "digits"))
