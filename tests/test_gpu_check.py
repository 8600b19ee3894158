"""benchmarks/gpu_check.py, the prepared script for a GPU machine, run on the CPU in tiny mode:
every section runs and the float64 conformance subset passes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_every_section_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu"]
    done = subprocess.run(
        [*command, "--tiny", "--no-compile", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    families = {"realnvp", "coupling", "coupling+1x1", "flowpp-cpu", "resflow-cpu"}
    assert set(result["conformance"]) == families
    for name, check in result["conformance"].items():
        assert check["passed"] and check["round_trip_error"] < 1e-5, name
    for name, variants in result["train_step"].items():
        assert set(variants) == {"float32", "bf16"}, name
        assert variants["float32"]["bpd_minus_float32"] == 0.0 and variants["float32"]["step_s"] > 0
        assert abs(variants["bf16"]["bpd_minus_float32"]) < 0.05, name  # log-dets stay float32
    assert "skipped" in result["nccl"]  # no CUDA here
    assert all("pair" in entry for entry in result["peer_pairs"])
