from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "testdata"
if not SHARED.exists():  # CI clones the repo with shared/ beside it
    SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "testdata"


@pytest.fixture(scope="session")
def testdata() -> Path:
    if not SHARED.exists():
        pytest.fail(f"shared test data not found at {SHARED}")
    return SHARED


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
