"""Shared fixtures: where the real data lives, and an isolated feature cache per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# MKL picks its thread count per call from the machine's load unless told not to, and a different
# count sums in a different order: the runs that the resume tests compare would differ in the last
# bits whenever something else shares the cores. (Set before anything imports torch.)
os.environ.setdefault("MKL_DYNAMIC", "FALSE")

REPO = Path(__file__).resolve().parents[1]


def shared_data(name: str) -> Path | None:
    """``../shared/data/<name>`` (or under $VSEINF_SHARED_DATA), or None when absent."""
    roots = []
    if os.environ.get("VSEINF_SHARED_DATA"):
        roots.append(Path(os.environ["VSEINF_SHARED_DATA"]))
    roots.append(REPO.parent / "shared" / "data")
    for root in roots:
        if (root / name).is_dir():
            return root / name
        if root.name == name and root.is_dir():
            return root
    return None


@pytest.fixture(scope="session")
def flickr8k_root() -> Path:
    root = shared_data("flickr8k")
    if root is None:
        pytest.skip("Flickr8k data not available (../shared/data/flickr8k)")
    return root


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory) -> Path:
    """A feature-cache folder shared by the tests of one session (never the data folder)."""
    path = Path(os.environ.get("VSEINF_TEST_CACHE") or tmp_path_factory.mktemp("vseinf-cache"))
    return path


@pytest.fixture()
def use_cache(session_cache, monkeypatch) -> Path:
    monkeypatch.setenv("VSEINF_CACHE", str(session_cache))
    return session_cache
