"""Command line: ``hybridflow train | eval | sweep | ood | calibrate | sample | explain | list |
pretrained | vae``.

Every training option is a ``--key=value`` override of ``hybridflow.training.DEFAULTS``
(nested keys with dots: ``--backbone_args.hidden_channels=32``); ``--config FILE`` (JSON or YAML)
loads a base config first. The resolved config is saved as ``config.json`` in the run folder.

Each command imports what it runs inside its function: ``hybridflow --help`` and a mistyped
command answer without importing torch (seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]


def resolve_run_dir(spec: str) -> Path:
    """A run folder argument: a path, or ``pretrained:NAME`` (see ``hybridflow pretrained``)."""
    from .pretrained import resolve_run_dir as resolve

    return resolve(spec)


def _split_known(argv: Sequence[str], flags: set[str]) -> tuple[list[str], list[str]]:
    """Separate the subcommand's own flags from ``--key=value`` config overrides."""
    own, overrides = [], []
    for arg in argv:
        key = arg.split("=", 1)[0]
        (own if key in flags or not arg.startswith("--") else overrides).append(arg)
    return own, overrides


def _base_config(path: str | None) -> dict:
    from .runs import read_config_file

    return read_config_file(path) if path else {}


def _cmd_train(argv: Sequence[str]) -> int:
    from .runs import parse_overrides
    from .training import train

    parser = argparse.ArgumentParser(
        prog="hybridflow train",
        description="Train a hybrid model. Data-parallel: torchrun --standalone "
        "--nproc_per_node=N -m hybridflow train ... (the same options; batch_size is global).",
    )
    parser.add_argument("--config", help="base config file, JSON or YAML (.yaml/.yml)")
    own, rest = _split_known(argv, {"--config"})
    args = parser.parse_args(own)
    run_dir = train(_base_config(args.config), **parse_overrides(rest))
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one line for the whole run
        print(run_dir)
    return 0


_OOD_HELP = "OOD dataset (repeatable), e.g. mnist, npz:PATH, fashion-mnist@test"


def _json(result: dict, run_dir: Path) -> str:
    return json.dumps(result, indent=2)


def _run_folder_verb(
    argv: Sequence[str],
    verb: str,
    description: str,
    options: Callable[[argparse.ArgumentParser], None],
    run: Callable[[Path, argparse.Namespace], dict],
    show: Callable[[dict, Path], str] = _json,
) -> int:
    """A verb on one run folder: ``RUN_DIR`` (or ``pretrained:NAME``), ``--data-root``,
    ``--device`` and the verb's own ``options``; prints ``show(result, run_dir)``."""
    parser = argparse.ArgumentParser(prog=f"hybridflow {verb}", description=description)
    parser.add_argument("run_dir", help="run folder, or pretrained:NAME")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--device", default="cpu")
    options(parser)
    args = parser.parse_args(argv)
    run_dir = resolve_run_dir(args.run_dir)
    print(show(run(run_dir, args), run_dir))
    return 0


def _cmd_eval(argv: Sequence[str]) -> int:
    from .reports import evaluate_run

    def options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--split", default="test")
        parser.add_argument("--ood", action="append", default=[], help=_OOD_HELP)
        parser.add_argument("--dequant-samples", type=int, default=1)
        parser.add_argument(
            "--iw-samples",
            type=int,
            default=0,
            help="importance-weighted bits/dim bound over this many draws (Flow++ uses 4096)",
        )

    def run(run_dir: Path, args: argparse.Namespace) -> dict:
        return evaluate_run(
            run_dir,
            args.split,
            ood=args.ood,
            dequant_samples=args.dequant_samples,
            iw_samples=args.iw_samples,
            data_root=args.data_root,
            device=args.device,
        )

    return _run_folder_verb(argv, "eval", "Evaluate a run folder.", options, run)


