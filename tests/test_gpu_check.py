"""benchmarks/gpu_check.py's CPU twin: the same script, at a tiny size, runs and passes."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_cpu_twin_runs_both_packings_and_agrees(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--size", "tiny", "--device", "cpu",
         "--steps", "2", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "gpu_check: ok" in out
    table = [row for row in map(str.split, out.splitlines()) if len(row) == 6 and row[0] in ("none", "shared_prompt")]
    assert [row[0] for row in table] == ["none", "shared_prompt"]
    assert all(float(row[1]) > 0 and float(row[2]) > 0 for row in table)  # s/step, tokens/s
    assert "largest relative log-prob difference" in out
    # Both runs used the LLaVA-1.5 vocabulary and image token of the 7B config.
    config = (tmp_path / "tiny" / "model" / "config.json").read_text()
    assert '"image_token_index": 32000' in config
