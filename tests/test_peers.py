"""The peer benchmark harness (``benchmarks/peers.py``) cannot rot.

Its tiny mode runs in a subprocess (one round at batch 2, the first setting of every pair; pairs
whose peer is not installed are skipped with a message), and every pair's builders are checked
to give both models the same parameter count within 5% (or the tolerance a case states with
its reason), the condition the ratios rely on.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

__all__: list[str] = []

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from peer_pairs import PeerMissing, all_cases, count_parameters  # noqa: E402

CASES = all_cases(tiny=False)


def test_every_family_has_cases() -> None:
    pairs = {case.pair.split("/")[0] for case in CASES}
    assert {"maf-affine", "maf-dsf", "realnvp", "coupling+1x1", "resflow-cpu"} <= pairs
    assert any(p.startswith("flowpp") for p in pairs)


@pytest.mark.parametrize("case", CASES, ids=[c.key for c in CASES])
def test_pair_matches_parameter_count(case) -> None:
    ours = case.build_ours()
    try:
        peer = case.build_peer()
    except PeerMissing as missing:
        pytest.skip(str(missing))
    ratio = count_parameters(ours.module) / count_parameters(peer.module)
    assert abs(ratio - 1) <= case.param_tolerance, (
        f"{case.key}: parameters ours / peer = {ratio:.3f}"
    )
    x = case.make_input(2)
    for side in (ours, peer):
        log_prob = side.log_prob(x)
        assert log_prob.shape == (2,) and bool(log_prob.isfinite().all()), side.label


def test_tiny_mode_runs_and_writes_the_table(tmp_path: Path) -> None:
    out = tmp_path / "peers.json"
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "peers.py"), "--tiny", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["rounds"] == 1 and result["cases"]
    for entry in result["cases"]:
        assert "error" not in entry, entry
        assert entry["measured_on"]["cpu"] and entry["measured_on"]["commit"]
        if "skipped" in entry:
            continue
        for batch, modes in entry["batches"].items():
            assert batch == "2" and "error" not in modes, entry["pair"]
            assert {"eval", "train"} <= set(modes)
            assert all(m["ours_s"] > 0 and m["peer_s"] > 0 for m in modes.values())
    assert proc.stdout.startswith("| pair | setting |")


def test_each_pair_is_timed_in_its_own_process_by_default(tmp_path: Path) -> None:
    out = tmp_path / "peers.json"
    cmd = [sys.executable, str(BENCHMARKS / "peers.py"), "--only", "maf-affine/zuko D=8"]
    cmd += ["--rounds", "1", "--warmup", "0", "--no-memory", "--no-profile", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (entry,) = json.loads(out.read_text())["cases"]
    assert entry["setting"] == "D=8" and "error" not in entry, entry.get("error")
    assert set(entry["batches"]) == {"1", "64", "1024"}
    assert entry["measured_on"]["cpu"] and "maf-affine/zuko D=8" in proc.stderr  # the child's log


def test_table_names_the_cpu_of_each_row_when_merged_runs_differ() -> None:
    from peers import table

    def entry(pair: str, cpu: str) -> dict:
        timing = {"eval": {"ratio": 0.5}, "train": {"ratio": 0.9}}
        return {
            "pair": pair,
            "setting": "D=8",
            "parameters": {"ours": 10, "peer": 10},
            "targets": {"train": 0.8},
            "batches": {"64": timing},
            "measured_on": {"cpu": cpu},
        }

    mixed = table({"cases": [entry("a/x", "Xeon"), entry("b/y", "EPYC")]})
    assert "| a/x | D=8 (Xeon) |" in mixed and "| b/y | D=8 (EPYC) |" in mixed
    assert "0.90 ✗" in mixed and "0.50" in mixed
    same = table({"cases": [entry("a/x", "Xeon"), entry("b/y", "Xeon")]})
    assert "| a/x | D=8 |" in same and same.endswith("All pairs measured on: Xeon.")


def test_bf16_table_shows_slowdowns_errors_and_a_side_that_fails() -> None:
    from peers import bf16_table

    ours = {"train_s_float32": 1.0, "train_s_bf16": 0.5}
    ours |= {"median_abs_bpd_error": 1e-6, "max_abs_bpd_error": 2e-6}
    peer = {"train_s_float32": 2.0, "bf16_error": "RuntimeError: dot : expected same dtype"}
    bf16 = {"batch": 64, "ours": ours, "peer": peer, "ratio_ours_bf16_to_peer_float32": 0.25}
    text = bf16_table({"cases": [{"pair": "r/x", "setting": "1x28x28", "bf16": bf16}]})
    assert "| r/x | 1x28x28 | 64 | 0.50 | fails | 0.25 | 1.0e-06 / 2.0e-06 | fails: Runtime" in text
    assert bf16_table({"cases": [{"pair": "a", "setting": "b"}]}) == ""


def test_bf16_comparison_times_both_sides_and_measures_the_error() -> None:
    import torch
    from _common import timed
    from peer_pairs import Side
    from peer_pairs.mixed_precision import BF16_FLAGS, bf16_comparison

    def side(protect: bool) -> Side:
        torch.manual_seed(0)
        net = torch.nn.Linear(16, 16).float()

        def log_prob(x: torch.Tensor) -> torch.Tensor:
            h = net(x.float())
            if protect:  # as ours: the per-example sum in float32
                h = h.float()
            return -(h * h).sum(1)

        return Side("toy", net, log_prob, None)

    x = torch.randn(8, 16, dtype=torch.float32)
    out = bf16_comparison({"ours": side(True), "peer": side(False)}, x, 2, 0, timed)
    assert set(out["cpu_bf16_flags"]) <= set(BF16_FLAGS) and out["batch"] == 8
    for name in ("ours", "peer"):
        entry = out[name]
        assert entry["train_s_float32"] > 0 and entry["train_s_bf16"] > 0
        assert entry["non_finite"] == 0
        assert 0 < entry["median_abs_bpd_error"] <= entry["max_abs_bpd_error"] < 1
    assert out["ratio_ours_bf16_to_peer_float32"] > 0


def test_bf16_comparison_keeps_the_pair_when_one_side_fails_under_autocast() -> None:
    import torch
    from _common import timed
    from peer_pairs import Side
    from peer_pairs.mixed_precision import bf16_comparison

    torch.manual_seed(0)
    nets = {n: torch.nn.Linear(4, 4) for n in ("ours", "peer")}

    def log_prob(name: str):
        def f(x: torch.Tensor) -> torch.Tensor:
            if name == "peer" and torch.is_autocast_enabled("cpu"):
                raise RuntimeError("dot : expected both vectors to have same dtype")
            return -nets[name](x).float().square().sum(1)

        return f

    sides = {n: Side(n, nets[n], log_prob(n), None) for n in nets}
    out = bf16_comparison(sides, torch.randn(8, 4), 2, 0, timed)
    assert "same dtype" in out["peer"]["bf16_error"] and out["peer"]["train_s_float32"] > 0
    assert out["ours"]["train_s_bf16"] > 0 and out["ratio_ours_bf16_to_peer_float32"] > 0
    assert "ratio_ours_bf16_to_peer_bf16" not in out


def test_fast_paths_script_writes_its_ratios(tmp_path: Path) -> None:
    out = tmp_path / "fast_paths.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "fast_paths.py"),
            "--only",
            "realnvp",
            "--rounds",
            "1",
            "--warmup",
            "0",
            "--threads",
            "1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    group = json.loads(out.read_text())["groups"]["realnvp"]
    if "skipped" in group:
        pytest.skip(group["skipped"])
    assert set(group["seconds"]) == {"masked", "gathered", "gathered+cl", "peer", "peer+cl"}
    assert group["ratio_to_baseline"]["masked"] == {"train": 1.0, "eval": 1.0}
    assert all(t > 0 for modes in group["seconds"].values() for t in modes.values())
