# ruff: noqa: I001  (ember before torch: it sets OMP_WAIT_POLICY for its kernels' thread pool)
from pathlib import Path

import pytest

import ember  # noqa: F401
import torch

ROOT = Path(__file__).resolve().parents[1]
# ../shared beside the checkout (as CI clones it), or a shared/ copied into it (the GPU machine).
SHARED = next((p for p in (ROOT.parent / "shared" / "testdata", ROOT / "shared" / "testdata") if p.exists()),
              ROOT.parent / "shared" / "testdata")


@pytest.fixture(scope="session")
def testdata() -> Path:
    if not SHARED.exists():
        pytest.fail(f"shared test data not found at {SHARED}")
    return SHARED


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
