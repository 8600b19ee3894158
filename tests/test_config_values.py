"""Every config value is checked once, where the config enters: wrong values are refused in one
line before any folder is made or cell is started, with the valid values named (issue 30)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import TINY_RUN_ARGS

from hybridflow.cli import main
from hybridflow.nets import LipschitzMLP
from hybridflow.training import DEFAULTS, KEY_RANGES, KEY_TYPES, ConfigError, resolve_config
from hybridflow.transforms import ResidualBlock

#: (command-line options, a fragment the one-line error must contain)
WRONG_TRAIN_VALUES = [
    (["--backbone=resflow-digits", "--backbone_args.coeff=1.5"], "must lie in (0, 1), got 1.5"),
    (["--backbone=resflow", "--backbone_args.coeff=0"], "must lie in (0, 1), got 0"),
    (["--ema_decay=2"], "ema_decay must lie in [0, 1), got 2.0"),
    (["--epochs=0"], "epochs must be >= 1, got 0"),
    (["--num_threads=0"], "num_threads must be >= 1, got 0"),
    (["--warmup_steps=-5"], "warmup_steps must be >= 0, got -5"),
    (["--grad_clip=-1"], "grad_clip must be > 0, got -1.0"),
    (["--batch_size=0"], "batch_size must be >= 1, got 0"),
    (["--perturb_rate=1"], "perturb_rate must lie in [0, 1), got 1.0"),
    (["--logit_alpha=0.5"], "logit_alpha must lie in [0, 0.5), got 0.5"),
    (["--lr=1e-4", "--min_lr=1e-3"], "min_lr 0.001 exceeds lr 0.0001"),
    (
        ["--backbone_args.hiden_channels=3"],
        "backbone 'realnvp' takes no keyword 'hiden_channels'; did you mean 'hidden_channels'?",
    ),
    (["--head_args.widht=3"], "head 'resflow' takes no keyword 'widht'; did you mean 'width'?"),
    (
        ["--dequantization=variational", "--dequantization_args.num_coupling=2"],
        "takes no keyword 'num_coupling'; did you mean 'num_couplings'?",
    ),
    (["--dequantization_args.num_couplings=2"], "read only by --dequantization=variational"),
    (["--opt_args.beta=[0.9,0.99]"], "adamw takes no keyword 'beta'; did you mean 'betas'?"),
    (["--amp=fp16"], "amp must be one of none, bf16; got 'fp16' (did you mean 'bf16'?)"),
    (["--loader=disk"], "loader must be one of auto, memory, torch; got 'disk'"),
    (["--unlabelled=ignore"], "unlabelled must be one of keep, drop; got 'ignore'"),
    (["--backbone=nope"], "unknown backbone 'nope' (valid: coupling, coupling+1x1,"),
    (["--opt=adamx"], "unknown opt 'adamx'; did you mean 'adamax'?"),
    (["--device=gpu"], "unknown device 'gpu'"),
    (["--dataset=fashon-mnist"], "did you mean 'fashion-mnist'?"),
    (["--labelled_per_class=5", "--labelled_fraction=0.5"], "mutually exclusive"),
]


@pytest.mark.parametrize(("options", "message"), WRONG_TRAIN_VALUES)
def test_train_refuses_a_wrong_value_in_one_line_before_making_anything(
    tmp_path: Path, capsys, options: list[str], message: str
) -> None:
    out_dir = tmp_path / "runs"
    assert main(["train", *TINY_RUN_ARGS, "--max_steps=2", f"--out_dir={out_dir}", *options]) == 1
    err = capsys.readouterr().err
    assert message in err, err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    assert not out_dir.exists()  # refused before a run folder was made


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--amp=fp16"], "amp must be one of none, bf16"),
        (["--backbones=nope"], "unknown backbone 'nope'"),
        (["--loader=disk"], "loader must be one of auto, memory, torch"),
        (["--unlabelled=ignore"], "unlabelled must be one of keep, drop"),
        (["--lams=-1"], "lambda must be finite and >= 0, got -1.0"),
    ],
)
def test_sweep_refuses_a_wrong_value_before_any_cell_starts(
    tmp_path: Path, capsys, options: list[str], message: str
) -> None:
    argv = ["sweep", "--name=bad", "--lams=1", "--backbones=coupling", "--seeds=0", "--epochs=1"]
    roots = [f"--runs-root={tmp_path / 'runs'}", f"--report-root={tmp_path / 'reports'}"]
    assert main([*argv, *roots, *options]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "reports").exists()


def test_a_sweep_with_a_failed_cell_writes_its_report_and_exits_nonzero(
    tmp_path: Path, capsys
) -> None:
    # num_scales=0 passes every config check; the builder refuses it inside the cell.
    argv = ["sweep", "--name=broken", "--lams=1", "--backbones=coupling", "--seeds=0"]
    roots = [f"--runs-root={tmp_path / 'runs'}", f"--report-root={tmp_path / 'reports'}"]
    assert main([*argv, *roots, "--max_steps=2", "--backbone_args.num_scales=0"]) == 1
    captured = capsys.readouterr()
    assert "1 of 1 cells failed (coupling-lam1-s0)" in captured.err
    report = tmp_path / "reports" / "broken" / "report.md"
    assert f"report: {report}" in captured.out
    assert "## Failures" in report.read_text()


def test_a_yaml_config_trains_and_a_broken_one_is_refused(tmp_path: Path, capsys) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(
        "# a timm-style YAML config\n"
        "backbone: realnvp\n"
        "backbone_args:\n"
        "  num_scales: 2\n"
        "  couplings_per_scale: 1\n"
        "  final_couplings: 1\n"
        "  hidden_channels: 8\n"
        "  num_res_blocks: 1\n"
        "lr: 2.0e-3\n"
        "lam: 1/D\n"
        "max_steps: 3\n"
        "batch_size: 32\n"
        "warmup_steps: 1\n"
        "eval_every: 0\n"
        "progress: false\n"
        "num_threads: 1\n"
    )
    args = ["train", "--config", str(config), f"--out_dir={tmp_path}", "--name=yaml"]
    assert main([*args, "--seed=3"]) == 0  # the command line still wins over the file
    saved = json.loads((tmp_path / "yaml" / "config.json").read_text())
    assert saved["lr"] == 2e-3 and saved["lam"] == "1/D" and saved["seed"] == 3
    assert saved["backbone_args"]["hidden_channels"] == 8
    assert (tmp_path / "yaml" / "model.pt").exists()

    config.write_text("lr: [unclosed\n")
    assert main([*args, "--name=broken"]) == 1
    assert "is not valid YAML" in capsys.readouterr().err
    config.write_text("- a list, not a mapping\n")
    assert main([*args, "--name=broken"]) == 1
    assert "must hold key: value entries" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 1
    assert "missing.yaml not found" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("entry", "accepted"),
    [
        ({"ema_decay": 0.0}, True),
        ({"ema_decay": 0.9999}, True),
        ({"ema_decay": 1.0}, False),
        ({"val_fraction": 0.0}, True),
        ({"val_fraction": 1.0}, False),
        ({"eval_every": 0}, True),  # 0: no validation while training
        ({"log_every": 0}, False),
        ({"labelled_fraction": 1.0}, True),
        ({"labelled_fraction": 0.0}, False),
        ({"lr": 1e-5, "min_lr": 1e-5}, True),
        ({"lr": float("nan")}, False),
        ({"grad_clip": float("inf")}, False),
        ({"seed": -1}, False),
        ({"max_steps": None}, True),
        ({"backbone": "resflow", "backbone_args": {"coeff": 0.999}}, True),
        ({"backbone": "resflow", "backbone_args": {"coeff": 1}}, False),
        ({"backbone": "resflow-cpu", "backbone_args": {"hidden_channels": 8}}, True),  # variant
        ({"opt": "lookahead_adamw"}, True),
        ({"device": "cuda:1"}, True),
        ({"dataset": "npz:missing.npz"}, True),  # files are looked for only when loaded
    ],
)
def test_boundaries_of_the_ranges(entry: dict, accepted: bool) -> None:
    if accepted:
        resolve_config(base=entry)
    else:
        with pytest.raises(ConfigError):
            resolve_config(base=entry)


def test_every_numeric_key_has_a_range() -> None:
    numeric = {k for k, kind in KEY_TYPES.items() if kind in (int, float)}
    assert numeric == set(KEY_RANGES), "declare the allowed interval of a new numeric key"
    resolve_config()  # the defaults lie in their ranges
    for key, interval in KEY_RANGES.items():
        assert re.fullmatch(r"[\[(]-?[\d.]+, (inf|[\d.]+)[\])]", interval), (key, interval)
        assert DEFAULTS[key] is None or isinstance(DEFAULTS[key], int | float)


def test_a_residual_block_refuses_a_branch_that_is_not_a_contraction() -> None:
    ResidualBlock(LipschitzMLP(4, 8, coeff=0.97))  # builds
    with pytest.raises(ValueError, match=r"Lipschitz bound is 1.331, not < 1"):
        ResidualBlock(LipschitzMLP(4, 8, num_hidden_layers=2, coeff=1.1))
