"""Tabular density-estimation datasets: the UCI benchmarks of MAF and offline scikit-learn sets.

One idea over 500 lines: the tables and each one's published preprocessing.

UCI benchmarks (Papamakarios et al. 2017, "Masked Autoregressive Flow", preprocessing as in
their public code; the same data are used by Huang et al. 2018, "Neural Autoregressive Flows").
``root`` must be laid out like the MAF paper's data archive (https://zenodo.org/record/1161203),
or hold that layout in a ``data/`` subfolder:

================  =========================  ====  =========  ========  ========
name              file(s) under ``root``     D     train      val       test
================  =========================  ====  =========  ========  ========
``uci:power``     ``power/data.npy``         6     1,659,917  184,435   204,928
``uci:gas``       ``gas/ethylene_CO.pickle`` 8     852,174    94,685    105,206
``uci:hepmass``   ``hepmass/1000_{train,     21    315,123    35,013    174,987
                  test}.csv``
``uci:miniboone`` ``miniboone/data.npy``     43    29,556     3,284     3,648
``uci:bsds300``   ``BSDS300/BSDS300.hdf5``   63    1,000,000  50,000    250,000
================  =========================  ====  =========  ========  ========

Their splits are the published ones: ``seed`` and ``val_fraction`` are ignored, so numbers stay
comparable with the literature. ``uci:gas`` needs pandas (the file is a pickled DataFrame) and
``uci:bsds300`` needs h5py; neither is a dependency of hybridflow, both are imported lazily.
Points are unlabelled (label -1, ``num_classes`` 0).

scikit-learn sets (bundled with scikit-learn, no download), with class labels:

* ``sk:breast_cancer`` — 569 x 30, 2 classes.
* ``sk:wine`` — 178 x 13, 3 classes.
* ``sk:iris`` — 150 x 4, 3 classes.
* ``sk:digits64`` — 1,797 x 64, 10 classes: the 8 x 8 digit pixels (integers 0..16) made
  continuous by adding fixed uniform noise ``u ~ U[0, 1)`` and dividing by 17, so every value
  lies in ``[0, 1)``. The noise is drawn once per ``seed`` for the whole set (as MAF fixes the
  noise of POWER), so a point is identical in every split and load. A density on these points
  is a density of dequantised pixels: ``log p(x) + 64 log 17`` lower-bounds the log-probability
  of the integer image *before* standardisation (the standardisation adds its own Jacobian).

For the scikit-learn sets, test is 20 % of all points, val is ``val_fraction`` of all points
taken from the rest, and train is what remains; both cuts are stratified by label with
``random_state=seed``. Every split is standardised with the train split's mean and standard
deviation (population std; constant features keep std 1).

Processed UCI arrays are cached per process (keyed by path, modification time and size), so
loading ``train``, ``val`` and ``test`` in turn reads and preprocesses each file once.
"""

from __future__ import annotations

import functools
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from hybridflow.data.common import (
    DatasetNotFoundError,
    PointDataset,
    check_fractions,
    check_seed,
    check_split,
    data_root_path,
    file_key,
    find_files,
    readonly,
    stratified_split,
    unknown_dataset_error,
)

__all__ = [
    "MAF_DATA_URL",
    "SK_TEST_FRACTION",
    "TABULAR_DATASETS",
    "TABULAR_DIMS",
    "UCI_SPLIT_SIZES",
    "TabularDataset",
    "load_tabular",
]

MAF_DATA_URL = "https://zenodo.org/record/1161203"
# Share of all points held out as test set for the scikit-learn sets.
SK_TEST_FRACTION = 0.2

