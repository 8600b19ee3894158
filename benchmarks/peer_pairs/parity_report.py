"""The parity report: ours against the peer per pair, at equal steps and at equal wall time.

Reads the run folders of :func:`peer_pairs.parity.run_seed` (finished ``result.json`` files, and
the history of runs still in progress from their ``state.pt``) and writes ``report.md``, a
self-contained ``report.html``, ``results.json`` and one learning-curve figure per pair.

Verdicts (the issue's targets): at the final checkpoint, ours is *behind* when its test bits/dim
exceed the peer's by more than ``max(2 × pooled seed std, 0.005)``, *ahead* when they are lower
by more than that, and *within noise* otherwise; a hybrid pair is also behind when its accuracy
is lower than the peer's by more than 2 × the pooled std. At equal wall time each seed compares
the two validation curves (bits/dim against the side's own training seconds, linearly
interpolated) at the time the faster side finished; the same tolerance decides.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from _common import cpu_model
from matplotlib.figure import Figure

from hybridflow.reports import Document, Table, git_commit, package_versions
from hybridflow.runs import CheckpointError, load_checkpoint

from .parity import SIDES, ParityCase, current_result, retire_stale

BUDGET_HOURS = 6  # issue 24: the whole report on 2 CPU cores

__all__ = ["BPD_FLOOR", "restore_results", "summarise", "verdict", "write_parity_report"]

BPD_FLOOR = 0.005  # bits/dim: the smallest difference the targets count
SELECTED = {"best": "of the best validation checkpoint", "final": "after the last step"}
COLOURS = {"ours": "#0969da", "peer": "#cf222e", "true": "#57606a"}


def _runs(case: ParityCase, runs: Path) -> tuple[list[dict], list[dict]]:
    """Finished results and in-progress histories (``{"seed", "history", "step"}``) of a case."""
    done, partial = [], []
    folder = runs / case.folder_name
    for seed_dir in sorted(folder.glob("seed*")) if folder.is_dir() else []:
        if (result := current_result(case, seed_dir)) is not None:
            done.append(result)
        elif (seed_dir / "state.pt").exists():
            try:
                config = load_checkpoint(seed_dir / "state.pt")["config"]
            except CheckpointError:
                continue
            if config.get("revision", 0) != case.revision:
                continue
            state = config["state"]
            partial.append(
                {"seed": int(seed_dir.name[4:]), "history": state["history"], "step": state["step"]}
            )
    return done, partial


def restore_results(report_json: Path, runs: Path, cases: Sequence[ParityCase]) -> int:
    """Write back the ``result.json`` of every finished run a committed report holds, so that a
    fresh checkout (whose ignored ``runs/`` folder is empty) trains only what is missing.
    Returns how many were restored."""
    if not report_json.exists():
        return 0
    by_key = {case.key: case for case in cases}
    restored = 0
    for key, results in json.loads(report_json.read_text()).get("runs", {}).items():
        for result in results if key in by_key else []:
            if result.get("revision", 0) != by_key[key].revision:
                continue  # a run of the pair's older models
            folder = runs / by_key[key].folder_name / f"seed{result['seed']}"
            if current_result(by_key[key], folder) is None:
                folder.mkdir(parents=True, exist_ok=True)
                retire_stale(by_key[key], folder, log=lambda _: None)
                (folder / "result.json").write_text(json.dumps(result, indent=1))
                restored += 1
    return restored


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else float("nan")


def verdict(diff: float, tolerance: float, higher_is_better: bool = False) -> str:
    """``ahead`` / ``within noise`` / ``behind`` for ``diff = ours - peer``."""
    if math.isnan(diff):
        return "n/a"
    better = -diff if not higher_is_better else diff
    if better > tolerance:
        return "ahead"
    return "behind" if better < -tolerance else "within noise"


def _pooled(ours: Sequence[float], peer: Sequence[float]) -> float:
    """``sqrt((s_ours² + s_peer²) / 2)``; NaN with fewer than 2 seeds on a side."""
    if len(ours) < 2 or len(peer) < 2:
        return float("nan")
    return math.sqrt((statistics.variance(ours) + statistics.variance(peer)) / 2)


def _tolerance(pooled: float) -> float:
    return max(2 * pooled, BPD_FLOOR) if math.isfinite(pooled) else BPD_FLOOR


def _at_time(
    history: list[dict], side: str, seconds: float, key: str, best_so_far: bool = False
) -> float:
    """Validation ``key`` of ``side`` at ``seconds`` of its training, linearly interpolated;
    ``best_so_far``: the lowest value reached by then (what early stopping would keep)."""
    times = [0.0 if row["step"] == 0 else row[side]["train_s"] for row in history]
    values = np.array([row[side][key] for row in history])
    if best_so_far:
        values = np.minimum.accumulate(values)
    return float(np.interp(seconds, times, values))


def _quarter_drops(history: list[dict], side: str) -> tuple[float, float]:
    """Validation bits/dim gained over the first and the last quarter of the steps."""
    steps = [row["step"] for row in history]
    values = [row[side]["bpd"] for row in history]
    last = steps[-1]
    at = lambda frac: float(np.interp(frac * last, steps, values))  # noqa: E731
    return at(0.0) - at(0.25), at(0.75) - at(1.0)


def summarise(case: ParityCase, results: list[dict]) -> dict[str, Any]:
    """Test and equal-time numbers of both sides over the finished seeds, with verdicts."""
    out: dict[str, Any] = {"seeds": [r["seed"] for r in results]}
    test = {s: [r["test"][s]["bpd"] for r in results] for s in SIDES}
    for s in SIDES:
        out[f"test_bpd_{s}"] = _mean_std(test[s])
    medians = {s: [r["test"][s].get("median_bpd", math.nan) for r in results] for s in SIDES}
    for s in SIDES:  # runs scored before the median was recorded have none (nan)
        out[f"test_median_{s}"] = statistics.fmean(medians[s])
    if not any(math.isnan(out[f"test_median_{s}"]) for s in SIDES):
        # The same rule on the per-seed medians: a verdict no handful of examples can carry.
        m_diff = out["test_median_ours"] - out["test_median_peer"]
        m_tol = _tolerance(_pooled(medians["ours"], medians["peer"]))
        out.update(median_diff=m_diff, median_tolerance=m_tol)
        out["verdict_median"] = verdict(m_diff, m_tol)
    pooled = _pooled(test["ours"], test["peer"])
    diff = out["test_bpd_ours"][0] - out["test_bpd_peer"][0]
    out.update(test_diff=diff, test_pooled_std=pooled, test_tolerance=_tolerance(pooled))
    out["verdict_steps"] = verdict(diff, out["test_tolerance"])
    if all("iw" in r["test"][s] for r in results for s in SIDES):
        for s in SIDES:
            out[f"iw_bpd_{s}"] = _mean_std([r["test"][s]["iw"]["bpd"] for r in results])
            out[f"iw_single_{s}"] = statistics.fmean(
                r["test"][s]["iw"]["single_bpd"] for r in results
            )
        iw = results[0]["test"]["ours"]["iw"]
        out.update(iw_samples=iw["samples"], iw_examples=iw["examples"])
    if "true" in results[0]["test"]:
        out["true_bpd"] = statistics.fmean(r["test"]["true"]["bpd"] for r in results)
    if case.task == "hybrid":
        acc = {s: [100 * r["test"][s]["accuracy"] for r in results] for s in SIDES}
        for s in SIDES:
            out[f"test_acc_{s}"] = _mean_std(acc[s])
        acc_pooled = _pooled(acc["ours"], acc["peer"])
        acc_diff = out["test_acc_ours"][0] - out["test_acc_peer"][0]
        acc_tol = 2 * acc_pooled if math.isfinite(acc_pooled) else 0.0
        out.update(acc_diff=acc_diff, acc_tolerance=acc_tol)
        out["verdict_acc"] = verdict(acc_diff, acc_tol, higher_is_better=True)
    equal = {s: [] for s in SIDES}
    for r in results:
        seconds = min(r["train_s"][s] for s in SIDES)
        for s in SIDES:
            best = case.settings.select == "best"
            equal[s].append(_at_time(r["history"], s, seconds, "bpd", best_so_far=best))
    for s in SIDES:
        out[f"equal_time_bpd_{s}"] = _mean_std(equal[s])
    pooled_t = _pooled(equal["ours"], equal["peer"])
    diff_t = out["equal_time_bpd_ours"][0] - out["equal_time_bpd_peer"][0]
    out.update(equal_time_diff=diff_t, equal_time_tolerance=_tolerance(pooled_t))
    out["verdict_time"] = verdict(diff_t, out["equal_time_tolerance"])
    out["equal_time_s"] = statistics.fmean(min(r["train_s"][s] for s in SIDES) for r in results)
    for s in SIDES:
        out[f"s_per_step_{s}"] = statistics.fmean(r["s_per_step"][s] for r in results)
        drops = [_quarter_drops(r["history"], s) for r in results]
        out[f"flatter_{s}"] = all(last < first for first, last in drops)
        out[f"quarter_drops_{s}"] = [statistics.fmean(d) for d in zip(*drops, strict=True)]
    out["parameters"] = results[0]["parameters"]
    out["labels"] = results[0]["labels"]
    out["skipped_steps"] = {s: sum(r["skipped"][s] for r in results) for s in SIDES}
    out["test_nonfinite"] = {
        s: statistics.fmean(1 - r["test"][s].get("finite", 1.0) for r in results) for s in SIDES
    }
    return out


def _band(
    ax, histories: list[list[dict]], side: str, x_key: str, y_key: str, scale: float, label: str
) -> None:
    """Mean curve over seeds with a min–max band (seeds share their checkpoint steps)."""
    n = min(len(h) for h in histories)
    ys = np.array([[row[side][y_key] * scale for row in h[:n]] for h in histories])
    if x_key == "step":
        xs = np.array([row["step"] for row in histories[0][:n]], dtype=float)
    else:
        xs = np.array(
            [
                [0.0 if row["step"] == 0 else row[side]["train_s"] for row in h[:n]]
                for h in histories
            ]
        ).mean(0)
    ax.plot(xs, ys.mean(0), color=COLOURS[side], label=label, lw=1.6)
    if len(histories) > 1:
        ax.fill_between(xs, ys.min(0), ys.max(0), color=COLOURS[side], alpha=0.18, lw=0)


def _figure(
    pair: str,
    panels: list[tuple[ParityCase, list[list[dict]], float | None]],
    labels: Mapping[str, str],
    path: Path,
) -> None:
    """Validation curves of every setting of a pair against steps and training seconds."""
    rows = [
        (case, histories, true_bpd, y_key)
        for case, histories, true_bpd in panels
        for y_key in (("bpd", "accuracy") if case.task == "hybrid" else ("bpd",))
    ]
    fig = Figure(figsize=(10, 2.6 * len(rows) + 0.6), layout="constrained")
    axes = fig.subplots(len(rows), 2, squeeze=False)
    for i, (case, histories, true_bpd, y_key) in enumerate(rows):
        scale, name = (100, "val. accuracy %") if y_key == "accuracy" else (1, "val. bits/dim")
        for j, (x_key, x_label) in enumerate(
            (("step", "step"), ("time", "training seconds (each side's own)"))
        ):
            ax = axes[i][j]
            for side in SIDES:
                # the first checkpoint is the untrained model: leave it out of the y range
                _band(ax, [h[1:] for h in histories], side, x_key, y_key, scale, labels[side])
            if true_bpd is not None and y_key == "bpd":
                ax.axhline(true_bpd, color=COLOURS["true"], ls="--", lw=1, label="true density")
            ax.set_xlabel(x_label)
            ax.set_ylabel(f"{case.setting}\n{name}", fontsize=8)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{pair}: mean over seeds, band = min–max", fontsize=10)
    fig.savefig(path, dpi=80)


def _pm(stat: tuple[float, float], digits: int = 3) -> str:
    mean, std = stat
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if math.isfinite(std) else "")


def _misses(doc: Document, status: Sequence[tuple], summaries: Mapping[str, dict]) -> None:
    """Every "behind" verdict, with what its case's trace found (or that none was made)."""
    rows = []
    for case, _, _ in status:
        sm = summaries.get(case.key)
        if sm is None:
            continue
        behind = [
            name
            for name, key in (
                ("equal steps", "verdict_steps"),
                ("equal wall time", "verdict_time"),
                ("accuracy", "verdict_acc"),
            )
            if sm.get(key) == "behind"
        ]
        if behind:
            found = " ".join(case.findings) or "not traced yet."
            rows.append(f"**{case.key}** (behind at {', '.join(behind)}): {found}")
    if rows:
        doc.heading("Misses and their traces")
        doc.para(
            'Each verdict "behind" above, and what was found when it was traced (a miss is a '
            "finding: the trace either changed the library or measured why it stays)."
        )
        doc.bullets(rows)


