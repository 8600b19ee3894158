"""Variational inference with flows: the NAF paper's Figure 5 and Figure 7 (Huang et al. 2018).

Figure 5: a flow ``q`` fitted to an unnormalized 2-D target by the reverse KL (IAF-style:
reparameterized draws, `fit_target`), affine IAF against IAF-DSF at about the same number of
parameters, on three targets with known normalizers (hybridflow.data.energies): eight separated
Gaussians, the two-mode ring (Rezende & Mohamed 2015, U1) and a banana. The paper's claim: an
affine IAF cannot turn a unimodal base into a multimodal target; a DSF can. Reported per target
and flow over 3 seeds: the reverse KL(q‖p) = log Z − ELBO, the effective sample size of the
self-normalized importance weights, and the modes holding at least a quarter of a fair share.

Figure 7: MAF-style (maximum likelihood on samples of p, `fit_density`, the DSF in the density
direction) against IAF-style (reverse KL, the DSF in the sampling direction) on the eight
Gaussians, same transformer and size: forward KL(p‖q) and reverse KL(q‖p) against steps.

Writes reports/naf_vi/ (report.md, results.json, fig5.png, fig7.png, and jobs/: one result per
fit, the figure's panels as 8-bit images, reused by a rerun with the same settings, so the recipe
resumes over sittings when jobs/ is committed). `--smoke` runs 40 steps of
everything on one seed with small samples (a check that the recipe runs, not a result);
`--out=DIR` writes DIR/reports/..., `--seeds=N`, `--threads=N`.
"""

import base64
import json
import statistics
import sys
import time
import zlib
from collections import Counter
from pathlib import Path

import torch
from matplotlib.figure import Figure

from hybridflow.data import load_target
from hybridflow.experiments import JobStore
from hybridflow.models import VariationalFlow, iaf_flow
from hybridflow.reports import cpu_description, git_commit, package_versions
from hybridflow.training import fit_density, fit_target, target_diagnostics
from hybridflow.transforms import InvertibleSequential, NeuralAutoregressiveFlow, Permutation

NAME = "naf_vi"
TARGETS = ["mixture8", "ring", "banana"]
FLOWS = {  # about 18-21 k parameters each
    "affine IAF": {"num_flows": 4, "transformer": "affine", "hidden_features": (64, 64)},
    "IAF-DSF": {"num_flows": 2, "transformer": "dsf", "hidden_features": (64, 64), "num_units": 16},
}
FIT = {"steps": 5000, "batch_size": 256, "lr": 3e-3, "anneal_steps": 1000, "eval_every": 500}
FIT |= {"eval_samples": 10_000}
FLOW_SHORT = {"affine IAF": "affine", "IAF-DSF": "dsf"}
FINAL_SAMPLES, GRID, HALF_WIDTH = 50_000, 200, {"mixture8": 6.5, "ring": 4.0, "banana": 6.0}
FIG7 = {"steps": 5000, "eval_every": 250, "train_points": 50_000, "val_points": 10_000}
# Figure 7 trains both styles with the same optimisation (fit_density's defaults: lr 1e-3,
# warmup 100, cosine to 1e-5, clip 10, EMA 0.999, batch 256) and no annealing of the target.
FIG7_OPT = {"lr": 1e-3, "batch_size": 256}

args = dict(a.split("=", 1) if "=" in a else (a, "") for a in sys.argv[1:])
if unknown := set(args) - {"--smoke", "--out", "--seeds", "--threads"}:
    sys.exit(f"unknown option(s) {sorted(unknown)}; use --smoke, --out=DIR, --seeds=N, --threads=N")
smoke = "--smoke" in args
seeds = list(range(int(args.get("--seeds", 1 if smoke else 3))))
torch.set_num_threads(int(args.get("--threads", 1 if smoke else 2)))
if smoke:
    FIT |= {"steps": 40, "anneal_steps": 10, "eval_every": 20, "eval_samples": 500}
    FINAL_SAMPLES, GRID = 500, 30
    FIG7 = {"steps": 40, "eval_every": 20, "train_points": 2000, "val_points": 500}
    FIG7_OPT = {"lr": 1e-3, "batch_size": 64}
out_dir = Path(args.get("--out", ".")) / "reports" / (f"{NAME}-smoke" if smoke else NAME)
out_dir.mkdir(parents=True, exist_ok=True)
commit, started = git_commit(), time.time()
cpu, store = cpu_description(), JobStore(out_dir / "jobs")  # one result per fit: resumes


def density_grid(log_density, half_width):
    axis = torch.linspace(-half_width, half_width, GRID)
    points = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), dim=-1).reshape(-1, 2)
    with torch.no_grad():
        return torch.cat([log_density(p) for p in points.split(4096)]).exp().reshape(GRID, GRID)


