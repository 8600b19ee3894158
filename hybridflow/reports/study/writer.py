"""The λ study report: ``results.csv``, ``results.json``, the figures, ``report.md`` and
``report.html``, one function per section."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...evaluation import OOD_METRIC_DESCRIPTIONS, OOD_SCORE_DESCRIPTIONS
from ..document import Document as _Doc
from ..document import Table as _Table
from ..document import git_commit, package_versions
from .checks import ReproductionCheck
from .convergence import convergence_table, draw_convergence_curves, equal_time_table
from .figures import FIGURES, _score_names
from .results import CellResult, _pm, _point_label

__all__ = ["write_study_report"]


def _best_marks(values: list[float | None], higher: bool) -> set[int]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if len(finite) < 2:
        return set()
    best = max(finite) if higher else min(finite)
    return {i for i, v in enumerate(values) if v is not None and v == best}


def _metric_table(results, columns, lead=("backbone", "λ")) -> _Table:
    """Rows = cells; columns = (title, metric, scale, digits, higher-is-better or None)."""
    points = any(r.point for r in results)
    header = list(lead) + (["grid"] if points else [])
    header += [
        title + ("" if hib is None else (" ↑" if hib else " ↓")) for title, _, _, _, hib in columns
    ]
    table = _Table(header, [])
    for r in results:
        row = [r.backbone, r.lam] + ([_point_label(r.point)] if points else [])
        for _, metric, scale, digits, hib in columns:
            stat = r.stat(metric)
            if not r.runs:
                row.append("failed")
            elif hib is None and digits == 0 and stat:  # counts and seconds: no spread
                row.append(f"{stat['mean']:,.0f}")
            else:
                row.append(_pm(stat, scale, digits))
        table.rows.append(row)
    offset = len(lead) + (1 if points else 0)
    for j, (_, metric, scale, digits, hib) in enumerate(columns):
        if hib is None:
            continue
        # Compare the values as shown, so that equal-looking cells are marked alike.
        values = [
            round(scale * r.stat(metric)["mean"], digits) if r.runs and r.stat(metric) else None
            for r in results
        ]
        for i in _best_marks(values, hib):
            table.bold.add((i, offset + j))
    return table


MAIN_COLUMNS = [
    ("accuracy %", "accuracy", 100, 2, True),
    ("bits/dim", "bpd", 1, 3, False),
    ("bits/dim IW", "bpd_iw", 1, 3, False),
    ("ECE %", "ece", 100, 2, False),
    ("ECE % (TS)", "ece_ts", 100, 2, False),
    ("adaptive ECE %", "adaptive_ece", 100, 2, False),
    ("MCE %", "mce", 100, 1, False),
    ("Brier", "brier", 1, 4, False),
    ("NLL", "class_nll", 1, 4, False),
    ("NLL (TS)", "class_nll_ts", 1, 4, False),
    ("T", "temperature", 1, 3, None),
    ("FD (T=1)", "fid", 1, 2, False),
    ("FD (best T)", "fid_best", 1, 2, False),
    ("params", "num_parameters", 1, 0, None),
    ("train s", "train_time_s", 1, 0, None),
]

_OOD_METRICS = [
    ("auroc", "AUROC", True),
    ("aupr_in", "AUPR-in", True),
    ("aupr_out", "AUPR-out", True),
    ("fpr95_id", "FPR@95 (95% ID accepted)", False),
    ("fpr95_ood", "FPR@95 (95% OOD caught)", False),
]


def _ood_sets(results) -> list[str]:
    sets: dict[str, None] = {}
    for r in results:
        for run in r.runs:
            for key in run:
                if key.startswith("ood_bpd/"):
                    sets[key.removeprefix("ood_bpd/")] = None
    return list(sets)


@dataclass(frozen=True)
class _Study:
    """What every section of the report reads."""

    name: str
    results: Sequence[CellResult]
    shared_config: Mapping[str, Any]
    provenance: dict[str, Any]
    bound: str
    drawn: dict[str, str]  # figure file -> alt text, for the figures that were drawn
    drawn_dir: Path  # where the figures are

    @property
    def finished(self) -> list[CellResult]:
        return [r for r in self.results if r.runs]

    @property
    def n_failed(self) -> int:
        return sum(len(r.failed) for r in self.results)

    def figure(self, doc: _Doc, file: str) -> None:
        if file in self.drawn:
            doc.figure(file, self.drawn[file])


def _write_results_csv(results: Sequence[CellResult], out: Path) -> None:
    """One row per run: coordinates, seed, run folder and every flat metric."""
    run_rows = []
    for r in results:
        for seed, run, run_dir in zip(r.seeds, r.runs, r.run_dirs, strict=True):
            run_rows.append(
                {
                    "backbone": r.backbone,
                    "lam": r.lam,
                    **dict(r.point),
                    "seed": seed,
                    "run": run_dir.name,
                    **run,
                }
            )
    if run_rows:
        columns = list(dict.fromkeys(k for row in run_rows for k in row))
        with (out / "results.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(
                [
                    {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}
                    for row in run_rows
                ]
            )


def _results_json(results: Sequence[CellResult]) -> list[dict[str, Any]]:
    """Per cell and metric: mean, std, per-seed values; failures."""
    cells = []
    for r in results:
        metrics = sorted({k for run in r.runs for k in run})
        cells.append(
            {
                "backbone": r.backbone,
                "lam": r.lam,
                "grid": dict(r.point),
                "seeds": r.seeds,
                "failed": [{"seed": s, "error": e} for s, e in r.failed],
                "stopped": list(r.stops),
                "metrics": {m: r.stat(m) for m in metrics},
            }
        )
    return cells


def _draw_figures(results: Sequence[CellResult], out: Path) -> dict[str, str]:
    """Draw every figure that has something to show; remove stale files of the others."""
    drawn = {}
    finished = [r for r in results if r.runs]
    for file, (draw, alt) in FIGURES.items():
        if finished and draw(finished, out / file) is not False:
            drawn[file] = alt
        else:
            (out / file).unlink(missing_ok=True)
    return drawn


def _section_provenance(doc: _Doc, study: _Study) -> None:
    prov, wall_time_s = study.provenance, study.provenance["wall_time_s"]
    lines = [
        f"Regenerate: `{prov['command']}`",
        f"Commit: `{prov['commit']}`",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in prov["versions"].items()),
        f"Seeds {prov['seeds']}; {prov['workers']} worker process(es), {prov['threads']} torch "
        "threads in all"
        + (
            f"; wall time of this invocation {wall_time_s:.0f} s (training, evaluation, report)"
            if wall_time_s
            else ""
        ),
    ]
    train_total = sum(
        run.get("train_time_s", 0.0)
        for r in study.results
        for run in r.runs
        if math.isfinite(run.get("train_time_s", math.nan))
    )
    lines.append(
        f"Training time of all runs, summed: {train_total:.0f} s (cells finished by an "
        "earlier invocation are reused and counted here, not in the wall time)"
    )
    doc.bullets(lines)


def _section_introduction(doc: _Doc, study: _Study, notes) -> None:
    dataset = study.shared_config.get("dataset", "?")
    n_failed = study.n_failed
    doc.para(
        f"Dataset `{dataset}`, test split. Loss per example = CE + λ · NLL in nats, so λ = 1 "
        "is the joint likelihood −log p(x, y) and λ = 1/D weighs the NLL per dimension "
        "(Nalisnick et al. 2019). Every number is mean ± std over seeds (sample std) of the EMA "
        f"weights; ↑/↓ mark the better direction and the best cell of each column is bold. "
        f"Bits/dim are lower bounds on the data's own alphabet: {study.bound}. Accuracy and "
        "calibration use bin-centre inputs; TS = after temperature scaling fitted on the "
        "validation split." + (f" **{n_failed} run(s) failed** (see Failures)." if n_failed else "")
    )
    for note in notes:
        doc.para(note(study.results) if callable(note) else note)


def _section_checks(doc: _Doc, checked: Sequence[tuple[ReproductionCheck, list]]) -> None:
    for check, claims in checked:
        doc.heading(check.title)
        doc.para(check.intro)
        rows = []
        with_convergence = any("convergence" in c for c in claims)
        for c in claims:
            verdict = check.verdicts[0] if c["reproduced"] else check.verdicts[1]
            if c.get("within_noise"):
                verdict += " (some differences within seed noise)"
            rows.append([c["claim"], verdict, c["detail"], c["paper"]])
            if with_convergence:
                rows[-1].insert(3, c.get("convergence", "–"))
        header = ["claim", "here", "numbers here (mean ± std)", check.paper_column]
        if with_convergence:
            header.insert(3, "convergence of its cells")
        doc.table(_Table(header, rows, text=True))


def _section_main(doc: _Doc, study: _Study, baselines: Mapping[str, float] | None) -> None:
    doc.heading("Accuracy, density and calibration")
    columns = [c for c in MAIN_COLUMNS if any(r.stat(c[1]) for r in study.finished)]
    doc.table(_metric_table(study.results, columns))
    labels = sorted({r.fid_label for r in study.finished if r.fid_label})
    if labels:
        doc.para(
            "FD: Fréchet distance of samples to the test images at temperature 1 and at the "
            "best of T ∈ {1, 0.85, 0.7}; "
            + "; ".join(labels)
            + " (not an Inception FID: compare within this table only)."
        )
    if baselines:
        doc.para(
            "Baselines on the same split (bits/dim): "
            + "; ".join(f"{k} **{v:.3f}**" for k, v in baselines.items())
        )
    study.figure(doc, "tradeoff.png")
    study.figure(doc, "reliability.png")


def _section_convergence(doc: _Doc, study: _Study) -> None:
    finished = study.finished
    if not any(stop for r in finished for stop in r.stops):
        return  # models saved before runs recorded why they stopped
    doc.heading("Convergence")
    doc.para(
        "Each run watches the validation metric its loss optimizes (bits/dim when λ > 0, the "
        "classifier's NLL when λ = 0) and is **converged** when its best value improved by less "
        "than the threshold (the run's `stop_rel_improvement`, else 0.5%) over the last quarter "
        "of its steps, **budget-limited** otherwise (**unknown**: fewer than four validations, "
        "too few to tell); it stops on that plateau, at its `budget_minutes` or at its last "
        "epoch (`hybridflow.training.stopping`)."
    )
    doc.table(convergence_table(finished))
    equal = equal_time_table(finished)
    if equal is not None:
        table, _ = equal
        doc.para(
            "At equal training time (validation split; times include validation and "
            "checkpoints, as the runs log them): per λ, every backbone's runs at the shortest "
            "cell's training time (median over its seeds), each at its last validation by then, "
            "mean over seeds. What a user with that budget chooses between. λ = 0 leaves the "
            "density untrained: no bits/dim there."
        )
        doc.table(table)
    path = study.drawn_dir / "convergence.png"
    if draw_convergence_curves(finished, path):
        doc.para(
            "Validation learning curves of every run (seeds: solid, dashed, dotted; × where "
            "the plateau rule or the time budget stopped a run; λ = 0 leaves the density "
            "untrained, so its bits/dim are not drawn):"
        )
        doc.figure(path.name, "Validation learning curves against steps and training time")
    else:
        path.unlink(missing_ok=True)


def _section_ood(doc: _Doc, study: _Study) -> None:
    results = study.results
    sets = _ood_sets(study.finished)
    scores = _score_names(study.finished)
    if not sets:
        return
    doc.heading("OOD detection")
    doc.para(
        "Higher score = more OOD; in-distribution = the test split. OOD sets: "
        + ", ".join(f"`{s}`" for s in sets)
        + ". The Mahalanobis scores are fitted on training images, the typicality test "
        "and the hybrid score's calibration on halves of the validation split."
    )
    doc.heading("AUROC, mean over the OOD sets", 3)
    doc.table(_metric_table(results, [(s, f"ood/mean/{s}/auroc", 1, 3, True) for s in scores]))
    study.figure(doc, "ood_auroc.png")
    doc.heading("Bits/dim of each OOD set (test for comparison)", 3)
    doc.table(
        _metric_table(
            results,
            [("test", "bpd", 1, 3, None)]
            + [(s.removeprefix("npz:").split("/")[-1], f"ood_bpd/{s}", 1, 3, None) for s in sets],
        )
    )
    study.figure(doc, "bpd_hist.png")
    for spec in sets:
        doc.heading(f"AUROC against `{spec}`", 3)
        doc.table(
            _metric_table(results, [(s, f"ood/{spec}/{s}/auroc", 1, 3, True) for s in scores])
        )
    doc.details_start(
        "Every OOD metric (AUPR-in, AUPR-out, FPR@95 both conventions), mean over sets and per set"
    )
    for metric, title, hib in _OOD_METRICS[1:]:
        for spec in ["mean", *sets]:
            where = "mean over the OOD sets" if spec == "mean" else f"`{spec}`"
            doc.heading(f"{title}, {where}", 3)
            doc.table(
                _metric_table(results, [(s, f"ood/{spec}/{s}/{metric}", 1, 3, hib) for s in scores])
            )
    doc.bullets([f"`{k}`: {v}" for k, v in OOD_METRIC_DESCRIPTIONS.items()])
    doc.details_end()
    doc.para(
        "Scores: "
        + " ".join(
            f"`{s}`: {OOD_SCORE_DESCRIPTIONS[s]}" for s in scores if s in OOD_SCORE_DESCRIPTIONS
        )
    )


def _section_selective(doc: _Doc, study: _Study) -> None:
    if not any(r.stat("selective/density/acc@90") for r in study.finished):
        return
    doc.heading("Selective classification: reject by density or by max-softmax")
    doc.para(
        "Accuracy on the kept test inputs at 80/90/95% coverage, rejecting the least "
        "likely inputs (log p(x)) or the least confident (max-softmax); AURC = area "
        "under the risk–coverage curve (Geifman & El-Yaniv 2017, lower is better)."
    )
    cols = []
    for cov in (80, 90, 95):
        cols += [
            (f"acc@{cov} density %", f"selective/density/acc@{cov}", 100, 2, True),
            (f"acc@{cov} softmax %", f"selective/max_softmax/acc@{cov}", 100, 2, True),
        ]
    cols += [
        ("AURC density", "selective/density/aurc", 1, 4, False),
        ("AURC softmax", "selective/max_softmax/aurc", 1, 4, False),
    ]
    doc.table(_metric_table(study.results, cols))


def _section_samples_and_failures(doc: _Doc, study: _Study) -> None:
    if "samples.png" in study.drawn or "curves.png" in study.drawn:
        doc.heading("Samples and training curves")
        study.figure(doc, "samples.png")
        study.figure(doc, "curves.png")
    if study.n_failed:
        doc.heading("Failures")
        doc.bullets(
            [f"`{r.backbone}` λ={r.lam} seed {s}: {e}" for r in study.results for s, e in r.failed]
        )


def _section_settings(doc: _Doc, study: _Study, backbone_settings) -> None:
    doc.heading("Settings")
    doc.para("Shared by every run (λ, backbone and seed per cell):")
    doc.code(json.dumps(dict(study.shared_config), indent=2, sort_keys=True), "json")
    for backbone, entries in (backbone_settings or {}).items():
        doc.para(f"Settings of `{backbone}` runs:")
        doc.code(json.dumps(dict(entries), indent=2, sort_keys=True), "json")


def write_study_report(
    name: str,
    results: Sequence[CellResult],
    out: Path,
    *,
    command: str,
    shared_config: Mapping[str, Any],
    backbone_settings: Mapping[str, Mapping[str, Any]] | None = None,
    baselines: Mapping[str, float] | None = None,
    wall_time_s: float | None = None,
    threads: int | None = None,
    workers: int = 1,
    seeds: Sequence[int] = (0,),
    bound: str = "",
    notes: Sequence[str | Callable[[Sequence[CellResult]], str]] = (),
    checks: Sequence[ReproductionCheck] = (),
    commit: str | None = None,
) -> Path:
    """Write ``results.csv``, ``results.json``, the figures, ``report.md`` and ``report.html``.

    ``commit`` is the code's commit as read when the study started (default: read now).
    ``notes`` are paragraphs under the introduction; a callable note is computed from the
    results (e.g. a recipe's own comparison of grid values). ``checks`` are a paper's claims
    checked on the results (e.g. :data:`~hybridflow.reports.study.RESIDUAL_FLOWS_TABLE4`), each
    a section when the grid has the cells it needs.
    """
    out.mkdir(parents=True, exist_ok=True)
    _write_results_csv(results, out)
    checked = [(c, claims) for c in checks if (claims := c.evaluate(results))]
    provenance = {
        "command": command,
        "commit": commit or git_commit(),
        "versions": package_versions(),
        "wall_time_s": wall_time_s,
        "threads": threads,
        "workers": workers,
        "seeds": list(seeds),
    }
    summary = {
        "name": name,
        "provenance": provenance,
        "cells": _results_json(results),
        "reproduction": [claim for _, claims in checked for claim in claims] or None,
        "baselines": dict(baselines or {}),
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    drawn = _draw_figures(results, out)
    study = _Study(name, results, shared_config, provenance, bound, drawn, out)

    doc = _Doc(out)
    doc.heading(f"λ study: {name}", 1)
    _section_provenance(doc, study)
    _section_introduction(doc, study, notes)
    _section_checks(doc, checked)
    _section_main(doc, study, baselines)
    _section_convergence(doc, study)
    _section_ood(doc, study)
    _section_selective(doc, study)
    _section_samples_and_failures(doc, study)
    _section_settings(doc, study, backbone_settings)
    doc.write(f"λ study: {name}")
    return out
