"""Every paper-scale recipe runs end to end: its ``--smoke`` mode, in a subprocess, into tmp.

``--smoke`` trains a few steps on random data of the recipe's shapes with the models shrunk
(see each recipe's docstring), then evaluates and writes its report like the real run; ``--out``
keeps everything out of the repository's reports/ and runs/.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

__all__: list[str] = []

ROOT = Path(__file__).resolve().parents[1]
#: recipe -> the files its smoke run must write, relative to ``--out``.
SMOKE_OUTPUTS = {
    "resflow_hybrid.py": [
        f"reports/resflow_hybrid-smoke/{d}/{f}"
        for d in ("mnist", "svhn")
        for f in ("report.md", "report.html", "results.csv")
    ],
    "flowpp_cifar10.py": [
        "reports/flowpp_cifar10-smoke/report.md",
        "reports/flowpp_cifar10-smoke/results.json",
        "runs/flowpp_cifar10-smoke/run/model.pt",
    ],
    "naf_uci.py": ["reports/naf_uci-smoke/report.md", "reports/naf_uci-smoke/results.json"],
    "naf_vi.py": [
        f"reports/naf_vi-smoke/{f}" for f in ("report.md", "results.json", "fig5.png", "fig7.png")
    ],
    "vae_flows.py": ["reports/vae_flows-smoke/report.md", "reports/vae_flows-smoke/results.json"],
    "resflow_ablation.py": [
        "reports/resflow_ablation-smoke/report.md",
        "reports/resflow_ablation-smoke/results.json",
        "reports/resflow_ablation-smoke/jobs/digits-hybrid-resflow-lipswish-s0.json",
    ],
    "resflow_bias.py": [
        f"reports/resflow_bias-smoke/{f}"
        for f in ("report.md", "results.json", "bias.png", "gap.png")
    ],
}

#: recipes that keep one result per job in reports/NAME-smoke/jobs/ and resume from it -> the
#: results.json key holding their per-job rows (compared between a first run and a rerun).
JOB_RECIPES = {"naf_vi.py": "figure5", "vae_flows.py": "rows", "resflow_ablation.py": "runs"}


def run_recipe(recipe: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # CPU, as CI
    return subprocess.run(
        [sys.executable, str(ROOT / "recipes" / recipe), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def check_results(recipe: str, out: Path) -> None:
    """What each smoke run's results must say beyond existing (a crashed sweep cell is only
    reported, not raised, so the sweep's tables are counted)."""
    if recipe == "resflow_hybrid.py":
        for dataset in ("mnist", "svhn"):
            path = out / f"reports/resflow_hybrid-smoke/{dataset}/results.csv"
            rows = list(csv.DictReader(path.open()))
            cells = {(r["backbone"], r["lam"]) for r in rows}
            assert len(cells) == 9, f"{dataset}: {len(cells)} of 9 cells finished"
            assert all(7.0 < float(r["bpd"]) < 9.5 for r in rows)  # random 8-bit levels: ~8
    elif recipe == "flowpp_cifar10.py":
        results = json.loads((out / "reports/flowpp_cifar10-smoke/results.json").read_text())
        assert results["iw_samples"] == 4 and results["config"]["dataset"] == "synthetic:3x32x32"
        # Random 8-bit levels: bits/dim near 8, and the IW bound no worse than one draw's.
        assert 7.0 < results["bpd_iw"] <= results["bpd_single_draw"] + 0.05 < 9.5
    elif recipe == "naf_vi.py":
        results = json.loads((out / "reports/naf_vi-smoke/results.json").read_text())
        cells = {(r["target"], r["flow"]) for r in results["figure5"]}
        assert len(cells) == 6 and all(math.isfinite(r["kl_reverse"]) for r in results["figure5"])
        assert all(len(c["0"]) == 2 for c in results["figure7"].values())  # two evaluations each
    elif recipe == "vae_flows.py":
        rows = json.loads((out / "reports/vae_flows-smoke/results.json").read_text())["rows"]
        assert {r["posterior"] for r in rows} == {"VAE", "IAF-affine", "IAF-DSF"}
        assert all(r["neg_log_likelihood"] <= r["neg_elbo_on_nll_images"] + 1 for r in rows)
    elif recipe == "resflow_ablation.py":
        runs = json.loads((out / "reports/resflow_ablation-smoke/results.json").read_text())["runs"]
        assert len(runs) == 2 * 2 * 3  # datasets × tasks × rows
        assert all(0 < r["exact_bpd"] < 10 for r in runs)
        assert all("accuracy" in r for r in runs if r["task"] == "hybrid")
    elif recipe == "resflow_bias.py":
        results = json.loads((out / "reports/resflow_bias-smoke/results.json").read_text())
        assert len(results["part1"]) == 3 * 2 * 6  # inputs × c × estimators
        assert all(math.isfinite(r["bias_nats"]) for r in results["part1"])
        assert all(0 < r["exact_bpd"] < 10 for r in results["part2"])
    else:
        rows = json.loads((out / "reports/naf_uci-smoke/results.json").read_text())
        assert [r["dim"] for r in rows] == [6, 8, 21, 43, 63]
        assert all(math.isfinite(float(r["test_ll"])) for r in rows)