TABULAR_DATASETS: tuple[str, ...] = (
    "uci:power",
    "uci:gas",
    "uci:hepmass",
    "uci:miniboone",
    "uci:bsds300",
    "sk:breast_cancer",
    "sk:wine",
    "sk:iris",
    "sk:digits64",
)
# Dimension of one point after preprocessing.
TABULAR_DIMS: dict[str, int] = {
    "uci:power": 6,
    "uci:gas": 8,
    "uci:hepmass": 21,
    "uci:miniboone": 43,
    "uci:bsds300": 63,
    "sk:breast_cancer": 30,
    "sk:wine": 13,
    "sk:iris": 4,
    "sk:digits64": 64,
}
# Split sizes of the full benchmark files (Papamakarios et al. 2017, appendix).
UCI_SPLIT_SIZES: dict[str, dict[str, int]] = {
    "uci:power": {"train": 1_659_917, "val": 184_435, "test": 204_928},
    "uci:gas": {"train": 852_174, "val": 94_685, "test": 105_206},
    "uci:hepmass": {"train": 315_123, "val": 35_013, "test": 174_987},
    "uci:miniboone": {"train": 29_556, "val": 3_284, "test": 3_648},
    "uci:bsds300": {"train": 1_000_000, "val": 50_000, "test": 250_000},
}

# Files each UCI set needs, relative to the archive root.
_UCI_FILES: dict[str, tuple[str, ...]] = {
    "uci:power": ("power/data.npy",),
    "uci:gas": ("gas/ethylene_CO.pickle",),
    "uci:hepmass": ("hepmass/1000_train.csv", "hepmass/1000_test.csv"),
    "uci:miniboone": ("miniboone/data.npy",),
    "uci:bsds300": ("BSDS300/BSDS300.hdf5",),
}
_SPLIT_ORDER: tuple[str, ...] = ("train", "val", "test")
# POWER's data.npy: global active power, global reactive power, voltage, global intensity,
# sub-metering 1-3, time of day. MAF drops reactive power and intensity (columns 1 and 3).
_POWER_COLUMNS = 8
_POWER_DROP = (1, 3)
_POWER_SEED = 42
_GAS_DROP = ("Meth", "Eth", "Time")
_GAS_CORR_THRESHOLD = 0.98
_HEPMASS_MAX_MIN_COUNT = 5


class TabularDataset(PointDataset):
    """Points of a tabular dataset (see :class:`~hybridflow.data.toy.PointDataset`).

    ``name`` is e.g. ``"uci:power"`` or ``"sk:iris"``; ``labels`` are -1 for the unlabelled UCI
    sets; ``indices`` order the ``all`` split as train, val, test for the UCI sets and as the
    original order for the scikit-learn sets.
    """


# --------------------------------------------------------------------------- helpers

_Splits = tuple[np.ndarray, np.ndarray, np.ndarray]


def _tail_split(data: np.ndarray) -> _Splits:
    """MAF's positional split: test = last 10 %, val = last 10 % of the rest, train = the rest.

    Sizes use ``int`` (floor), as in the reference code, which gives the published counts.
    """
    n_test = int(0.1 * data.shape[0])
    rest, test = data[: data.shape[0] - n_test], data[data.shape[0] - n_test :]
    n_val = int(0.1 * rest.shape[0])
    return rest[: rest.shape[0] - n_val], rest[rest.shape[0] - n_val :], test


def _standardise(splits: _Splits, mean: np.ndarray, std: np.ndarray) -> _Splits:
    """Apply ``(x - mean) / std`` to every split and cast to float32 (after, not before)."""
    safe = np.where(std > 0, std, 1.0)  # a constant feature would otherwise become NaN
    out = tuple(readonly(((s - mean) / safe).astype(np.float32)) for s in splits)
    return out[0], out[1], out[2]


