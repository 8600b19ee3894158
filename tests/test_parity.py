"""The parity harness (``recipes/parity.py``, ``benchmarks/peer_pairs/parity*.py``).

What the report's verdicts rest on is tested here: the loop gives both sides identical inputs
(two copies of one model trained side by side stay identical, number for number), an
interrupted run resumes to the same numbers as an uninterrupted one, every pair is matched in
parameters within 5%, the verdict rule, and the recipe's ``--smoke`` end to end (pairs whose
peer is absent are skipped with a message).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import Tensor

__all__: list[str] = []

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from peer_pairs import PeerMissing, all_parity_cases, count_parameters  # noqa: E402
from peer_pairs.parity import (  # noqa: E402
    ParityCase,
    ParityData,
    ParitySide,
    RunClaimed,
    TrainSettings,
    claim,
    run_seed,
)
from peer_pairs.parity_report import (  # noqa: E402
    restore_results,
    summarise,
    verdict,
    write_parity_report,
)

from hybridflow.models import FlowModel, create_backbone  # noqa: E402

CASES = all_parity_cases()
SETTINGS = TrainSettings(
    steps=12, batch=16, warmup_steps=2, evals=3, eval_batch=32, val_size=32, test_size=32
)


def _levels_data() -> ParityData:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 17, (96, 1, 4, 4), generator=g).float()
    y = torch.randint(0, 3, (96,), generator=g)
    return ParityData(
        x[:64],
        y[:64],
        x[64:80],
        y[64:80],
        x[80:],
        y[80:],
        num_levels=17,
        source="random 4×4 levels",
    )


class _InterruptError(Exception):
    pass


@pytest.fixture(autouse=True)
def _float32():
    """The recipe runs in float32 (the peers hard-code it in places): so do these tests."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(previous)


def _coupling_side(
    data: ParityData, seed: int, smoke: bool, fail_at: int | None = None, seen: list | None = None
) -> ParitySide:
    torch.manual_seed(seed)
    model = FlowModel(
        create_backbone("coupling", (1, 4, 4), num_scales=1, blocks_per_scale=2, hidden_channels=8),
        (1, 4, 4),
        num_levels=17,
    )
    calls = []

    def loss(x, y, u):
        calls.append(1)
        if fail_at is not None and len(calls) == fail_at:
            raise _InterruptError
        if seen is not None:
            seen.append((x.clone(), u.clone()))
        return -model.log_prob(x, u).mean()

    return ParitySide("coupling", model, loss, lambda m, x, u: (m.log_prob(x, u), None))


def _case(build_ours, build_peer) -> ParityCase:
    return ParityCase(
        "a/b",
        "levels",
        "density",
        lambda smoke: _levels_data(),
        build_ours,
        build_peer,
        SETTINGS,
        2,
    )


def test_identical_models_stay_identical(tmp_path: Path) -> None:
    """The same model on both sides: every number of the two sides agrees exactly, and both saw
    the same batches and noise (what "identical training by construction" means)."""
    seen = {"ours": [], "peer": []}
    case = _case(
        lambda d, s, sm: _coupling_side(d, s, sm, seen=seen["ours"]),
        lambda d, s, sm: _coupling_side(d, s, sm, seen=seen["peer"]),
    )
    result = run_seed(case, 3, tmp_path / "run", log=lambda _: None)
    assert len(seen["ours"]) == len(seen["peer"]) == SETTINGS.steps
    for (xo, uo), (xp, up) in zip(seen["ours"], seen["peer"], strict=True):
        assert torch.equal(xo, xp) and torch.equal(uo, up)
    assert len({tuple(x.flatten().tolist()) for x, _ in seen["ours"]}) > 1  # batches change
    assert result["test"]["ours"] == result["test"]["peer"]
    assert [r["ours"]["bpd"] for r in result["history"]] == [
        r["peer"]["bpd"] for r in result["history"]
    ]
    assert [r["step"] for r in result["history"]] == [0, 4, 8, 12]
    summary = summarise(case, [result])
    assert summary["test_diff"] == 0 and summary["verdict_steps"] == "within noise"
    assert summary["median_diff"] == 0 and summary["verdict_median"] == "within noise"


def test_interrupted_run_resumes_to_the_same_numbers(tmp_path: Path) -> None:
    plain = _case(_coupling_side, _coupling_side)
    reference = run_seed(plain, 1, tmp_path / "plain", log=lambda _: None)
    interrupted = _case(lambda d, s, sm: _coupling_side(d, s, sm, fail_at=7), _coupling_side)
    with pytest.raises(_InterruptError):
        run_seed(interrupted, 1, tmp_path / "cut", log=lambda _: None)
    assert (tmp_path / "cut" / "state.pt").exists()  # the checkpoint at step 4
    resumed = run_seed(plain, 1, tmp_path / "cut", log=lambda _: None)
    assert not (tmp_path / "cut" / "state.pt").exists()
    assert resumed["test"] == reference["test"]
    assert resumed["history"][-1]["ours"]["bpd"] == reference["history"][-1]["ours"]["bpd"]
    assert run_seed(plain, 1, tmp_path / "cut")["test"] == reference["test"]  # not run again