def _cmd_ood(argv: Sequence[str]) -> int:
    from .reports import HYBRID_COMPONENTS, format_ood_table, ood_run

    def options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--ood", action="append", required=True, help=_OOD_HELP)
        parser.add_argument(
            "--background",
            default=None,
            help="run folder of a background model (--perturb_rate) for the likelihood ratio",
        )
        parser.add_argument("--dequant-samples", type=int, default=1)
        parser.add_argument("--iw-samples", type=int, default=0)
        parser.add_argument("--typicality-batch", type=int, default=10, help="M of the batch test")
        parser.add_argument("--alpha", type=float, default=0.99, help="typicality quantile")
        parser.add_argument("--fit-examples", type=int, default=10_000)
        parser.add_argument(
            "--hybrid-components",
            default=",".join(HYBRID_COMPONENTS),
            help="comma-separated scores combined by the hybrid score",
        )

    def run(run_dir: Path, args: argparse.Namespace) -> dict:
        return ood_run(
            run_dir,
            args.ood,
            background=resolve_run_dir(args.background) if args.background else None,
            dequant_samples=args.dequant_samples,
            iw_samples=args.iw_samples,
            typicality_batch=args.typicality_batch,
            alpha=args.alpha,
            fit_examples=args.fit_examples,
            hybrid_components=args.hybrid_components.split(","),
            data_root=args.data_root,
            device=args.device,
        )

    description = "Every OOD score × metric (higher score = more OOD); writes RUN_DIR/ood/."
    return _run_folder_verb(
        argv, "ood", description, options, run, lambda result, _: format_ood_table(result)
    )


def _cmd_calibrate(argv: Sequence[str]) -> int:
    from .reports import calibrate_run

    def options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--bins", type=int, default=15)

    def run(run_dir: Path, args: argparse.Namespace) -> dict:
        return calibrate_run(
            run_dir, n_bins=args.bins, data_root=args.data_root, device=args.device
        )

    description = (
        "Temperature scaling on val; ECE, adaptive ECE, MCE, classwise ECE, Brier, NLL before "
        "and after; reliability diagram. Writes RUN_DIR/calibration/."
    )
    return _run_folder_verb(argv, "calibrate", description, options, run)


def _cmd_sample(argv: Sequence[str]) -> int:
    from .reports import sample_run

    def options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--temperatures", default="0.5,0.7,0.85,1.0")
        parser.add_argument("-n", type=int, default=64, help="samples per temperature")
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument(
            "--fid", action="store_true", help="Fréchet distance of samples to the test split"
        )
        parser.add_argument("--fid-samples", type=int, default=2000, help="samples per temperature")
        parser.add_argument(
            "--fid-features",
            default="classifier",
            choices=["classifier", "inception"],
            help="shipped per-dataset CNN (offline) or Inception-v3 (needs --fid-weights)",
        )
        parser.add_argument("--fid-weights", help="torchvision inception_v3 state_dict file")

    def run(run_dir: Path, args: argparse.Namespace) -> dict:
        temperatures = [float(t) for t in args.temperatures.split(",")]
        return sample_run(
            run_dir,
            temperatures,
            args.n,
            seed=args.seed,
            data_root=args.data_root,
            device=args.device,
            fid_samples=args.fid_samples if args.fid else 0,
            fid_features=args.fid_features,
            fid_weights=args.fid_weights,
        )

    description = (
        "Sample grids at several temperatures and reconstructions; writes RUN_DIR/samples/."
    )
    return _run_folder_verb(argv, "sample", description, options, run)