def _locate(name: str, root: str | None) -> list[Path]:
    """Paths of the files of UCI set ``name``; raise DatasetNotFoundError if any is missing."""
    base, rel = data_root_path(root), _UCI_FILES[name]
    # The archive unpacks into a ``data/`` folder; accept root pointing above or at it.
    places = [(base, "root"), (base / "data", "the archive's data/ folder under root")]
    files, searched = find_files(places, {r: (r,) for r in rel})
    if files is not None:
        return [files[r] for r in rel]
    raise DatasetNotFoundError(
        f"{name} not found: expected {', '.join(str(base / r) for r in rel)}. Searched, in order:\n"
        + "".join(f"  - {line}\n" for line in searched)
        + f"These files come from the data archive of Papamakarios et al. (2017), 'Masked "
        f"Autoregressive Flow': download it from {MAF_DATA_URL} (Zenodo record 1161203), "
        "unpack it and pass the folder holding its subfolders (power/, gas/, hepmass/, "
        "miniboone/, BSDS300/) as root."
    )


# --------------------------------------------------------------------------- POWER


def _power_split_with_noise(raw: np.ndarray) -> _Splits:
    """POWER before normalisation: shuffle, drop 2 columns, add fixed noise, split.

    Follows ``datasets/power.py`` of the MAF code: one ``RandomState(42)`` first shuffles the
    rows, then draws uniform noise to break ties of the rounded measurements — voltage
    ``U[0, 0.01)``, global active power ``U[0, 0.001)``, the 3 sub-meterings ``U[0, 1)`` (drawn
    in that order, which fixes the stream), none on time.
    """
    if raw.ndim != 2 or raw.shape[1] != _POWER_COLUMNS:
        raise ValueError(
            f"power/data.npy must be N x {_POWER_COLUMNS} (MAF archive layout), got {raw.shape}"
        )
    data = np.array(raw, dtype=np.float64)  # a private, writable copy for the in-place shuffle
    rng = np.random.RandomState(_POWER_SEED)
    rng.shuffle(data)
    n = data.shape[0]
    data = np.delete(data, _POWER_DROP, axis=1)
    # Columns now: active power, voltage, sub-metering 1-3, time.
    voltage_noise = 0.01 * rng.rand(n, 1)
    active_noise = 0.001 * rng.rand(n, 1)
    submeter_noise = rng.rand(n, 3)
    time_noise = np.zeros((n, 1))
    data += np.hstack((active_noise, voltage_noise, submeter_noise, time_noise))
    return _tail_split(data)


@functools.lru_cache(maxsize=1)
def _power_arrays(key: tuple[str, int, int]) -> _Splits:
    train, val, test = _power_split_with_noise(np.load(key[0], allow_pickle=False))
    # MAF normalises with the statistics of train and val together (population std).
    both = np.vstack((train, val))
    return _standardise((train, val, test), both.mean(axis=0), both.std(axis=0))


# --------------------------------------------------------------------------- GAS


def _gas_remove_correlated(
    values: np.ndarray, columns: list[str], threshold: float = _GAS_CORR_THRESHOLD
) -> tuple[np.ndarray, list[str]]:
    """Greedily drop features until no two have Pearson correlation above ``threshold``.

    As in ``datasets/gas.py`` of the MAF code: count, for each feature, the features (itself
    included) correlated above the threshold; while some count exceeds 1, drop the *first*
    such feature in column order and recount.
    """
    values = np.asarray(values, dtype=np.float64)
    columns = list(columns)
    while values.shape[1] > 1:
        counts = (np.corrcoef(values, rowvar=False) > threshold).sum(axis=1)
        over = np.flatnonzero(counts > 1)
        if over.size == 0:
            break
        values = np.delete(values, over[0], axis=1)
        del columns[over[0]]
    return values, columns


def _gas_preprocess(values: np.ndarray, columns: list[str]) -> _Splits:
    """GAS from the raw table: drop Meth/Eth/Time, decorrelate, normalise, split by position.

    Unlike the other sets, the MAF code normalises GAS with the mean and sample std
    (``ddof=1``, pandas' default) of *all* rows, before splitting; we keep that.
    """
    missing = [c for c in _GAS_DROP if c not in columns]
    if missing:
        raise ValueError(f"gas table lacks the columns {missing}; got columns {columns}")
    keep = [i for i, c in enumerate(columns) if c not in _GAS_DROP]
    data, _ = _gas_remove_correlated(
        np.asarray(values, dtype=np.float64)[:, keep], [columns[i] for i in keep]
    )
    mean, std = data.mean(axis=0), data.std(axis=0, ddof=1)
    return _standardise(_tail_split(data), mean, std)