def pack_grid(grid):
    """A density grid as the 8-bit image the figure draws (viridis has 256 colours and each
    panel is scaled to its own range), zlib-compressed for a job file."""
    low, high = float(grid.min()), float(grid.max())
    scaled = ((grid - low) / max(high - low, 1e-300) * 255).round().to(torch.uint8)
    data = base64.b64encode(zlib.compress(scaled.numpy().tobytes(), 9)).decode()
    return {"shape": list(grid.shape), "low": low, "high": high, "uint8_zlib_base64": data}


def unpack_grid(packed):
    raw = zlib.decompress(base64.b64decode(packed["uint8_zlib_base64"]))
    scaled = torch.frombuffer(bytearray(raw), dtype=torch.uint8).reshape(packed["shape"])
    return packed["low"] + scaled.double() / 255 * (packed["high"] - packed["low"])


# ---- Figure 5: reverse KL, affine IAF vs IAF-DSF ----
rows, grids = [], {}
for target_name in TARGETS:
    target = load_target(target_name)
    grids[(target_name, "target")] = unpack_grid(pack_grid(density_grid(
        lambda x, t=target: t.log_prob(x) - t.log_normalizer, HALF_WIDTH[target_name]
    )))  # fmt: skip
    for flow_name, flow_kw in FLOWS.items():
        for seed in seeds:
            name = f"fig5-{target_name}-{FLOW_SHORT[flow_name]}-s{seed}"
            settings = {"target": target_name, "flow": flow_kw, "seed": seed, "fit": FIT}
            settings |= {"final_samples": FINAL_SAMPLES, "grid": GRID}
            settings["half_width"] = HALF_WIDTH[target_name]
            if (row := store.load(name, settings)) is None:
                torch.manual_seed(seed)
                q = iaf_flow(2, seed=seed, **flow_kw)
                t0 = time.time()
                fit = fit_target(q, target, seed=seed, **FIT)
                diag = target_diagnostics(
                    fit.model, target, FINAL_SAMPLES, generator=torch.Generator().manual_seed(99)
                )
                row = {
                    "target": target_name,
                    "flow": flow_name,
                    "seed": seed,
                    "parameters": sum(p.numel() for p in q.parameters()),
                    "train_s": time.time() - t0,
                    "best_step": fit.best_step,
                    **diag,
                }
                if seed == 0:  # the figure's panel, kept as the 8-bit image it is drawn as
                    row["grid"] = pack_grid(
                        density_grid(fit.model.log_prob, HALF_WIDTH[target_name])
                    )
                store.save(name, settings, row)
                row["cpu"] = cpu
            if "grid" in row:
                grids[(target_name, flow_name)] = unpack_grid(row.pop("grid"))
            rows.append(row)
            print(
                f"{target_name} {flow_name} seed {seed}: KL {row['kl_reverse']:.3f}, "
                f"ESS {row['ess']:.3f}, modes {row['modes_covered']}/{row['modes']}",
                flush=True,
            )


def summary(target_name, flow_name, key):
    values = [r[key] for r in rows if r["target"] == target_name and r["flow"] == flow_name]
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), std


fig = Figure(figsize=(9.6, 3.2 * len(TARGETS)), layout="constrained")
columns = ["target", *FLOWS]
for i, target_name in enumerate(TARGETS):
    for j, column in enumerate(columns):
        ax = fig.add_subplot(len(TARGETS), len(columns), i * len(columns) + j + 1)
        w = HALF_WIDTH[target_name]
        ax.imshow(
            grids[(target_name, column)], origin="lower", extent=(-w, w, -w, w), cmap="viridis"
        )
        ax.set_xticks([]), ax.set_yticks([])
        if column == "target":
            ax.set_title(f"{target_name}: p", fontsize=10)
        else:
            kl, kl_sd = summary(target_name, column, "kl_reverse")
            ess, _ = summary(target_name, column, "ess")
            ax.set_title(f"{column}: KL {kl:.3f} ± {kl_sd:.3f}, ESS {ess:.2f}", fontsize=9)
fig.savefig(out_dir / "fig5.png", dpi=80)

# ---- Figure 7: MAF-style (forward KL) vs IAF-style (reverse KL) training ----
target = load_target("mixture8")
curves = {"MAF-style (max. likelihood)": {}, "IAF-style (reverse KL)": {}}  # style -> seed


def dsf_stack(seed):
    layers = []
    for i in range(2):
        if i:
            layers.append(Permutation.reversed(2))
        layers.append(
            NeuralAutoregressiveFlow(2, "dsf", 16, hidden_features=(64, 64), seed=seed + i)
        )
    return InvertibleSequential(layers)