def _cmd_explain(argv: Sequence[str]) -> int:
    from .reports import explain_run

    def options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--ood", action="append", default=[])
        parser.add_argument("-n", type=int, default=6, help="images per set")
        parser.add_argument("--targets", default="logit,log_prob,energy")
        parser.add_argument("--methods", default="integrated_gradients,saliency,noise_tunnel")
        parser.add_argument("--baseline", default="blur", choices=["blur", "mean"])
        parser.add_argument("--steps", type=int, default=32, help="integration steps")

    def run(run_dir: Path, args: argparse.Namespace) -> dict:
        return explain_run(
            run_dir,
            args.ood,
            n=args.n,
            targets=args.targets.split(","),
            methods=args.methods.split(","),
            baseline=args.baseline,
            n_steps=args.steps,
            data_root=args.data_root,
            device=args.device,
        )

    def show(result: dict, run_dir: Path) -> str:
        summary = json.dumps({k: v for k, v in result.items() if k != "panels"}, indent=2)
        return f"{summary}\n{len(result['panels'])} attribution panels in {run_dir / 'explain'}"

    description = (
        "Captum attributions (class logit, log p(x), energy) for test and OOD images; writes "
        "RUN_DIR/explain/."
    )
    return _run_folder_verb(argv, "explain", description, options, run, show)


def _cmd_sweep(argv: Sequence[str]) -> int:
    from .experiments import SweepFailedError, parse_grid, run_sweep, sweep_status
    from .experiments.submitit_launcher import parse_launcher_args
    from .reports.study import RESIDUAL_FLOWS_TABLE4
    from .runs import parse_overrides

    parser = argparse.ArgumentParser(
        prog="hybridflow sweep",
        description="Train a grid of λ × backbone × seed (× --grid keys), evaluate every cell "
        "(accuracy, bits/dim, calibration, OOD, selective classification) and write "
        "reports/<name>/ (report.md, report.html, results.csv, results.json).",
    )
    parser.add_argument("--name", help="study name: reports/<name>/")
    parser.add_argument(
        "--status", metavar="NAME", help="print the state of study NAME's cells; run nothing"
    )
    parser.add_argument(
        "--pack",
        metavar="DIR",
        help="copy study --name's resumable state (configs, metrics, models or checkpoints) "
        "into DIR, a folder to commit or carry to another machine; run nothing",
    )
    parser.add_argument(
        "--unpack", metavar="DIR", help="restore study --name's state from DIR; run nothing"
    )
    parser.add_argument(
        "--launcher",
        default="local",
        choices=["local", "submitit"],
        help="local worker processes, or one cluster job per cell through submitit "
        "(--launcher_args.partition=..., timeout_min, gpus_per_node, cpus_per_task, mem_gb, "
        "array_parallelism, tasks_per_node, nodes, cluster)",
    )
    parser.add_argument("--lams", default="0,1/D,1", help="comma-separated λ values")
    parser.add_argument("--backbones", default=None, help="comma-separated backbone names")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default: --seed)")
    parser.add_argument(
        "--grid", action="append", default=[], help="KEY=V1,V2: cross a config key (repeatable)"
    )
    parser.add_argument("--workers", type=int, default=1, help="cells trained at once")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in all")
    parser.add_argument("--ood", action="append", default=[], help="OOD set (repeatable)")
    parser.add_argument("--config", help="base config file, JSON or YAML (.yaml/.yml)")
    parser.add_argument("--report-root", default="reports")
    parser.add_argument("--runs-root", default="runs")
    parser.add_argument("--dequant-samples", type=int, default=1)
    parser.add_argument("--iw-samples", type=int, default=0)
    parser.add_argument("--n-samples", type=int, default=64, help="samples per cell (0: none)")
    parser.add_argument(
        "--fid-samples", type=int, default=0, help="samples per cell for the Fréchet distance"
    )
    parser.add_argument(
        "--train-first",
        action="store_true",
        help="train every cell before evaluating any (a study spanning sittings: evaluations "
        "are not carried by --pack, so none is done twice)",
    )
    flags = {a for action in parser._actions for a in action.option_strings}
    own, rest = _split_known(argv, flags)
    args = parser.parse_args(own)
    if args.status:
        rows = sweep_status(Path(args.runs_root) / args.status)
        for row in rows:
            extra = f"  job {row['job_id']} ({row['log']})" if row["job_id"] else ""
            error = f"  {row['error']}" if row["error"] else ""
            print(f"{row['cell']:48} {row['status']:12}{extra}{error}")
        counts = {
            s: sum(r["status"] == s for r in rows) for s in dict.fromkeys(r["status"] for r in rows)
        }
        print(", ".join(f"{n} {s}" for s, n in counts.items()) or "no cells")
        return 0
    if not args.name:
        parser.error("--name is required (or --status NAME)")
    if args.pack or args.unpack:
        return _carry_study(args.pack, args.unpack, Path(args.runs_root) / args.name)
    launcher_args, rest = parse_launcher_args(rest)
    config = {**_base_config(args.config), **parse_overrides(rest)}
    try:
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    except ValueError:
        raise SystemExit(f"error: --seeds takes integers, got {args.seeds!r}") from None
    try:
        out = run_sweep(
            args.name,
            lams=args.lams.split(","),
            backbones=args.backbones.split(",") if args.backbones else None,
            config=config,
            ood=args.ood,
            report_root=args.report_root,
            runs_root=args.runs_root,
            dequant_samples=args.dequant_samples,
            iw_samples=args.iw_samples,
            seeds=seeds,
            grid=parse_grid(args.grid),
            workers=args.workers,
            threads=args.threads,
            n_samples=args.n_samples,
            fid_samples=args.fid_samples,
            checks=[RESIDUAL_FLOWS_TABLE4],  # left out of the report unless the grid has its cells
            launcher=args.launcher,
            launcher_args=launcher_args,
            train_first=args.train_first,
            command=" ".join(["hybridflow", "sweep", *argv]),
        )
    except SweepFailedError as failed:
        print(f"report: {failed.out / 'report.md'} and {failed.out / 'report.html'}")
        print(f"error: {failed}", file=sys.stderr)
        return 1
    print(f"report: {out / 'report.md'} and {out / 'report.html'}")
    return 0