def _cost(doc: Document, status: Sequence[tuple], all_results: Mapping[str, list]) -> None:
    """Training hours per case (both sides, all seeds) on this report's CPU."""
    rows, total, per_seed = [], 0.0, []
    for case, _, _ in status:
        done = all_results.get(case.key) or []
        if not done:
            continue
        hours = sum(r["train_s"][s] for r in done for s in SIDES) / 3600
        total += hours
        per_seed.append((hours / len(done), case.key))
        rows.append([case.pair, case.setting, str(len(done)), f"{hours:.2f}",
                     f"{hours / len(done):.2f}"])  # fmt: skip
    if not rows:
        return
    dearest = max(per_seed)
    fits = "fits in" if total <= BUDGET_HOURS else "does not fit in"
    doc.heading("Cost")
    doc.para(
        f"Training time of the finished runs, both sides, on the CPU above: {total:.2f} h in "
        "all (checkpoint evaluations not included; runs that shared their cores with other work "
        f"count their slower seconds), so the report {fits} the {BUDGET_HOURS} h budget of 2 "
        f"cores here. The dearest seed: {dearest[0]:.2f} h ({dearest[1]}). Runs resume from their "
        "run folders; `--only` and `--seeds` select pairs and seeds."
    )
    doc.table(Table(["pair", "data", "seeds", "hours, both sides", "hours per seed"], rows))