MAF, IAF = "MAF-style (max. likelihood)", "IAF-style (reverse KL)"
fig7_runs = []
for seed in seeds:
    settings = {"seed": seed, "fig7": FIG7, "opt": FIG7_OPT, "flow": FLOWS["IAF-DSF"]}
    settings["eval_samples"] = FIT["eval_samples"]
    settings["columns"] = ["step", "forward KL", "reverse KL", "reverse KL trimmed"]
    if (run := store.load(f"fig7-s{seed}", settings)) is None:
        run = {"seed": seed, MAF: [], IAF: []}
        t0 = time.time()
        gen = torch.Generator().manual_seed(1000 + seed)
        train_p, val_p = (
            target.sample(FIG7["train_points"], gen),
            target.sample(FIG7["val_points"], gen),
        )
        entropy_term = float((target.log_prob(val_p) - target.log_normalizer).mean())  # E_p log p

        @torch.no_grad()
        def record(style, step, q, val_p=val_p, entropy_term=entropy_term, run=run):
            forward = entropy_term - float(q.log_prob(val_p).mean())
            diag = target_diagnostics(
                q, target, FIT["eval_samples"], generator=torch.Generator().manual_seed(7)
            )
            run[style].append((step, forward, diag["kl_reverse"], diag["kl_reverse_trimmed"]))

        torch.manual_seed(seed)
        maf = VariationalFlow(dsf_stack(seed), 2)  # the DSF in the density direction: MAF-style
        fit_density(
            maf,
            train_p,
            val_p,
            steps=FIG7["steps"],
            eval_every=FIG7["eval_every"],
            **FIG7_OPT,
            seed=seed,
            callback=lambda s, m: record(MAF, s, m),
        )
        torch.manual_seed(seed)
        iaf = iaf_flow(2, **FLOWS["IAF-DSF"], seed=seed)
        fit_target(
            iaf,
            target,
            steps=FIG7["steps"],
            eval_every=FIG7["eval_every"],
            eval_samples=FIT["eval_samples"],
            **FIG7_OPT,
            seed=seed,
            callback=lambda s, m: record(IAF, s, m),
        )
        run["train_s"] = time.time() - t0
        store.save(f"fig7-s{seed}", settings, run)
        run["cpu"] = cpu
    fig7_runs.append(run)
    for style in curves:
        curves[style][seed] = [tuple(point) for point in run[style]]

fig = Figure(figsize=(14, 3.6), layout="constrained")
panels = ("forward KL(p‖q)", "reverse KL(q‖p)", "reverse KL, worst 0.1% of draws left out")
for column, label in enumerate(panels, start=1):  # column of each (step, ...) point
    ax = fig.add_subplot(1, 3, column)
    for style, per_seed in curves.items():
        for seed, points in per_seed.items():
            ax.plot(
                [p[0] for p in points],
                [p[column] for p in points],
                color="C0" if style.startswith("MAF") else "C1",
                label=style if seed == 0 else None,
                lw=1.2,
            )
    ax.set_yscale("symlog", linthresh=0.01)  # Monte Carlo estimates near 0 may be negative
    ax.set(xlabel="step", ylabel="nats", title=label)
    ax.legend(fontsize=8)
fig.savefig(out_dir / "fig7.png", dpi=90)
finals = {style: [pts[-1] for pts in per_seed.values()] for style, per_seed in curves.items()}