def test_a_run_is_trained_by_one_process_at_a_time(tmp_path: Path) -> None:
    with claim(tmp_path / "run"), pytest.raises(RunClaimed), claim(tmp_path / "run"):
        pass
    assert not (tmp_path / "run" / "running.pid").exists()  # released
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "run" / "running.pid").write_text(str(dead.pid))  # a killed run's file
    with claim(tmp_path / "run"):
        assert (tmp_path / "run" / "running.pid").read_text() != str(dead.pid)


def test_committed_report_restores_finished_runs(tmp_path: Path) -> None:
    """A fresh checkout (empty runs/) gets the finished runs back from the report's json."""
    case = _case(_coupling_side, _coupling_side)
    runs, out = tmp_path / "runs", tmp_path / "report"
    result = run_seed(case, 0, runs / case.folder_name / "seed0", log=lambda _: None)
    write_parity_report([case], runs, out, command="test")
    assert "a/b" in (out / "report.md").read_text()
    shutil.rmtree(runs)
    assert restore_results(out / "results.json", runs, [case]) == 1
    restored = run_seed(case, 0, runs / case.folder_name / "seed0")  # read back, no training
    assert restored == json.loads(json.dumps(result))
    assert restore_results(out / "results.json", runs, [case]) == 0


def test_verdict_rule() -> None:
    assert verdict(0.004, 0.005) == "within noise"
    assert verdict(0.006, 0.005) == "behind"
    assert verdict(-0.006, 0.005) == "ahead"
    assert verdict(-1.0, 0.5, higher_is_better=True) == "behind"  # accuracy: lower is worse
    assert verdict(float("nan"), 0.005) == "n/a"


def test_every_family_is_paired() -> None:
    pairs = {c.pair for c in CASES}
    assert {
        "maf-affine/zuko",
        "maf-affine/nflows",
        "maf-dsf/zuko-naf",
        "realnvp/normflows",
        "coupling+1x1/normflows",
        "resflow-cpu/residual-flows",
        "flowpp-cpu/flowplusplus",
    } <= pairs
    assert {c.task for c in CASES if c.pair.startswith("resflow")} == {"density", "hybrid"}
    assert all(c.differences for c in CASES)
    image = [c for c in CASES if not c.pair.startswith("maf")]
    assert all(c.settings.steps >= 1500 and c.settings.evals >= 10 for c in CASES)
    assert all(c.seeds >= (2 if c.pair.startswith(("resflow", "flowpp")) else 3) for c in image)


@pytest.mark.parametrize("case", CASES, ids=[c.key for c in CASES])
def test_pair_matches_parameter_count(case: ParityCase) -> None:
    data = case.load_data(True)
    try:
        sides = [case.build_ours(data, 0, True), case.build_peer(data, 0, True)]
    except PeerMissing as missing:
        pytest.skip(str(missing))
    ours, peer = (count_parameters(s.module) for s in sides)
    assert abs(ours / peer - 1) <= 0.05, f"{case.key}: {ours} vs {peer}"
    for side in sides:
        x, y = data.train_x[:4], data.train_y[:4]
        u = None if data.num_levels is None else torch.rand(x.shape)
        assert torch.isfinite(side.loss(x, y, u))
        module = side.module
        if side.finalize is not None:
            side.finalize(module)
        with torch.no_grad():
            lp, logits = side.score(module.eval(), x, u)
        assert lp.shape == (4,) and bool(lp.isfinite().all())
        assert (logits is not None) == (case.task == "hybrid")