def _carry_study(pack: str | None, unpack: str | None, runs_dir: Path) -> int:
    from .experiments.carry import pack_study, unpack_study

    if pack and unpack:
        raise SystemExit("error: give --pack or --unpack, not both")
    if pack:  # errors (no cells, a damaged copy) are printed by main()
        cells = pack_study(runs_dir, pack)["cells"]
        for name, entry in cells.items():
            print(f"{name:48} {entry['state']:9} step {entry['step']:,}")
        print(f"packed {len(cells)} cells into {pack}")
    else:
        for name, outcome in unpack_study(unpack, runs_dir).items():
            print(f"{name:48} {outcome}")
    return 0


def _convergence_text(stop: dict[str, Any] | None) -> str:
    """``converged (plateau, 0.12% last quarter, 4,200 steps)``, or why it cannot say."""
    if not stop:
        return "not recorded (trained before runs recorded convergence)"
    parts = [stop["reason"].replace("_", " ")]
    if stop.get("improvement") is not None:
        parts.append(f"{100 * stop['improvement']:.2f}% last quarter")
    parts.append(f"{stop['step']:,} steps")
    return f"{stop['status']} ({', '.join(parts)})"


def _cmd_pretrained(argv: Sequence[str]) -> int:
    from .pretrained import list_pretrained

    parser = argparse.ArgumentParser(
        prog="hybridflow pretrained",
        description="List the pretrained models; every command that takes a run folder also "
        "takes pretrained:NAME, and Python code loads them with hybridflow.load_pretrained.",
    )
    parser.add_argument("--json", action="store_true", help="print the whole index as JSON")
    args = parser.parse_args(argv)
    index = list_pretrained()
    if args.json:
        print(json.dumps(index, indent=2))
        return 0
    print(
        f"{'name':34} {'params':>8} {'acc %':>7} {'bits/dim':>9} {'ECE %':>6} {'MB':>5}  "
        "convergence"
    )
    for name, e in index.items():
        m = e.get("metrics", {})
        acc = f"{100 * m['accuracy']:.2f}" if "accuracy" in m else "-"
        bpd = f"{m['bpd']:.3f}" if "bpd" in m else "-"
        ece = f"{100 * m['ece']:.2f}" if "ece" in m else "-"
        print(
            f"{name:34} {e['num_parameters']:>8,} {acc:>7} {bpd:>9} {ece:>6} "
            f"{e['bytes'] / 1e6:>5.2f}  {_convergence_text(e.get('convergence'))}"
        )
    print(
        "\nuse: hybridflow ood pretrained:NAME --ood noise:digits; "
        "python: hybridflow.load_pretrained(NAME)"
    )
    return 0