# ---- report ----
wall = time.time() - started
results = {
    "commit": commit,
    "versions": package_versions(),
    "threads": torch.get_num_threads(),
    "wall_s": wall,
    "fit": FIT,
    "flows": FLOWS,
    "figure5": rows,
    "figure7": {s: {str(k): v for k, v in c.items()} for s, c in curves.items()},
    "figure7_fits": [{k: r[k] for k in ("seed", "train_s", "cpu")} for r in fig7_runs],
}
(out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
lines = [
    "# Variational inference with flows (NAF paper, Figures 5 and 7)"
    + (" — SMOKE RUN" if smoke else ""),
    "",
    f"- Regenerate: `python recipes/naf_vi.py`; commit `{commit}`; threads: "
    f"{torch.get_num_threads()}; wall time of this invocation {wall / 60:.1f} minutes; "
    f"seeds {seeds}.",
    f"- Compute of all {len(rows) + len(fig7_runs)} fits, summed: "
    f"{sum(r['train_s'] for r in rows + fig7_runs) / 60:.1f} minutes; CPUs: "
    + "; ".join(f"{c} ({n} fits)" for c, n in Counter(r["cpu"] for r in rows + fig7_runs).items())
    + " (finished fits are reused from jobs/).",
    f"- Fit: {FIT}; flows: {FLOWS}; final diagnostics from {FINAL_SAMPLES:,} draws.",
    "",
    "## Figure 5: affine IAF vs IAF-DSF fitted by the reverse KL",
    "",
    "Mean ± std over seeds. KL(q‖p) = log Z − ELBO with the target's known log Z; ESS of the "
    "self-normalized importance weights (1: q = p); modes holding ≥ 1/(4K) of the draws.",
    "",
    "| target | flow | params | KL(q‖p) nats | ESS | modes covered | IW bound − log Z |",
    "|---|---|---|---|---|---|---|",
]
for target_name in TARGETS:
    for flow_name in FLOWS:
        picked = [r for r in rows if r["target"] == target_name and r["flow"] == flow_name]
        kl, kl_sd = summary(target_name, flow_name, "kl_reverse")
        ess, ess_sd = summary(target_name, flow_name, "ess")
        gap = statistics.fmean(r["iw_bound"] - r["log_normalizer"] for r in picked)
        modes = ", ".join(f"{r['modes_covered']}/{r['modes']}" for r in picked)
        lines.append(
            f"| {target_name} | {flow_name} | {picked[0]['parameters']:,} | "
            f"{kl:.3f} ± {kl_sd:.3f} | {ess:.3f} ± {ess_sd:.3f} | {modes} | {gap:+.4f} |"
        )
verdicts = []
for target_name in ("mixture8", "ring"):
    a, a_sd = summary(target_name, "affine IAF", "kl_reverse")
    d, d_sd = summary(target_name, "IAF-DSF", "kl_reverse")
    holds = d + 2 * d_sd < a - 2 * a_sd
    verdicts.append(
        f"{target_name}: IAF-DSF {d:.3f} vs affine {a:.3f} nats — "
        + ("holds" if holds else "does not hold (within 2 std or reversed)")
    )
lines += [
    "",
    "The paper's claim (multimodal targets: the DSF fits, the affine IAF does not): "
    + "; ".join(verdicts)
    + ".",
    "",
    "![Figure 5](fig5.png)",
    "",
    "## Figure 7: MAF-style vs IAF-style training on the eight Gaussians",
    "",
    "The same DSF (2 layers, 16 units, MADE 64-64) and the same optimisation "
    f"({FIG7_OPT}, warmup 100, cosine schedule, no annealing) trained by maximum likelihood on "
    f"{FIG7['train_points']:,} samples of p (density direction) and by the reverse KL "
    "(sampling direction). Both KLs are estimated at every evaluation: forward KL(p‖q) on "
    f"{FIG7['val_points']:,} held-out samples of p, reverse KL(q‖p) from "
    f"{FIT['eval_samples']:,} draws of q (the same draws at every evaluation), and beside it "
    "the reverse KL without the 0.1% of draws with the lowest log p − log q. Final values, nats:",
    "",
    "| training | seed | forward KL(p‖q) | reverse KL(q‖p) | reverse KL, worst 0.1% left out |",
    "|---|---|---|---|---|",
]
for style, values in finals.items():
    for seed, (_, f, r, r_trim) in zip(seeds, values, strict=True):
        lines.append(f"| {style} | {seed} | {f:.3f} | {r:.3f} | {r_trim:.3f} |")


def median_final(style, column):
    return statistics.median(v[column] for v in finals[style])


dsf_fig5 = summary("mixture8", "IAF-DSF", "kl_reverse")[0]
findings = []
for column, what in ((1, "forward KL(p‖q)"), (2, "reverse KL(q‖p)"), (3, "trimmed reverse KL")):
    m, i = median_final(MAF, column), median_final(IAF, column)
    better = "MAF-style" if m < i else "IAF-style"
    findings.append(
        f"- {what}: median over seeds MAF-style {m:.3f}, IAF-style {i:.3f} nats; {better} is lower."
    )
tails = [(r, t) for _, _, r, t in finals[MAF] if r > 2 * t + 0.05]
if tails:
    findings.append(
        f"- MAF-style: in {len(tails)} of {len(seeds)} seeds the reverse KL "
        f"({', '.join(f'{r:.3f}' for r, _ in tails)}) falls to "
        f"{', '.join(f'{t:.3f}' for _, t in tails)} without its worst 0.1% of draws. Maximum "
        "likelihood covers every mode but leaves q with tails heavier than p's Gaussian ones: "
        "forward KL barely sees them, reverse KL weighs each draw there by its log-ratio, "
        "which grows with the squared distance under p. The estimate is real but rests on a "
        "handful of draws, hence its jumps between evaluations."
    )
findings.append(
    f"- IAF-style here reaches {median_final(IAF, 2):.3f} nats against {dsf_fig5:.3f} for the "
    f"same DSF in Figure 5, which anneals the target over its first {FIT['anneal_steps']:,} "
    f"steps and uses lr {FIT['lr']} (here {FIG7_OPT['lr']}, no annealing); this recipe does not "
    "separate the two."
)
lines += ["", "What it shows:", "", *findings, "", "![Figure 7](fig7.png)", ""]
(out_dir / "report.md").write_text("\n".join(lines))
print(f"report: {out_dir / 'report.md'} ({wall / 60:.1f} min)")