@pytest.mark.parametrize("recipe", list(SMOKE_OUTPUTS))
def test_recipe_smoke_runs(recipe: str, tmp_path: Path) -> None:
    # Run from an empty folder: a recipe that ignored --out would write there, not in the repo.
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    out = tmp_path / "out"
    done = run_recipe(recipe, "--smoke", f"--out={out}", cwd=cwd)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for rel in SMOKE_OUTPUTS[recipe]:
        assert (out / rel).is_file(), f"{recipe} --smoke did not write {rel}"
    assert not any(cwd.iterdir()), f"{recipe} wrote outside --out: {list(cwd.iterdir())}"
    check_results(recipe, out)
    if recipe in JOB_RECIPES:
        check_rerun_reuses_jobs(recipe, out, cwd)


def check_rerun_reuses_jobs(recipe: str, out: Path, cwd: Path) -> None:
    """A rerun (the next sitting) trains nothing: every job file stays as it was and the
    results are the stored ones, figures included."""
    report = out / "reports" / (recipe.removesuffix(".py") + "-smoke")
    jobs = {p.name: p.read_bytes() for p in (report / "jobs").glob("*.json")}
    assert jobs, f"{recipe} wrote no jobs/"
    first = json.loads((report / "results.json").read_text())[JOB_RECIPES[recipe]]
    figures = {p.name: p.read_bytes() for p in report.glob("*.png")}
    done = run_recipe(recipe, "--smoke", f"--out={out}", cwd=cwd)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert {p.name: p.read_bytes() for p in (report / "jobs").glob("*.json")} == jobs
    again = json.loads((report / "results.json").read_text())[JOB_RECIPES[recipe]]
    drop = ("reused",)  # the only field that says which run computed a row
    assert [{k: v for k, v in r.items() if k not in drop} for r in again] == [
        {k: v for k, v in r.items() if k not in drop} for r in first
    ]
    assert {p.name: p.read_bytes() for p in report.glob("*.png")} == figures


@pytest.mark.parametrize(
    ("recipe", "args", "message"),
    [
        ("resflow_hybrid.py", ["--datasets=svhn"], "SVHN ('svhn') not found"),
        ("flowpp_cifar10.py", [], "CIFAR-10 ('cifar10') not found"),
        ("naf_uci.py", ["--sets=uci:miniboone"], "miniboone"),
    ],
)
def test_full_recipes_resolve_their_config_and_ask_for_data(
    recipe: str, args: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The paper-scale settings pass the config checks and stop at the missing data with the
    # loader's advice (in-process: no second interpreter start, nothing trained).
    from hybridflow.data import DatasetNotFoundError

    empty = tmp_path / "no-data"
    argv = [recipe, *args, f"--data_root={empty}", f"--out={tmp_path / 'out'}"]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetNotFoundError, match=re.escape(message)) as info:
        runpy.run_path(str(ROOT / "recipes" / recipe), run_name="__main__")
    assert str(empty) in str(info.value)  # the command line's data_root reached the loader