def test_smoke_recipe_writes_the_report(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "recipes" / "parity.py"),
            "--smoke",
            "--threads",
            "1",
            "--runs",
            str(tmp_path / "runs"),
            "--only",
            "fashion-mnist",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "runs" / "smoke" / "report"
    results = json.loads((out / "results.json").read_text())
    assert "realnvp/normflows fashion-mnist" in results["summaries"]
    assert "Parity with the reference implementations" in (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "<table" in html
    for key in (
        "resflow-cpu/residual-flows fashion-mnist density",
        "flowpp-cpu/flowplusplus fashion-mnist uniform",
    ):
        assert key in results["summaries"] or key in results["skipped"], key


def test_a_different_peer_gives_different_numbers(tmp_path: Path) -> None:
    """The identical-models check can fail: another initialisation on one side shows."""
    case = _case(_coupling_side, lambda d, s, sm: _coupling_side(d, s + 1, sm))
    result = run_seed(case, 0, tmp_path / "r", log=lambda _: None)
    assert result["test"]["ours"] != result["test"]["peer"]


def test_importance_weighted_bound(tmp_path: Path) -> None:
    """With ``iw_samples`` the test split gets the IW bound: at S = 1 it is the one-sample bound
    at the first IW noise; at S > 1 never below the one-sample bound averaged over its draws;
    identical sides give identical bounds."""
    from peer_pairs.parity import IW_NOISE_SEED, _evaluate_iw, _noise

    settings = replace(SETTINGS, iw_samples=4, iw_size=10)
    case = replace(_case(_coupling_side, _coupling_side), settings=settings)
    result = run_seed(case, 1, tmp_path / "run", log=lambda _: None)
    ours, peer = result["test"]["ours"]["iw"], result["test"]["peer"]["iw"]
    assert ours == peer and ours["samples"] == 4 and ours["examples"] == 10
    assert ours["bpd"] < ours["single_bpd"]

    data = _levels_data()
    side = _coupling_side(data, 0, False)
    x = data.test_x[:10]
    one = _evaluate_iw(side, side.module, x, 1, 4, data.dim)
    with torch.no_grad():
        lp = side.module.eval().log_prob(x, _noise(x.shape, IW_NOISE_SEED)).double()
    expected = float(-lp.mean() / (data.dim * math.log(2)))
    assert one["bpd"] == pytest.approx(expected, rel=1e-12)
    assert one["single_bpd"] == pytest.approx(expected, rel=1e-12)


def test_variational_pair_draws_the_same_noise(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both sides of the variational Flow++ pair push the same ε through their dequantizers,
    fixed by the loop's u (resumable), fresh for a new u."""
    import hybridflow.transforms.dequantization as dq

    case = next(c for c in CASES if c.key == "flowpp-cpu/flowplusplus fashion-mnist variational")
    data = case.load_data(True)
    try:
        ours, peer = case.build_ours(data, 0, True), case.build_peer(data, 0, True)
    except PeerMissing as missing:
        pytest.skip(str(missing))
    drawn: dict[str, list[Tensor]] = {"ours": [], "peer": []}
    draw, randn_like = dq._draw, torch.randn_like

    def record_ours(kind, like, generator):
        out = draw(kind, like, generator)
        drawn["ours"].append(out)
        return out

    def record_peer(t, *args, **kwargs):
        out = randn_like(t, *args, **kwargs)
        drawn["peer"].append(out)
        return out

    monkeypatch.setattr(dq, "_draw", record_ours)
    monkeypatch.setattr(torch, "randn_like", record_peer)
    x = data.train_x[:4]
    u1, u2 = torch.rand(x.shape), torch.rand(x.shape)
    with torch.no_grad():
        for u in (u1, u1, u2):
            ours.score(ours.module.eval(), x, u)
            peer.score(peer.module.eval(), x, u)
    for side in ("ours", "peer"):
        assert len(drawn[side]) == 3
    for a, b in zip(drawn["ours"], drawn["peer"], strict=True):
        assert torch.equal(a, b)
    assert torch.equal(drawn["ours"][0], drawn["ours"][1])
    assert not torch.equal(drawn["ours"][0], drawn["ours"][2])


def test_runs_of_an_older_revision_are_retrained_not_restored(tmp_path: Path) -> None:
    """A pair whose side changed (revision bumped) trains again: its old result is kept aside,
    neither reported nor restored from a committed report."""
    old = _case(_coupling_side, _coupling_side)
    new = replace(old, revision=1, build_peer=lambda d, s, sm: _coupling_side(d, s + 1, sm))
    runs = tmp_path / "runs"
    first = run_seed(old, 0, runs / old.folder_name / "seed0", log=lambda _: None)
    report = tmp_path / "results.json"
    report.write_text(json.dumps({"runs": {old.key: [first]}}))
    assert restore_results(report, tmp_path / "fresh", [new]) == 0
    assert restore_results(report, tmp_path / "fresh", [old]) == 1
    second = run_seed(new, 0, runs / new.folder_name / "seed0", log=lambda _: None)
    assert second["revision"] == 1 and second["test"]["peer"] != first["test"]["peer"]
    assert (runs / new.folder_name / "seed0" / "result.revision0.json").exists()
    # A committed result of the current revision replaces a stale local one (kept aside).
    fresh = tmp_path / "fresh"
    report.write_text(json.dumps({"runs": {new.key: [second]}}))
    assert restore_results(report, fresh, [new]) == 1
    seed_dir = fresh / new.folder_name / "seed0"
    assert json.loads((seed_dir / "result.json").read_text())["revision"] == 1
    assert (seed_dir / "result.revision0.json").exists()
    write_parity_report([new], runs, tmp_path / "report", command="test")
    summaries = json.loads((tmp_path / "report" / "results.json").read_text())["summaries"]
    assert summaries[new.key]["test_bpd_peer"][0] == second["test"]["peer"]["bpd"]


def test_median_verdict_is_not_carried_by_a_few_examples(tmp_path: Path) -> None:
    """A peer whose mean is blown up by a few examples (finite but huge log-likelihoods) gets a
    useless mean verdict; the median verdict still says who codes the typical example better."""
    import copy

    case = _case(_coupling_side, _coupling_side)
    base = run_seed(case, 0, tmp_path / "run", log=lambda _: None)
    results = []
    for seed, (mean, median) in enumerate([(3.70, 3.60), (1e5, 3.61), (3.71, 3.62)]):
        r = copy.deepcopy(base)
        r["seed"] = seed
        r["test"]["ours"].update(bpd=3.5 + seed / 1000, median_bpd=3.40 + seed / 1000)
        r["test"]["peer"].update(bpd=mean, median_bpd=median)
        results.append(r)
    summary = summarise(case, results)
    assert summary["verdict_steps"] == "within noise"  # tolerance swamped by the outlier
    assert summary["verdict_median"] == "ahead"
    assert summary["median_diff"] == pytest.approx(3.401 - 3.61)


def _run_recipe(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "recipes" / script), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
    )


def _smoke_recipe(script: str, *args: str, out: Path) -> dict:
    """Run a parity trace recipe with ``--smoke`` into ``out``: its one seed's result."""
    proc = _run_recipe(script, "--smoke", *args, f"--out={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result_path,) = out.glob("*/seed0/result.json")
    return json.loads(result_path.read_text())


@pytest.mark.parametrize("neumann", ["library", "theorem2"])
def test_resflow_ablation_recipe_trains_both_arms(neumann: str, tmp_path: Path) -> None:
    """Ours against ours one difference apart: the arm with the first pre-activation has one
    LipSwish (one parameter) more, and both train and score."""
    result = _smoke_recipe("parity_resflow_ablation.py", f"--neumann={neumann}", out=tmp_path)
    assert result["parameters"]["ours"] == result["parameters"]["peer"] + 1
    assert all(math.isfinite(result["test"][side]["bpd"]) for side in ("ours", "peer"))


def test_report_lists_every_miss_with_its_trace(tmp_path: Path) -> None:
    """A pair behind its peer appears under the misses with its case's finding, one without a
    finding says it was not traced; the cost table counts both sides' training hours."""
    runs, out = tmp_path / "runs", tmp_path / "report"
    traced = replace(_case(_coupling_side, _coupling_side), findings=("The trace found X.",))
    untraced = replace(traced, setting="other levels", findings=())
    for case in (traced, untraced):
        for seed in range(2):
            folder = runs / case.folder_name / f"seed{seed}"
            run_seed(case, seed, folder, log=lambda _: None)
            result = json.loads((folder / "result.json").read_text())
            result["test"]["ours"]["bpd"] += 1.0  # ours far behind on test
            (folder / "result.json").write_text(json.dumps(result))
    write_parity_report([traced, untraced], runs, out, command="test")
    text = (out / "report.md").read_text()
    misses = text.split("## Misses and their traces")[1].split("## Cost")[0]
    assert "**a/b levels** (behind at equal steps): The trace found X." in misses
    assert "**a/b other levels** (behind at equal steps): not traced yet." in misses
    hours = sum(
        json.loads(p.read_text())["train_s"][side]
        for p in runs.glob("*/seed*/result.json")
        for side in ("ours", "peer")
    )
    assert f"{hours / 3600:.2f} h in all" in text
    assert "| a/b | levels | 2 |" in text.split("## Cost")[1]


def test_dsf_trace_recipe_trains_both_arms(tmp_path: Path) -> None:
    """The DSF trace trains the matched model against a narrower one on the breast-cancer
    table; the narrower arm has fewer parameters."""
    result = _smoke_recipe("parity_dsf_trace.py", "--seeds=1", "--variant=width=16", out=tmp_path)
    assert result["parameters"]["peer"] < result["parameters"]["ours"]
    assert all(math.isfinite(result["test"][side]["bpd"]) for side in ("ours", "peer"))
    bad = _run_recipe("parity_dsf_trace.py", "--variant=depth=3", timeout=120)
    assert (
        bad.returncode == 2
        and "--variant must be one of width=..., units=..., evals=..." in bad.stderr
    )
