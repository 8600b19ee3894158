"""Tabular datasets: scikit-learn sets offline, and the MAF preprocessing of the UCI sets run on
small synthetic files laid out like the MAF data archive (Papamakarios et al. 2017)."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch

from hybridflow.data import UnknownDatasetError, load_dataset
from hybridflow.data.images import DatasetNotFoundError
from hybridflow.data.tabular import (
    TABULAR_DATASETS,
    TABULAR_DIMS,
    TabularDataset,
    _gas_preprocess,
    _gas_remove_correlated,
    _power_split_with_noise,
    load_tabular,
)
from hybridflow.data.toy import ToyDataset, make_toy_dataset

HAS_PANDAS = importlib.util.find_spec("pandas") is not None
HAS_H5PY = importlib.util.find_spec("h5py") is not None
SK_SETS = {"sk:breast_cancer": 569, "sk:wine": 178, "sk:iris": 150, "sk:digits64": 1797}


# --------------------------------------------------------------------------- scikit-learn


@pytest.mark.parametrize("name", sorted(SK_SETS))
def test_sklearn_shapes_splits_and_standardisation(name):
    parts = {s: load_tabular(name, s, seed=3) for s in ("train", "val", "test", "all")}
    n = SK_SETS[name]
    dim = TABULAR_DIMS[name]
    for split, ds in parts.items():
        assert isinstance(ds, TabularDataset)
        assert ds.points.dtype == torch.float32 and ds.points.shape == (len(ds), dim)
        assert ds.shape == (dim,) and ds.dim == dim and ds.split == split and ds.name == name
        assert ds.labels.dtype == torch.int64 and int(ds.labels.min()) >= 0
        point, label = ds[0]
        assert point.shape == (dim,) and label.ndim == 0
    assert len(parts["all"]) == n
    assert len(parts["test"]) == math.ceil(0.2 * n) and len(parts["val"]) == round(0.1 * n)
    idx = [set(parts[s].indices.tolist()) for s in ("train", "val", "test")]
    assert not (idx[0] & idx[1]) and not (idx[0] & idx[2]) and not (idx[1] & idx[2])
    assert set.union(*idx) == set(range(n))
    # Each split holds the rows of ``all`` at its indices (same standardisation everywhere).
    for s in ("train", "val", "test"):
        torch.testing.assert_close(parts[s].points, parts["all"].points[parts[s].indices])
        assert torch.equal(parts[s].labels, parts["all"].labels[parts[s].indices])
    train = parts["train"].points.double()
    torch.testing.assert_close(train.mean(0), torch.zeros(dim), atol=1e-5, rtol=0)
    torch.testing.assert_close(train.std(0, unbiased=False), torch.ones(dim), atol=1e-4, rtol=0)
    # Stratified: every class is present in every split.
    classes = parts["all"].num_classes
    for s in ("train", "val", "test"):
        assert parts[s].labels.unique().numel() == classes


def test_sklearn_deterministic_and_seed_dependent():
    a = load_tabular("sk:wine", "val", seed=5)
    b = load_tabular("sk:wine", "val", seed=5)
    c = load_tabular("sk:wine", "val", seed=6)
    assert torch.equal(a.points, b.points) and torch.equal(a.indices, b.indices)
    assert not torch.equal(a.indices, c.indices)
    assert a.num_classes == 3 and load_tabular("sk:breast_cancer").num_classes == 2


def test_digits64_dequantised_consistently():
    ds = load_tabular("sk:digits64", "all", seed=1)
    from sklearn.datasets import load_digits

    raw = load_digits().data
    # Undo the standardisation per feature: the points must be (pixel + u) / 17 with u in [0, 1).
    train = load_tabular("sk:digits64", "train", seed=1)
    assert len(np.unique(train.points[:, 0].numpy())) > 100  # continuous, not 17 levels
    x = ds.points.double().numpy()
    for j in (0, 20, 36):
        # Standardisation is increasing and affine, so the level order must be preserved and
        # different levels must never interleave.
        order = np.argsort(x[:, j], kind="stable")
        assert np.all(np.diff(raw[order, j]) >= 0)
    again = load_tabular("sk:digits64", "all", seed=1)
    assert torch.equal(ds.points, again.points)
    assert not torch.equal(ds.points, load_tabular("sk:digits64", "all", seed=2).points)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"uci:power.*sk:iris"):
        load_tabular("uci:nope")
    with pytest.raises(ValueError, match="split"):
        load_tabular("sk:iris", "training")
    with pytest.raises(ValueError, match="val_fraction"):
        load_tabular("sk:iris", val_fraction=0.9)
    with pytest.raises(ValueError, match="seed"):
        load_tabular("sk:iris", seed=-1)
    assert set(TABULAR_DIMS) == set(TABULAR_DATASETS)


@pytest.mark.parametrize(
    ("name", "closest"), [("sk:wien", "sk:wine"), ("sk:iriss", "sk:iris"), ("uci:gass", "uci:gas")]
)
def test_misspelt_names_suggest_the_closest(name, closest):
    with pytest.raises(UnknownDatasetError, match=f"unknown tabular dataset '{name}'; did you"):
        load_tabular(name)
    with pytest.raises(UnknownDatasetError, match=f"did you mean '{closest}'") as info:
        load_dataset(name)
    assert info.value.suggestion == closest and "sk:digits64" in str(info.value)


def test_same_attributes_as_toy_dataset():
    toy = make_toy_dataset("toy:moons", "val")
    tab = load_tabular("sk:iris", "val")
    for attr in ("points", "labels", "num_levels", "num_classes", "name", "split", "shape", "dim"):
        assert hasattr(toy, attr) and hasattr(tab, attr)
    assert isinstance(toy, ToyDataset) and tab.num_levels is None


# --------------------------------------------------------------------------- UCI, synthetic


def _sizes(n):
    n_test = int(0.1 * n)
    n_val = int(0.1 * (n - n_test))
    return n - n_test - n_val, n_val, n_test


def _check_uci(name, root, n):
    parts = {s: load_tabular(name, s, root=str(root)) for s in ("train", "val", "test", "all")}
    for split, ds in parts.items():
        assert ds.dim == TABULAR_DIMS[name] and ds.points.dtype == torch.float32
        assert ds.num_classes == 0 and bool((ds.labels == -1).all()) and ds.split == split
        assert torch.isfinite(ds.points).all()
    if n is not None:
        assert tuple(len(parts[s]) for s in ("train", "val", "test")) == _sizes(n)
    cat = torch.cat([parts[s].points for s in ("train", "val", "test")])
    assert torch.equal(cat, parts["all"].points)
    assert torch.equal(parts["all"].indices, torch.arange(len(cat)))
    return parts


def test_power_noise_shuffle_and_normalisation(tmp_path):
    n = 300
    raw = np.zeros((n, 8))
    raw[:, 1] = raw[:, 3] = 1e6  # the two dropped columns must vanish
    raw[:, 7] = np.arange(n)  # "time" gets no noise, so it tracks the shuffle
    raw[:, 0] = 5.0
    train, val, test = _power_split_with_noise(raw)
    assert (len(train), len(val), len(test)) == _sizes(n)
    data = np.vstack((train, val, test))
    assert data.shape == (n, 6) and data.max() < 1e5
    # The MAF code shuffles with RandomState(42) before anything else.
    assert np.array_equal(data[:, 5], np.random.RandomState(42).permutation(n).astype(float))
    noise = data - raw[data[:, 5].astype(int)][:, [0, 2, 4, 5, 6, 7]]
    for col, scale in enumerate((0.001, 0.01, 1.0, 1.0, 1.0)):
        assert noise[:, col].min() >= 0 and noise[:, col].max() < scale
        assert noise[:, col].max() > 0.5 * scale  # really uniform noise of that scale
    assert np.all(noise[:, 5] == 0)

    (tmp_path / "power").mkdir()
    np.save(tmp_path / "power" / "data.npy", np.random.RandomState(0).rand(n, 8))
    parts = _check_uci("uci:power", tmp_path, n)
    both = torch.cat([parts["train"].points, parts["val"].points]).double()
    torch.testing.assert_close(both.mean(0), torch.zeros(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(both.std(0, unbiased=False), torch.ones(6), atol=1e-4, rtol=0)


def test_power_rejects_wrong_column_count(tmp_path):
    (tmp_path / "power").mkdir()
    np.save(tmp_path / "power" / "data.npy", np.zeros((50, 6)))
    with pytest.raises(ValueError, match="N x 8"):
        load_tabular("uci:power", root=str(tmp_path))


def _gas_table(n, rng):
    """Time, Meth, Eth and 16 sensors: 8 independent ones, each followed later by a near copy."""
    base = rng.randn(n, 8)
    sensors = np.hstack([base, base[:, ::-1] + 0.01 * rng.randn(n, 8)])
    names = ["Time", "Meth", "Eth"] + [f"s{i}" for i in range(16)]
    return np.hstack([rng.rand(n, 3), sensors]), names


def test_gas_correlation_removal_and_normalisation():
    rng = np.random.RandomState(0)
    values, names = _gas_table(400, rng)
    kept, kept_names = _gas_remove_correlated(values[:, 3:], names[3:])
    # Of each correlated pair the first column (in order) is dropped, so the copies survive.
    assert kept_names == [f"s{i}" for i in range(8, 16)]
    assert np.abs(np.corrcoef(kept, rowvar=False) - np.eye(8)).max() < 0.98
    train, val, test = _gas_preprocess(values, names)
    assert (len(train), len(val), len(test)) == _sizes(400) and train.shape[1] == 8
    # MAF normalises GAS with statistics of all rows (sample std).
    data = np.vstack((train, val, test)).astype(np.float64)
    np.testing.assert_allclose(data.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(data.std(0, ddof=1), 1, atol=1e-4)
    with pytest.raises(ValueError, match="Meth"):
        _gas_preprocess(values[:, 2:], names[2:])


@pytest.mark.skipif(not HAS_PANDAS, reason="pandas is not installed; uci:gas needs it")
def test_gas_from_pickle(tmp_path):
    import pandas as pd

    values, names = _gas_table(300, np.random.RandomState(1))
    (tmp_path / "gas").mkdir()
    pd.DataFrame(values, columns=names).to_pickle(tmp_path / "gas" / "ethylene_CO.pickle")
    _check_uci("uci:gas", tmp_path, 300)


@pytest.mark.skipif(HAS_PANDAS, reason="pandas is installed")
def test_gas_without_pandas_says_how_to_install(tmp_path):
    (tmp_path / "gas").mkdir()
    (tmp_path / "gas" / "ethylene_CO.pickle").write_bytes(b"not read")
    with pytest.raises(ImportError, match="pip install pandas"):
        load_tabular("uci:gas", root=str(tmp_path))


def _write_hepmass(path, n, rng, extra_test_column):
    """label, f0..f26, mass: 6 features with a repeated minimum (discrete), mass constant."""
    header = ["# label"] + [f"f{i}" for i in range(27)] + ["mass"]
    label = rng.randint(0, 2, size=(n, 1)).astype(float)
    feats = rng.randn(n, 27)
    for j in (3, 7, 11, 15, 19, 23):
        feats[:, j] = rng.randint(0, 3, size=n)
    rows = np.hstack([label, feats, np.full((n, 1), 1000.0)])
    if extra_test_column:
        header.append("junk")
        rows = np.hstack([rows, rng.randn(n, 1)])
    np.savetxt(path, rows, delimiter=",", header=",".join(header), comments="", fmt="%.8g")
    return int(label.sum())


@pytest.mark.parametrize("extra_test_column", [False, True])
def test_hepmass_positive_class_discrete_removal(tmp_path, extra_test_column):
    rng = np.random.RandomState(2)
    (tmp_path / "hepmass").mkdir()
    n_pos = _write_hepmass(tmp_path / "hepmass" / "1000_train.csv", 400, rng, False)
    n_test = _write_hepmass(tmp_path / "hepmass" / "1000_test.csv", 200, rng, extra_test_column)
    parts = _check_uci("uci:hepmass", tmp_path, None)
    n_val = int(0.1 * n_pos)
    assert (len(parts["train"]), len(parts["val"]), len(parts["test"])) == (
        n_pos - n_val,
        n_val,
        n_test,
    )
    # Normalised with the whole positive train table (val included), sample std.
    both = torch.cat([parts["train"].points, parts["val"].points]).double()
    torch.testing.assert_close(both.mean(0), torch.zeros(21), atol=1e-5, rtol=0)
    torch.testing.assert_close(both.std(0), torch.ones(21), atol=1e-4, rtol=0)
    # No discrete feature survives: every column has (almost) only distinct values.
    n_all = len(parts["all"])
    assert all(parts["all"].points[:, j].unique().numel() > 0.9 * n_all for j in range(21))


def test_miniboone_split_and_normalisation(tmp_path):
    n = 137
    (tmp_path / "miniboone").mkdir()
    raw = np.random.RandomState(3).gamma(2.0, size=(n, 43))
    np.save(tmp_path / "miniboone" / "data.npy", raw)
    parts = _check_uci("uci:miniboone", tmp_path, n)
    both = raw[: n - int(0.1 * n)]
    # Positional split (no shuffle): the test rows are the last rows of the file.
    expected = (raw[n - int(0.1 * n) :] - both.mean(0)) / both.std(0)
    np.testing.assert_allclose(parts["test"].points.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_archive_data_subfolder_is_accepted(tmp_path):
    (tmp_path / "data" / "miniboone").mkdir(parents=True)
    np.save(tmp_path / "data" / "miniboone" / "data.npy", np.random.rand(60, 43))
    assert load_tabular("uci:miniboone", "test", root=str(tmp_path)).dim == 43


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("uci:power", "power/data.npy"),
        ("uci:gas", "gas/ethylene_CO.pickle"),
        ("uci:hepmass", "hepmass/1000_test.csv"),
        ("uci:miniboone", "miniboone/data.npy"),
        ("uci:bsds300", "BSDS300/BSDS300.hdf5"),
    ],
)
def test_missing_files_name_expected_path(tmp_path, name, expected):
    with pytest.raises(DatasetNotFoundError) as info:
        load_tabular(name, root=str(tmp_path))
    message = str(info.value)
    assert str(tmp_path / expected) in message and "1161203" in message


@pytest.mark.skipif(HAS_H5PY, reason="h5py is installed")
def test_bsds300_without_h5py_says_how_to_install(tmp_path):
    (tmp_path / "BSDS300").mkdir()
    (tmp_path / "BSDS300" / "BSDS300.hdf5").write_bytes(b"not read")
    with pytest.raises(ImportError, match="pip install h5py"):
        load_tabular("uci:bsds300", root=str(tmp_path))


@pytest.mark.skipif(not HAS_H5PY, reason="h5py is not installed")
def test_bsds300_with_h5py(tmp_path):
    import h5py

    (tmp_path / "BSDS300").mkdir()
    rng = np.random.RandomState(4)
    with h5py.File(tmp_path / "BSDS300" / "BSDS300.hdf5", "w") as f:
        for group, n in (("train", 50), ("validation", 10), ("test", 20)):
            f[group] = rng.randn(n, 63)
    parts = _check_uci("uci:bsds300", tmp_path, None)
    assert [len(parts[s]) for s in ("train", "val", "test")] == [50, 10, 20]
    assert parts["test"].indices[0] == 60
