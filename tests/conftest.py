"""Shared test fixtures: where the upstream reference fixtures live."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[1]


def fixtures_root() -> Path | None:
    env = os.environ.get("COSYTOOLS_FIXTURES")
    candidates = [Path(env)] if env else []
    candidates.append(REPO.parent / "shared" / "fixtures")
    for c in candidates:
        if (c / "cv3-tiny" / "refs").is_dir():
            return c
    return None


@pytest.fixture(scope="session")
def fixtures() -> Path:
    root = fixtures_root()
    if root is None:
        pytest.skip("reference fixtures not found: set COSYTOOLS_FIXTURES or place them at ../shared/fixtures")
    return root / "cv3-tiny"


@pytest.fixture(scope="session")
def fixture_model_dir(fixtures: Path) -> Path:
    return fixtures / "model"


def read_dump(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Raw tensors + metadata of a safetensors dump (no validation; tests only)."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        return {k: f.get_tensor(k) for k in f.keys()}, meta


@pytest.fixture(scope="session")
def load_ref(fixtures: Path):
    def _load(name: str):
        return read_dump(fixtures / "refs" / f"{name}.safetensors")
    return _load


# property tests: no per-example deadline (CI has 2 slow cores), bounded example counts
try:
    from hypothesis import settings

    settings.register_profile("cosytools", deadline=None, max_examples=50, derandomize=True)
    settings.load_profile("cosytools")
except ImportError:  # pragma: no cover
    pass