def write_parity_report(
    cases: Sequence[ParityCase],
    runs: Path,
    out: Path,
    *,
    command: str,
    skipped: Mapping[str, str] | None = None,
) -> Path:
    """Write ``out/report.md``, ``report.html``, ``results.json`` and figures; the md path."""
    commit = git_commit()  # before writing into a tracked folder (it would mark it dirty)
    out.mkdir(parents=True, exist_ok=True)
    skipped = dict(skipped or {})
    summaries, status, all_results = {}, [], {}
    for case in cases:
        done, partial = _runs(case, runs)
        all_results[case.key] = done
        if done:
            summaries[case.key] = summarise(case, done)
        status.append((case, len(done), partial))
    doc = Document(out)
    doc.heading("Parity with the reference implementations", 1)
    doc.para(
        "Each pair trains our model and the original code's at equal architecture and "
        "parameter count (within 5%) in one loop: the same batches in the same order, the "
        "same dequantization noise, Adam, warmup + cosine schedule, gradient clipping and EMA "
        "for both, alternating which side steps first. Each side is scored by its own "
        "`log_prob` with every Jacobian (dequantization, logit), on the same validation "
        "examples and noise at every checkpoint and on the test split at the end. Verdicts: "
        f"ours − peer in test bits/dim against max(2 × pooled seed std, {BPD_FLOOR}); at "
        "equal wall time the validation curves are compared at the time the faster side "
        "finished."
    )
    wall = sum(r["train_s"][s] for rs in all_results.values() for r in rs for s in SIDES)
    doc.heading("Provenance")
    doc.bullets(
        [
            f"command: `{command}`",
            f"commit: `{commit}`",
            f"CPU: {cpu_model()}; training time of the finished runs, both sides: "
            f"{wall / 3600:.2f} h",
            "versions: " + ", ".join(f"{k} {v}" for k, v in package_versions().items()),
            "peers: "
            + "; ".join(sorted({r["labels"]["peer"] for rs in all_results.values() for r in rs})),
        ]
    )
    doc.heading("Summary")
    doc.para(
        "At equal steps: test bits/dim of the EMA weights after the last step (image pairs) or "
        "at each side's best validation checkpoint (vector pairs: early stopping, as the MAF "
        "and NAF papers select), mean ± std over seeds; ours − peer; the tolerance "
        "max(2 × pooled std, 0.005). The median over test examples (mean over seeds) shows whether "
        "a mean is carried by a few examples; its verdict applies the same rule to the per-seed "
        "medians."
    )
    steps_table = Table(
        [
            "pair",
            "data",
            "seeds",
            "params ours / peer",
            "test bits/dim ours",
            "peer",
            "ours − peer",
            "tolerance",
            "verdict",
            "median ours / peer",
        ],
        [],
    )
    time_table = Table(
        [
            "pair",
            "data",
            "s/step ours / peer",
            "equal time s",
            "val bits/dim ours",
            "peer",
            "ours − peer",
            "tolerance",
            "verdict",
        ],
        [],
    )
    for case, n_done, partial in status:
        sm = summaries.get(case.key)
        if sm is None:
            why = skipped.get(case.key) or (
                f"in progress: seed {partial[0]['seed']} at step {partial[0]['step']}"
                if partial
                else "not run"
            )
            steps_table.rows.append([case.pair, case.setting, "0", why, *[""] * 6])
            continue
        p = sm["parameters"]
        steps_table.rows.append(
            [
                case.pair,
                case.setting,
                str(n_done),
                f"{p['ours']:,} / {p['peer']:,}",
                _pm(sm["test_bpd_ours"]),
                _pm(sm["test_bpd_peer"]),
                f"{sm['test_diff']:+.3f}",
                f"{sm['test_tolerance']:.3f}",
                sm["verdict_steps"],
                "n/a"  # runs scored before the median was recorded
                if "verdict_median" not in sm
                else f"{sm['test_median_ours']:.3f} / {sm['test_median_peer']:.3f}: "
                f"{sm['verdict_median']}",
            ]
        )
        time_table.rows.append(
            [
                case.pair,
                case.setting,
                f"{sm['s_per_step_ours']:.3f} / {sm['s_per_step_peer']:.3f}",
                f"{sm['equal_time_s']:.0f}",
                _pm(sm["equal_time_bpd_ours"]),
                _pm(sm["equal_time_bpd_peer"]),
                f"{sm['equal_time_diff']:+.3f}",
                f"{sm['equal_time_tolerance']:.3f}",
                sm["verdict_time"],
            ]
        )
    doc.table(steps_table)
    doc.para(
        "At equal wall time: validation bits/dim of each side at the training seconds the "
        "faster side needed for all its steps (each seed's own time; curves interpolated; the "
        "best value reached by then for the vector pairs, which select by validation). "
        "Seconds per step are each side's own, measured in turns in one process."
    )
    doc.table(time_table)
    hybrids = [
        (c, summaries[c.key]) for c, _, _ in status if c.task == "hybrid" and c.key in summaries
    ]
    if hybrids:
        doc.para("Hybrid pairs (λ = 1/D), test accuracy:")
        doc.table(
            Table(
                [
                    "pair",
                    "data",
                    "accuracy % ours",
                    "peer",
                    "ours − peer",
                    "2 × pooled std",
                    "verdict",
                ],
                [
                    [
                        c.pair,
                        c.setting,
                        _pm(sm["test_acc_ours"], 2),
                        _pm(sm["test_acc_peer"], 2),
                        f"{sm['acc_diff']:+.2f}",
                        f"{sm['acc_tolerance']:.2f}",
                        sm["verdict_acc"],
                    ]
                    for c, sm in hybrids
                ],
            )
        )
    bounds = [
        (c, summaries[c.key]) for c, _, _ in status if "iw_bpd_ours" in summaries.get(c.key, {})
    ]
    if bounds:
        doc.para(
            "Importance-weighted bound (Flow++ eq. 13), test bits/dim of the same weights on the "
            "first test examples, the same noise draws on both sides; beside it the one-sample "
            "bound averaged over those draws (what the mean above estimates). Bounds are "
            "comparable across dequantizations at equal S."
        )
        doc.table(
            Table(
                [
                    "pair",
                    "data",
                    "S × examples",
                    "one-sample ours / peer",
                    "IW bound ours",
                    "peer",
                    "ours − peer",
                ],
                [
                    [
                        c.pair,
                        c.setting,
                        f"{sm['iw_samples']} × {sm['iw_examples']}",
                        f"{sm['iw_single_ours']:.3f} / {sm['iw_single_peer']:.3f}",
                        _pm(sm["iw_bpd_ours"]),
                        _pm(sm["iw_bpd_peer"]),
                        f"{sm['iw_bpd_ours'][0] - sm['iw_bpd_peer'][0]:+.3f}",
                    ]
                    for c, sm in bounds
                ],
            )
        )
    truths = [
        (c, summaries[c.key])
        for c, _, _ in status
        if c.key in summaries and "true_bpd" in summaries[c.key]
    ]
    if truths:
        doc.para("2-D toys, test bits/dim against the true density's (the floor both approach):")
        doc.table(
            Table(
                ["pair", "data", "true", "ours", "peer", "ours − true", "peer − true"],
                [
                    [
                        c.pair,
                        c.setting,
                        f"{sm['true_bpd']:.3f}",
                        _pm(sm["test_bpd_ours"]),
                        _pm(sm["test_bpd_peer"]),
                        f"{sm['test_bpd_ours'][0] - sm['true_bpd']:+.3f}",
                        f"{sm['test_bpd_peer'][0] - sm['true_bpd']:+.3f}",
                    ]
                    for c, sm in truths
                ],
            )
        )
    if (out / "train_img" / "report.md").exists():
        doc.para(
            "Recipe-level parity (the Residual Flows reference's own train_img.py against "
            "hybridflow train, hybrid λ = 1/D on Fashion-MNIST): train_img/report.md, written "
            "by recipes/parity_train_img.py."
        )
    _misses(doc, status, summaries)
    _cost(doc, status, all_results)
    doc.heading("Pairs")
    by_pair: dict[str, list[tuple[ParityCase, int, list]]] = {}
    for item in status:
        by_pair.setdefault(item[0].pair, []).append(item)
    for pair, items in by_pair.items():
        doc.heading(pair, 3)
        labels = next((summaries[c.key]["labels"] for c, _, _ in items if c.key in summaries), None)
        if labels:
            doc.para(f"Ours: {labels['ours']}. Peer: {labels['peer']}.")
        doc.para("What still differs between the two sides:")
        doc.bullets(list(items[0][0].differences))
        s = items[0][0].settings
        doc.para(
            f"Training (both sides): {s.steps} steps, batch {s.batch}, Adam lr {s.lr:g} betas "
            f"{s.betas}, {s.warmup_steps} warmup steps then cosine to {s.min_lr:g}, gradient "
            f"norm clipped at {s.grad_clip:g}, EMA {s.ema_decay} scored; {s.evals} checkpoints "
            f"on {s.val_size} validation examples, test on "
            f"{'the whole test split' if s.test_size is None else f'{s.test_size} test examples'}"
            f" with the weights {SELECTED[s.select]}."
        )
        panels = []
        for case, _, partial in items:
            done = all_results[case.key]
            histories = [r["history"] for r in done] or [
                p["history"] for p in partial if len(p["history"]) > 2
            ]
            if histories:
                panels.append((case, histories, summaries.get(case.key, {}).get("true_bpd")))
            sm = summaries.get(case.key)
            if sm:
                doc.para(
                    f"{case.setting}: validation bits/dim gained over the first / last quarter "
                    f"of the steps: ours {sm['quarter_drops_ours'][0]:.3f} / "
                    f"{sm['quarter_drops_ours'][1]:.3f}, peer {sm['quarter_drops_peer'][0]:.3f} "
                    f"/ {sm['quarter_drops_peer'][1]:.3f} (last quarter flatter on every seed: "
                    f"ours {'yes' if sm['flatter_ours'] else 'no'}, peer "
                    f"{'yes' if sm['flatter_peer'] else 'no'}); equal time = "
                    f"{sm['equal_time_s']:.0f} training seconds; non-finite steps skipped: "
                    f"ours {sm['skipped_steps']['ours']}, peer {sm['skipped_steps']['peer']}."
                    + "".join(
                        f" {'Ours' if side == 'ours' else 'The peer'} gave "
                        f"{100 * share:.2g}% of the test examples a non-finite log-likelihood "
                        "(left out of its mean)."
                        for side, share in sm["test_nonfinite"].items()
                        if share > 0
                    )
                )
        if panels:
            file = items[0][0].folder_name.split("__")[0] + ".png"
            _figure(pair, panels, labels or {"ours": "ours", "peer": "peer"}, out / file)
            partial_note = (
                ""
                if all(c.key in summaries for c, _, _ in items)
                else (" (runs still in progress drawn from their last checkpoint)")
            )
            doc.figure(file, f"{pair}: validation curves{partial_note}")
    (out / "results.json").write_text(
        json.dumps(
            {
                "command": command,
                "commit": commit,
                "cpu": cpu_model(),
                "summaries": summaries,
                "runs": all_results,
                "skipped": skipped,
            },
            indent=1,
        )
    )
    doc.write("Parity with the reference implementations")
    return out / "report.md"
