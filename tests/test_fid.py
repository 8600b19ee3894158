"""Fréchet distances: the closed form of two Gaussians, a set against itself, the shipped
feature networks, and the FID of a run's samples."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from hybridflow.evaluation import fid_feature_network, frechet_distance
from hybridflow.evaluation.fid import FID_WEIGHTS_DIR


class _Identity(nn.Module):
    """Features = the inputs themselves: the distance of the inputs' Gaussian fits."""

    num_features = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def test_frechet_distance_matches_the_closed_form_of_two_gaussians() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.tensor([[1.0, 0.3, 0.0], [0.0, 1.0, 0.5], [0.0, 0.0, 0.7]])
    b = torch.tensor([[0.5, 0.0, 0.0], [0.2, 1.2, 0.0], [0.0, 0.1, 1.0]])
    m1, m2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 0.0, 2.5])
    real = m1 + torch.randn(200_000, 3, generator=gen) @ a.T
    fake = m2 + torch.randn(200_000, 3, generator=gen) @ b.T
    s1, s2 = (a @ a.T).double().numpy(), (b @ b.T).double().numpy()
    closed = float((m1 - m2).pow(2).sum()) + np.trace(
        s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real
    )
    assert frechet_distance(real, fake, _Identity(), 50_000) == pytest.approx(closed, rel=0.01)
    assert frechet_distance(real, real, _Identity(), 50_000) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match=">= 2 images per side"):
        frechet_distance(real[:1], fake, _Identity())


@pytest.mark.parametrize("dataset", ["digits", "fashion-mnist"])
def test_shipped_feature_networks_load_and_separate_real_from_noise(dataset: str) -> None:
    from hybridflow.data import DatasetNotFoundError, dataset_tensors, load_dataset

    try:
        test = load_dataset(dataset, "test")
    except DatasetNotFoundError as exc:
        pytest.skip(str(exc).splitlines()[0])
    net, label = fid_feature_network("classifier", dataset, test.num_levels)
    assert label == f"FD ({dataset} CNN features)" and "FID" not in label
    x = dataset_tensors(test)[0][:1000].to(torch.get_default_dtype())
    half = len(x) // 2
    noise = torch.randint(0, test.num_levels, x.shape, generator=torch.Generator().manual_seed(1))
    same = frechet_distance(x[:half], x[half:], net)
    apart = frechet_distance(x[:half], noise.to(x), net)
    # Two halves of the test set against the test set and noise (digits: 180 images a side in
    # 128 dimensions, so the "same" distance is mostly the small-sample bias of the estimate).
    assert apart > 5 * same


def test_feature_network_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="FID features must be one of"):
        fid_feature_network("vgg", "digits", 17)
    with pytest.raises(ValueError, match="no shipped FID classifier for 'cifar10'"):
        fid_feature_network("classifier", "cifar10", 256)
    with pytest.raises(ValueError, match="reads 17-level images, these have 256"):
        fid_feature_network("classifier", "digits", 256)
    with pytest.raises(FileNotFoundError, match="inception_v3"):
        fid_feature_network("inception", "digits", 17, tmp_path / "missing.pt")
    assert (FID_WEIGHTS_DIR / "index.json").exists()


def test_sample_run_reports_fid_by_temperature(tmp_path, one_thread) -> None:
    from hybridflow.reports import sample_run
    from hybridflow.training import train

    run = train(
        {"dataset": "digits", "backbone": "coupling", "head_args": {"width": 8},
         "backbone_args": {"num_scales": 2, "blocks_per_scale": 1, "hidden_channels": 8},
         "batch_size": 64, "max_steps": 20, "eval_every": 0, "progress": False,
         "out_dir": str(tmp_path), "name": "r"}
    )  # fmt: skip
    result = sample_run(run, (1.0, 0.7), n=8, fid_samples=100)
    fid = result["fid"]
    assert fid["label"] == "FD (digits CNN features)" and fid["samples"] == 100
    assert set(fid["by_temperature"]) == {"1", "0.7"} and fid["best"] == min(
        fid["by_temperature"].values()
    )


def test_study_reports_a_fid_column(tmp_path) -> None:
    import csv

    from hybridflow.experiments import run_sweep

    out = run_sweep(
        "fid",
        lams=["1/D"],
        backbones=["coupling"],
        config={"dataset": "digits", "backbone": "coupling", "head_args": {"width": 8},
                "batch_size": 64, "max_steps": 10, "eval_every": 0, "progress": False,
                "backbone_args": {"num_scales": 2, "blocks_per_scale": 1, "hidden_channels": 8}},
        report_root=tmp_path / "reports",
        runs_root=tmp_path / "runs",
        threads=1,
        n_samples=4,
        typicality_batch=5,
        fid_samples=50,
    )  # fmt: skip
    md = (out / "report.md").read_text()
    assert "FD (T=1)" in md and "FD (best T)" in md and "FD (digits CNN features), 50 samples" in md
    row = next(csv.DictReader((out / "results.csv").open()))
    assert float(row["fid_best"]) <= float(row["fid"])
    assert float(row["fid_best_temperature"]) in (1.0, 0.85, 0.7)