def _read_gas_pickle(path: str) -> tuple[np.ndarray, list[str]]:
    """Read the pickled pandas DataFrame of the archive as (values, column names)."""
    try:
        import pandas as pd  # optional: only the GAS pickle needs it
    except ImportError as exc:
        raise ImportError(
            "uci:gas is stored as a pickled pandas DataFrame; reading it needs pandas, which "
            "is not a dependency of hybridflow: pip install pandas"
        ) from exc
    frame = pd.read_pickle(path)
    if not isinstance(frame, pd.DataFrame):
        raise ValueError(f"{path}: expected a pickled pandas DataFrame, got {type(frame)}")
    return frame.to_numpy(dtype=np.float64), [str(c) for c in frame.columns]


@functools.lru_cache(maxsize=1)
def _gas_arrays(key: tuple[str, int, int]) -> _Splits:
    try:
        values, columns = _read_gas_pickle(key[0])
    except (pickle.UnpicklingError, EOFError) as exc:
        raise ValueError(f"{key[0]}: cannot unpickle ({exc})") from exc
    return _gas_preprocess(values, columns)


# --------------------------------------------------------------------------- HEPMASS


def _read_csv(path: str) -> tuple[np.ndarray, list[str]]:
    """A numeric CSV with one header line, as (float64 values, column names)."""
    with open(path) as f:
        header = [c.strip() for c in f.readline().rstrip("\r\n").split(",")]
    values = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2, dtype=np.float64)
    if values.shape[1] != len(header):
        raise ValueError(
            f"{path}: header names {len(header)} columns but the rows hold {values.shape[1]}"
        )
    return values, header


def _hepmass_preprocess(
    train_values: np.ndarray,
    train_columns: list[str],
    test_values: np.ndarray,
    test_columns: list[str],
) -> _Splits:
    """HEPMASS from the two CSV tables, following ``datasets/hepmass.py`` of the MAF code.

    1. Keep signal rows only (first column, the label, equal to 1) and drop the label.
    2. Drop the last column of the test table (the MAF code does so because the published
       test file is malformed).
    3. Normalise both with the mean and sample std (``ddof=1``) of the *whole* train table,
       before the validation rows are cut off, matching columns by header name as pandas does.
    4. Remove "discrete" features: the MAF code sorts each train feature's value counts by value
       and drops the feature when the first entry — the count of its *minimum* value — exceeds
       5. (The variable is called ``max_count`` there, but it is the minimum's count; we
       reproduce the actual rule.) A constant feature (the mass, 1000 in these files) counts as
       discrete.
    5. Validation = last 10 % (floor) of the train rows, by position.
    """
    train_values = np.asarray(train_values, dtype=np.float64)
    test_values = np.asarray(test_values, dtype=np.float64)
    train = train_values[train_values[:, 0] == 1, 1:]
    names = list(train_columns[1:])
    test = test_values[test_values[:, 0] == 1, 1:-1]
    test_names = list(test_columns[1:-1])
    mean, std = train.mean(axis=0), train.std(axis=0, ddof=1)
    train = (train - mean) / np.where(std > 0, std, 1.0)
    keep = []
    for j in range(train.shape[1]):
        column = train[:, j]
        if column.size == 0 or np.count_nonzero(column == column.min()) <= _HEPMASS_MAX_MIN_COUNT:
            keep.append(j)
    by_name = {c: i for i, c in enumerate(test_names)}
    absent = [names[j] for j in keep if names[j] not in by_name]
    if absent:
        raise ValueError(
            f"hepmass test file lacks the kept train features {absent} (after dropping its "
            f"label and last column); test columns are {test_names}"
        )
    test_cols = [by_name[names[j]] for j in keep]
    test = (test[:, test_cols] - mean[keep]) / np.where(std[keep] > 0, std[keep], 1.0)
    train = train[:, keep]
    n_val = int(0.1 * train.shape[0])
    splits = (train[: train.shape[0] - n_val], train[train.shape[0] - n_val :], test)
    out = tuple(readonly(s.astype(np.float32)) for s in splits)
    return out[0], out[1], out[2]