def _cmd_list(argv: Sequence[str]) -> int:
    from .data import available_datasets
    from .models import list_backbones
    from .runs import DEFAULTS

    print("backbones:", ", ".join(list_backbones()))
    print("datasets: ", ", ".join(available_datasets()))
    print("config defaults:")
    print(json.dumps(DEFAULTS, indent=2))
    return 0


def _cmd_vae(argv: Sequence[str]) -> int:
    """``hybridflow vae train|eval|sample``: VAEs with flow posteriors (hybridflow.training.vae)."""
    from .runs import parse_overrides
    from .training.vae import VAEConfig, evaluate_vae, load_vae_run, train_vae

    verbs = ("train", "eval", "sample")
    if not argv or argv[0] not in verbs:
        keys = ", ".join(f"--{k}" for k in VAEConfig().to_dict())
        print(
            "usage: hybridflow vae train [--key=value ...]  (keys: " + keys + ")\n"
            "       hybridflow vae eval RUN [--samples 1000] [--nll-images 1000]\n"
            "       hybridflow vae sample RUN [--n 64] [--out FILE.png]",
            file=sys.stderr,
        )
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    verb, rest = argv[0], list(argv[1:])
    if verb == "train":
        print(train_vae(VAEConfig.from_overrides(parse_overrides(rest))))
        return 0
    parser = argparse.ArgumentParser(prog=f"hybridflow vae {verb}")
    parser.add_argument("run_dir", type=Path)
    if verb == "eval":
        parser.add_argument("--samples", type=int, default=1000, help="draws per image (S)")
        parser.add_argument(
            "--nll-images", type=int, default=1000, help="test images for -log p(x)"
        )
        args = parser.parse_args(rest)
        print(json.dumps(evaluate_vae(args.run_dir, args.samples, args.nll_images), indent=2))
        return 0
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--out", type=Path, default=None, help="default: RUN/samples.png")
    args = parser.parse_args(rest)
    import torch
    from torchvision.utils import save_image

    model, _ = load_vae_run(args.run_dir)
    path = args.out or args.run_dir / "samples.png"
    save_image(model.sample(args.n, torch.Generator().manual_seed(0)), path, nrow=8)
    print(path)
    return 0


COMMANDS = {
    "train": _cmd_train,
    "eval": _cmd_eval,
    "sweep": _cmd_sweep,
    "ood": _cmd_ood,
    "calibrate": _cmd_calibrate,
    "sample": _cmd_sample,
    "explain": _cmd_explain,
    "list": _cmd_list,
    "pretrained": _cmd_pretrained,
    "vae": _cmd_vae,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hybridflow`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        known = ", ".join(COMMANDS)
        print(f"usage: hybridflow {{{known}}} [options]\n\n{__doc__}", file=sys.stderr)
        if argv and argv[0] not in ("-h", "--help"):
            from .naming import unknown_name_message

            print(f"error: {unknown_name_message('command', argv[0], COMMANDS)}", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    from .runs import CheckpointError, ConfigError
    from .training import TrainingDivergedError

    try:
        return COMMANDS[argv[0]](argv[1:])
    except (
        ConfigError,
        ValueError,
        FileNotFoundError,
        CheckpointError,
        TrainingDivergedError,
    ) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