@functools.lru_cache(maxsize=1)
def _hepmass_arrays(train_key: tuple[str, int, int], test_key: tuple[str, int, int]) -> _Splits:
    train_values, train_columns = _read_csv(train_key[0])
    test_values, test_columns = _read_csv(test_key[0])
    return _hepmass_preprocess(train_values, train_columns, test_values, test_columns)


# --------------------------------------------------------------------------- MINIBOONE


@functools.lru_cache(maxsize=1)
def _miniboone_arrays(key: tuple[str, int, int]) -> _Splits:
    """MINIBOONE: the archive's array is already cleaned (outliers and discrete features removed
    by the MAF authors), so only split by position and normalise with train+val statistics
    (population std), as in ``datasets/miniboone.py`` of the MAF code.
    """
    data = np.load(key[0], allow_pickle=False).astype(np.float64)
    if data.ndim != 2 or data.shape[1] != TABULAR_DIMS["uci:miniboone"]:
        raise ValueError(f"{key[0]}: expected N x 43 (MAF archive layout), got {data.shape}")
    train, val, test = _tail_split(data)
    both = np.vstack((train, val))
    return _standardise((train, val, test), both.mean(axis=0), both.std(axis=0))


# --------------------------------------------------------------------------- BSDS300


def _bsds300_arrays(path: Path, split: str) -> tuple[np.ndarray, int]:
    """BSDS300 patches of ``split`` as stored in the archive, and their offset in ``all``.

    The patches are 8 x 8 monochrome with the last pixel dropped (63 values), already
    preprocessed by the MAF authors; the file holds ``train``, ``validation`` and ``test``.
    """
    try:
        import h5py  # optional: only BSDS300 needs it
    except ImportError as exc:
        raise ImportError(
            "uci:bsds300 is stored as HDF5; reading it needs h5py, which is not a dependency "
            "of hybridflow: pip install h5py"
        ) from exc
    groups = {"train": "train", "val": "validation", "test": "test"}
    parts = _SPLIT_ORDER if split == "all" else (split,)
    with h5py.File(path, "r") as f:
        arrays = [np.asarray(f[groups[p]][:], dtype=np.float32) for p in parts]
        # Offsets from the stored shapes, without reading the earlier splits.
        before = _SPLIT_ORDER[: _SPLIT_ORDER.index(parts[0])]
        offset = sum(int(f[groups[p]].shape[0]) for p in before)
    data = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
    if data.ndim != 2 or data.shape[1] != TABULAR_DIMS["uci:bsds300"]:
        raise ValueError(f"{path}: expected N x 63 patches, got {data.shape}")
    return data, offset


# --------------------------------------------------------------------------- scikit-learn


def _sk_loader(short: str) -> Callable[[], object]:
    from sklearn import datasets  # start-up time: sklearn pulls scipy

    return {
        "breast_cancer": datasets.load_breast_cancer,
        "wine": datasets.load_wine,
        "iris": datasets.load_iris,
        "digits64": datasets.load_digits,
    }[short]


@functools.lru_cache(maxsize=8)
def _sk_raw(short: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    bunch = _sk_loader(short)()
    x = np.asarray(bunch.data, dtype=np.float64)
    if short == "digits64":
        # Fixed uniform dequantisation of the 17 levels; the stream depends on seed only.
        x = (x + np.random.RandomState(seed).rand(*x.shape)) / 17.0
    return readonly(x), readonly(np.asarray(bunch.target, dtype=np.int64))


def _load_sklearn(name: str, split: str, seed: int, val_fraction: float) -> TabularDataset:
    check_fractions(val_fraction, SK_TEST_FRACTION)
    x, y = _sk_raw(name[3:], seed)
    parts = stratified_split(y, seed, val_fraction, SK_TEST_FRACTION)
    train = x[parts["train"]]
    mean, std = train.mean(axis=0), train.std(axis=0)
    index = np.arange(len(y)) if split == "all" else parts[split]
    points = (x[index] - mean) / np.where(std > 0, std, 1.0)
    return TabularDataset(
        torch.from_numpy(points.astype(np.float32)),
        torch.from_numpy(y[index].copy()),
        name=name,
        split=split,
        num_classes=int(y.max()) + 1,
        indices=torch.from_numpy(index.astype(np.int64)),
    )


# --------------------------------------------------------------------------- entry point


def _uci_splits(name: str, root: str | None) -> _Splits:
    paths = _locate(name, root)
    if name == "uci:power":
        return _power_arrays(file_key(paths[0]))
    if name == "uci:gas":
        return _gas_arrays(file_key(paths[0]))
    if name == "uci:hepmass":
        return _hepmass_arrays(file_key(paths[0]), file_key(paths[1]))
    return _miniboone_arrays(file_key(paths[0]))


def _load_uci(name: str, split: str, root: str | None) -> TabularDataset:
    if name == "uci:bsds300":
        points, offset = _bsds300_arrays(_locate(name, root)[0], split)
    else:
        arrays = dict(zip(_SPLIT_ORDER, _uci_splits(name, root), strict=True))
        if split == "all":
            points, offset = np.concatenate([arrays[p] for p in _SPLIT_ORDER]), 0
        else:
            points = arrays[split]
            offset = sum(len(arrays[p]) for p in _SPLIT_ORDER[: _SPLIT_ORDER.index(split)])
    n = len(points)
    return TabularDataset(
        torch.from_numpy(np.array(points, dtype=np.float32)),  # copy: the cache stays frozen
        torch.full((n,), -1, dtype=torch.int64),
        name=name,
        split=split,
        num_classes=0,
        indices=torch.arange(offset, offset + n),
    )


def load_tabular(
    name: str,
    split: str = "train",
    root: str | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
) -> TabularDataset:
    """Load a split of a tabular density-estimation dataset into memory.

    Args:
        name: One of :data:`TABULAR_DATASETS` (see the module docstring for each).
        split: ``train``, ``val``, ``test`` or ``all`` (train, val and test concatenated for
            the UCI sets; the original order for the scikit-learn sets).
        root: Folder holding the MAF data archive (``power/``, ``gas/``, ...), or the folder
            above its ``data/`` directory; defaults to ``~/.cache/hybridflow``. Unused by the
            scikit-learn sets.
        seed: Seed of the scikit-learn splits and of the ``digits64`` noise (integer in
            ``[0, 2**32)``). The UCI sets have fixed published splits and ignore it.
        val_fraction: Share of all points used for validation by the scikit-learn sets
            (test is 20 %). Ignored by the UCI sets.

    Raises:
        ValueError: Unknown name or split, bad seed or fraction, malformed files.
        DatasetNotFoundError: A UCI file is absent; the message names it and the archive.
        ImportError: ``uci:gas`` without pandas or ``uci:bsds300`` without h5py.
    """
    check_split(split)
    if name not in TABULAR_DATASETS:
        raise unknown_dataset_error(name, TABULAR_DATASETS, kind="tabular dataset")
    seed = check_seed(seed)
    if name.startswith("sk:"):
        return _load_sklearn(name, split, seed, val_fraction)
    return _load_uci(name, split, root)
