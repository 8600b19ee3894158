"""Image dataset families held in memory as integer pixel levels: digits, the MNIST family,
SVHN, CIFAR-10, npz files and synthetic images.

One idea over 500 lines: reading each image source's own file format into levels.

Images are stored as uint8 ``N x C x H x W`` tensors of *levels* ``0..num_levels-1``; the
dequantisation and scaling to floats belong to the model, not to the data. Splits are fixed and
seeded (see :mod:`hybridflow.data.common`). Load them by name with
:func:`hybridflow.data.load_dataset`, which dispatches to the loaders here.

SVHN and CIFAR-10 are read from torchvision's files (``train_32x32.mat`` / ``test_32x32.mat``;
the ``cifar-10-batches-py`` batches), which torchvision downloads with ``download=True``; like
the MNIST family they keep the official test split and hold out a seeded share of the training
images for validation.

Parsed source files are cached per process (keyed by path, modification time and size), so
loading ``train``, ``val`` and ``test`` in turn reads each file once.
"""

from __future__ import annotations

import codecs
import functools
import gzip
import pickle
import re
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hybridflow.data.common import (
    DEFAULT_DATA_ROOT,
    TEST_FRACTION,
    DatasetNotFoundError,
    ImageDataset,
    check_fractions,
    data_root_path,
    dataset_tensors,
    file_key,
    find_data_path,
    find_files,
    random_split,
    readonly,
    stratified_split,
)

__all__ = [
    "CIFAR10_BATCHES",
    "DEFAULT_DATA_ROOT",
    "IDX_SOURCES",
    "SVHN_FILES",
    "SYNTHETIC_SIZES",
    "TEST_FRACTION",
    "DatasetNotFoundError",
    "IdxSource",
    "ImageDataset",
    "dataset_tensors",
    "load_cifar10",
    "load_digits",
    "load_idx_dataset",
    "load_npz",
    "load_svhn",
    "load_synthetic",
    "parse_synthetic",
    "read_cifar10_batch",
    "read_idx",
    "read_svhn_mat",
]

_IDX_FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# IDX type codes -> big-endian NumPy dtypes (format of LeCun's MNIST distribution).
_IDX_DTYPES: dict[int, str] = {
    0x08: "u1",
    0x09: "i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


@dataclass(frozen=True)
class IdxSource:
    """Where to look for an IDX-format dataset (MNIST and its drop-in replacements).

    Attributes:
        title: Human-readable name used in messages.
        torchvision_class: Class in ``torchvision.datasets``; also the folder name of the
            torchvision layout ``root/<torchvision_class>/raw``.
        system_dirs: Directories filled by an OS package, searched after ``data_root``.
        apt_package: Debian/Ubuntu package that installs the files into ``system_dirs``.
    """

    title: str
    torchvision_class: str
    system_dirs: tuple[str, ...] = ()
    apt_package: str | None = None


IDX_SOURCES: dict[str, IdxSource] = {
    "fashion-mnist": IdxSource(
        title="Fashion-MNIST",
        torchvision_class="FashionMNIST",
        system_dirs=("/usr/share/datasets/fashion-mnist",),
        apt_package="dataset-fashion-mnist",
    ),
    "mnist": IdxSource(title="MNIST", torchvision_class="MNIST"),
}


# --------------------------------------------------------------------------- helpers


def _make_dataset(
    images: np.ndarray,
    labels: np.ndarray,
    index: np.ndarray,
    *,
    num_levels: int,
    num_classes: int,
    name: str,
    split: str,
) -> ImageDataset:
    """Select ``index`` rows (copying, so the cache stays untouched) into an ImageDataset."""
    return ImageDataset(
        torch.from_numpy(np.ascontiguousarray(images[index])),
        torch.from_numpy(labels[index].astype(np.int64)),
        num_levels=num_levels,
        num_classes=num_classes,
        name=name,
        split=split,
        indices=torch.from_numpy(index.astype(np.int64)),
    )


def _official_split(
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    split: str,
    seed: int,
    val_fraction: float,
    name: str,
) -> ImageDataset:
    """A split of a source with an official test set (256 levels, 10 classes).

    val = seeded ``val_fraction`` of the train file, train = the rest; ``all`` lists the train
    file then the test file, and ``indices`` count in that order.
    """
    (train_x, train_y), (test_x, test_y) = train, test
    n_train = len(train_y)
    common = {"num_levels": 256, "num_classes": 10, "name": name, "split": split}
    if split in ("train", "val"):
        index = random_split(n_train, split, seed, val_fraction, 0.0)
        return _make_dataset(train_x, train_y, index, **common)
    if split == "test":
        ds = _make_dataset(test_x, test_y, np.arange(len(test_y)), **common)
        ds.indices += n_train
        return ds
    return _make_dataset(
        np.concatenate([train_x, test_x]),
        np.concatenate([train_y, test_y]),
        np.arange(n_train + len(test_y)),
        **common,
    )


@dataclass(frozen=True)
class _HowToGet:
    """What a missing-data message of a torchvision-backed family says."""

    name: str
    title: str
    needs: str  # the files each searched place must hold
    copy: str  # what to copy into data_root
    torchvision_class: str
    target: Path  # where download=True puts the files
    apt: str | None = None  # an OS package command that installs them, if any

    def message(self, searched: list[str], reason: str = "") -> str:
        lines = [f"{self.title} ({self.name!r}) not found. Searched, in order:"]
        lines += [f"  - {entry}" for entry in searched]
        lines.append(f"Each place needs {self.needs}.")
        if reason:
            lines.append(reason)
        lines.append("To get the data, either:")
        if self.apt:
            lines.append(f"  - install the Debian/Ubuntu package: {self.apt}, or")
        lines.append(
            f"  - with internet access, pass download=True (CLI: --download) to fetch it with "
            f"torchvision.datasets.{self.torchvision_class} into {self.target}, or"
        )
        lines.append(f"  - copy {self.copy} into data_root (CLI: --data-root).")
        return "\n".join(lines)


def _locate(
    places: list[tuple[Path, str]],
    wanted: dict[str, tuple[str, ...]],
    how: _HowToGet,
    fetch: Callable[[], Path] | None,
) -> dict[str, Path]:
    """The files ``wanted`` from the first of ``places`` that holds them all, else ``fetch()``.

    Args:
        places: ``(folder, note)`` pairs searched in order; the note names the place in the
            error message.
        wanted: Role -> candidate file names (see :func:`~.common.find_files`).
        how: The error message's advice.
        fetch: Downloads the files with torchvision and returns their folder; ``None`` when
            downloading was not asked for.

    Raises:
        DatasetNotFoundError: Not found (and not downloaded).
    """
    files, searched = find_files(places, wanted)
    if files is not None:
        return files
    if fetch is None:
        raise DatasetNotFoundError(how.message(searched))
    try:
        folder = fetch()
    except Exception as exc:  # any failure (offline, HTTP, checksum) means "not found"
        reason = f"Download with torchvision failed: {type(exc).__name__}: {exc}"
        raise DatasetNotFoundError(how.message(searched, reason)) from exc
    files, lacked = find_files([(folder, "downloaded")], wanted)
    if files is None:
        reason = f"torchvision finished, but {lacked[0]}."
        raise DatasetNotFoundError(how.message(searched, reason))
    return files


# --------------------------------------------------------------------------- digits


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn import datasets  # start-up time: sklearn pulls scipy

    bunch = datasets.load_digits()
    images = bunch.images.astype(np.uint8)[:, None]  # levels 0..16, exact in float64
    return readonly(images), readonly(bunch.target.astype(np.int64))


def load_digits(split: str, seed: int, val_fraction: float) -> ImageDataset:
    """scikit-learn's 8x8 digits: 1,797 images, 17 levels (0..16), stratified splits.

    test = 20 % of all images, val = ``val_fraction`` of all images taken from the remainder,
    train = the rest; both cuts are stratified by label with ``random_state=seed``.
    """
    check_fractions(val_fraction, TEST_FRACTION)
    images, labels = _digits_arrays()
    if split == "all":
        index = np.arange(len(labels))
    else:
        index = stratified_split(labels, seed, val_fraction, TEST_FRACTION)[split]
    return _make_dataset(
        images, labels, index, num_levels=17, num_classes=10, name="digits", split=split
    )


# --------------------------------------------------------------------------- IDX (MNIST family)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) into a native-endian NumPy array.

    Raises:
        ValueError: If the file is not valid gzip/IDX or its size disagrees with its header.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic; decide by content so a misnamed file still works
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise ValueError(f"{path}: corrupt or truncated gzip stream ({exc})") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(
            f"{path}: IDX header announces shape {shape} ({expected} bytes) but the file "
            f"holds {len(raw)} bytes; the file is truncated or corrupt"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))  # copy: native order, writable, owns memory


@functools.lru_cache(maxsize=4)
def _idx_arrays(
    keys: tuple[tuple[str, int, int], ...],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Parse and check the four IDX files (train/test images/labels) named by ``keys``."""
    arrays = [read_idx(key[0]) for key in keys]
    pairs = (arrays[0], arrays[1]), (arrays[2], arrays[3])
    for (images, labels), key in zip(pairs, (keys[0], keys[2]), strict=True):
        if images.dtype != np.uint8 or images.ndim != 3:
            raise ValueError(f"{key[0]}: expected uint8 N x H x W images, got {images.shape}")
        if labels.ndim != 1 or len(labels) != len(images):
            raise ValueError(f"{key[0]}: {len(images)} images but labels of shape {labels.shape}")
        if labels.size and not 0 <= labels.min() <= labels.max() <= 9:
            raise ValueError(f"{key[0]}: labels outside 0..9")
    return (
        readonly(arrays[0][:, None]),
        readonly(arrays[1].astype(np.int64)),
        readonly(arrays[2][:, None]),
        readonly(arrays[3].astype(np.int64)),
    )


def _idx_search_dirs(source: IdxSource, root: Path) -> list[tuple[Path, str]]:
    """Folders searched in order, with a note for the error message."""
    dirs = [(root, "data_root"), (root / source.torchvision_class / "raw", "torchvision layout")]
    dirs += [(Path(d), "system package") for d in source.system_dirs]
    return dirs


def _locate_idx(name: str, data_root: str | None, download: bool) -> dict[str, Path]:
    """Find (or download) the IDX files of ``name``; raise DatasetNotFoundError otherwise."""
    source = IDX_SOURCES[name]
    root = data_root_path(data_root)
    target = root / source.torchvision_class / "raw"
    apt = None
    if source.apt_package:
        apt = (
            f"sudo apt-get install -y {source.apt_package} "
            f"(puts the files in {', '.join(source.system_dirs)})"
        )
    how = _HowToGet(
        name,
        source.title,
        "the four IDX files " + ", ".join(f"{s}[.gz]" for s in _IDX_FILES.values()),
        "the four files",
        source.torchvision_class,
        target,
        apt,
    )

    def fetch() -> Path:
        import torchvision.datasets  # only to download; torchvision's import is slow

        dataset_cls = getattr(torchvision.datasets, source.torchvision_class)
        # One call downloads train and test files into root/<class>/raw.
        dataset_cls(root=str(root), train=True, download=True)
        return target

    wanted = {role: (stem, f"{stem}.gz") for role, stem in _IDX_FILES.items()}
    return _locate(_idx_search_dirs(source, root), wanted, how, fetch if download else None)


def load_idx_dataset(
    name: str, split: str, data_root: str | None, seed: int, val_fraction: float, download: bool
) -> ImageDataset:
    """MNIST-family dataset: official test file; val = seeded ``val_fraction`` of train file."""
    check_fractions(val_fraction, 0.0)
    files = _locate_idx(name, data_root, download)
    keys = tuple(file_key(files[role]) for role in _IDX_FILES)
    train_x, train_y, test_x, test_y = _idx_arrays(keys)
    return _official_split((train_x, train_y), (test_x, test_y), split, seed, val_fraction, name)


# --------------------------------------------------------------------------- SVHN and CIFAR-10

#: torchvision's SVHN files (``torchvision.datasets.SVHN``): MATLAB arrays ``X`` (32 x 32 x 3 x N)
#: and ``y`` (labels 1..10, 10 meaning the digit 0).
SVHN_FILES: dict[str, str] = {"train": "train_32x32.mat", "test": "test_32x32.mat"}
#: torchvision's CIFAR-10 python batches (``cifar-10-batches-py``), in the order ``all`` lists.
CIFAR10_BATCHES: dict[str, tuple[str, ...]] = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}
_CIFAR10_FOLDER = "cifar-10-batches-py"


def read_svhn_mat(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (uint8 ``N x 3 x 32 x 32``) and labels (0..9) of one of torchvision's SVHN files.

    The label 10 of the original files (Netzer et al. 2011) is the digit 0, mapped to 0 as
    torchvision does.

    Raises:
        ValueError: The file is not a MATLAB file with SVHN's ``X`` and ``y``.
    """
    from scipy.io import loadmat  # scikit-learn's dependency; imported only for SVHN
    from scipy.io.matlab import MatReadError

    path = Path(path)
    try:
        mat = loadmat(path, variable_names=("X", "y"))
    except (MatReadError, OSError, ValueError, TypeError, NotImplementedError) as exc:
        raise ValueError(f"{path}: cannot read as a MATLAB .mat file ({exc})") from exc
    x, y = mat.get("X"), mat.get("y")
    if x is None or y is None:
        raise ValueError(f"{path}: expected SVHN's variables 'X' and 'y', found {sorted(mat)}")
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[2] != 3:
        raise ValueError(f"{path}: 'X' must be uint8 H x W x 3 x N, got {x.dtype} {x.shape}")
    labels = y.reshape(-1).astype(np.int64)
    if len(labels) != x.shape[3]:
        raise ValueError(f"{path}: {x.shape[3]} images but {len(labels)} labels")
    if labels.size and not 1 <= labels.min() <= labels.max() <= 10:
        raise ValueError(f"{path}: labels outside 1..10")
    labels[labels == 10] = 0
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)), labels


# The globals NumPy arrays are unpickled from, under the module names NumPy 1 and 2 write.
_NUMPY_GLOBALS: dict[str, object] = {
    "_reconstruct": np.zeros(0).__reduce__()[0],
    "scalar": np.int64(0).__reduce__()[0],
    "ndarray": np.ndarray,
    "dtype": np.dtype,
}
_NUMPY_MODULES = ("numpy", "numpy.core.multiarray", "numpy._core.multiarray")


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles containers, strings, numbers and NumPy arrays; refuses every other global.

    The CIFAR-10 batches are pickles, and a plain ``pickle.load`` runs whatever callable a
    tampered file names; only the globals NumPy arrays are rebuilt from are resolved here.
    """

    def find_class(self, module: str, name: str) -> object:
        if module in _NUMPY_MODULES and name in _NUMPY_GLOBALS:
            return _NUMPY_GLOBALS[name]
        if (module, name) == ("_codecs", "encode"):  # bytes in Python 3's protocol-2 pickles
            return codecs.encode
        raise pickle.UnpicklingError(f"{module}.{name}")


def read_cifar10_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (uint8 ``N x 3 x 32 x 32``) and labels (0..9) of one CIFAR-10 python batch.

    Rows of the batch's ``data`` hold the red, green and blue 32 x 32 planes in turn
    (Krizhevsky 2009), so they reshape straight to channels-first images.

    Raises:
        ValueError: The file is not a CIFAR-10 batch, or names Python objects other than
            arrays (refused for safety; nothing in it ran).
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            batch = _ArrayUnpickler(f, encoding="latin1").load()  # Python 2 pickles
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"{path}: holds arbitrary Python objects ({exc}), so it was refused for safety; "
            "a CIFAR-10 batch holds only arrays, lists and strings"
        ) from exc
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        raise ValueError(f"{path}: not a CIFAR-10 python batch ({exc!r})") from exc
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: not a CIFAR-10 python batch (a {type(batch).__name__})")
    entries = {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in batch.items()}
    data, labels = entries.get("data"), entries.get("labels")
    if not isinstance(data, np.ndarray) or labels is None:
        raise ValueError(f"{path}: not a CIFAR-10 python batch (needs 'data' and 'labels')")
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: 'data' must be uint8 N x 3072, got {data.dtype} {data.shape}")
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if len(labels) != len(data):
        raise ValueError(f"{path}: {len(data)} images but {len(labels)} labels")
    if labels.size and not 0 <= labels.min() <= labels.max() <= 9:
        raise ValueError(f"{path}: labels outside 0..9")
    return data.reshape(-1, 3, 32, 32), labels


Split = tuple[np.ndarray, np.ndarray]


@functools.lru_cache(maxsize=2)
def _svhn_arrays(keys: tuple[tuple[str, int, int], ...]) -> tuple[Split, Split]:
    """Train and test arrays of SVHN from the two files named by ``keys``."""
    train, test = (read_svhn_mat(key[0]) for key in keys)
    return (readonly(train[0]), readonly(train[1])), (readonly(test[0]), readonly(test[1]))


@functools.lru_cache(maxsize=2)
def _cifar10_arrays(keys: tuple[tuple[str, int, int], ...]) -> tuple[Split, Split]:
    """Train and test arrays of CIFAR-10 from the six batches named by ``keys`` (in order)."""
    batches = [read_cifar10_batch(key[0]) for key in keys]
    n_train = len(CIFAR10_BATCHES["train"])

    def join(part: list[Split]) -> Split:
        return (
            readonly(np.concatenate([x for x, _ in part])),
            readonly(np.concatenate([y for _, y in part])),
        )

    return join(batches[:n_train]), join(batches[n_train:])


def load_svhn(
    split: str, data_root: str | None, seed: int, val_fraction: float, download: bool
) -> ImageDataset:
    """SVHN (Netzer et al. 2011): 3 x 32 x 32, 256 levels, 10 classes; 73,257 train and
    26,032 test images.

    The official test file; val = seeded ``val_fraction`` of the train file (the ``extra`` set
    is not used). Files are searched in ``data_root`` (torchvision's layout: the files directly
    in the folder given to ``torchvision.datasets.SVHN``), then in ``data_root/SVHN``, where
    ``download=True`` puts them.
    """
    check_fractions(val_fraction, 0.0)
    root = data_root_path(data_root)
    target = root / "SVHN"
    how = _HowToGet(
        "svhn",
        "SVHN",
        f"torchvision's SVHN files {' and '.join(SVHN_FILES.values())}",
        "the two .mat files",
        "SVHN",
        target,
    )

    def fetch() -> Path:
        import torchvision.datasets  # only to download; torchvision's import is slow

        for part in SVHN_FILES:
            torchvision.datasets.SVHN(root=str(target), split=part, download=True)
        return target

    places = [(root, "data_root, torchvision layout"), (target, "download folder")]
    wanted = {part: (file,) for part, file in SVHN_FILES.items()}
    files = _locate(places, wanted, how, fetch if download else None)
    train, test = _svhn_arrays((file_key(files["train"]), file_key(files["test"])))
    return _official_split(train, test, split, seed, val_fraction, "svhn")


def load_cifar10(
    split: str, data_root: str | None, seed: int, val_fraction: float, download: bool
) -> ImageDataset:
    """CIFAR-10 (Krizhevsky 2009): 3 x 32 x 32, 256 levels, 10 classes; 50,000 train and
    10,000 test images.

    The official test batch; val = seeded ``val_fraction`` of the five train batches. Batches
    are searched in ``data_root`` itself, then in ``data_root/cifar-10-batches-py``
    (torchvision's layout, where ``download=True`` extracts them).
    """
    check_fractions(val_fraction, 0.0)
    root = data_root_path(data_root)
    target = root / _CIFAR10_FOLDER
    names = [*CIFAR10_BATCHES["train"], *CIFAR10_BATCHES["test"]]
    how = _HowToGet(
        "cifar10",
        "CIFAR-10",
        f"the CIFAR-10 python batches {', '.join(names)}",
        f"the six batch files (or the {_CIFAR10_FOLDER} folder)",
        "CIFAR10",
        target,
    )

    def fetch() -> Path:
        import torchvision.datasets  # only to download; torchvision's import is slow

        # One call downloads the archive and extracts every batch into root/cifar-10-batches-py.
        torchvision.datasets.CIFAR10(root=str(root), train=True, download=True)
        return target

    places = [(root, "data_root"), (target, "torchvision layout")]
    files = _locate(places, {b: (b,) for b in names}, how, fetch if download else None)
    train, test = _cifar10_arrays(tuple(file_key(files[batch]) for batch in names))
    return _official_split(train, test, split, seed, val_fraction, "cifar10")


# --------------------------------------------------------------------------- npz


@functools.lru_cache(maxsize=4)
def _npz_arrays(key: tuple[str, int, int]) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Read and validate ``x``, optional ``y`` and optional ``num_levels`` (default 256)."""
    path = key[0]
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):  # a bare .npy array, not an archive
            raise ValueError("not an .npz archive")
        with archive:
            contents = {k: archive[k] for k in archive.files}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{path}: cannot read as .npz ({exc})") from exc
    if "x" not in contents:
        raise ValueError(
            f"{path}: missing key 'x' (uint8 images N x H x W or N x C x H x W); "
            f"keys present: {sorted(contents)}; optional key 'y' holds integer labels "
            "(-1: unlabelled)"
        )
    x = contents["x"]
    if x.dtype != np.uint8:
        raise ValueError(f"{path}: 'x' must have dtype uint8 (levels 0..255), got {x.dtype}")
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        if x.shape[1] > 4 and x.shape[-1] in (1, 3, 4):
            raise ValueError(
                f"{path}: 'x' of shape {x.shape} looks channels-last; save it as N x C x H x W "
                "(e.g. x.transpose(0, 3, 1, 2))"
            )
    else:
        raise ValueError(
            f"{path}: 'x' must be N x H x W or N x C x H x W, got {x.ndim}-D shape {x.shape}"
        )
    levels = contents.get("num_levels")
    if levels is not None:
        if levels.shape != () or not np.issubdtype(levels.dtype, np.integer):
            raise ValueError(f"{path}: 'num_levels' must be one integer, got {levels!r}")
        if not 2 <= int(levels) <= 256 or (x.size and int(x.max()) >= int(levels)):
            raise ValueError(
                f"{path}: 'num_levels' = {int(levels)} must lie in 2..256 and exceed every value "
                f"of 'x' (max {int(x.max()) if x.size else 0})"
            )
    y = contents.get("y")
    if y is not None:
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"{path}: 'y' must hold integer labels, got dtype {y.dtype}")
        if y.shape != (len(x),):
            raise ValueError(f"{path}: 'y' must have shape ({len(x)},), got {y.shape}")
        if y.size and y.min() < -1:
            raise ValueError(
                f"{path}: 'y' must hold class indices 0, 1, ... or -1 (unlabelled), got min "
                f"{y.min()}"
            )
        y = readonly(y.astype(np.int64))
    num_levels = 256 if levels is None else int(levels)
    return readonly(np.ascontiguousarray(x)), y, num_levels


def load_npz(
    spec: str, split: str, data_root: str | None, seed: int, val_fraction: float
) -> ImageDataset:
    """Images from ``npz:PATH``; seeded random split test 20 % / val / train."""
    check_fractions(val_fraction, TEST_FRACTION)
    path, tried = find_data_path(spec, data_root, Path.is_file, "/path/to/file.npz")
    if path is None:
        raise DatasetNotFoundError(
            f"npz file not found (tried: {', '.join(map(str, tried))}). Create it with "
            "numpy.savez(path, x=uint8 images N x H x W or N x C x H x W, y=integer labels)."
        )
    x, y, num_levels = _npz_arrays(file_key(path))
    n = len(x)
    labels = np.full(n, -1, dtype=np.int64) if y is None else y
    num_classes = 0 if y is None or y.size == 0 else max(int(y.max()) + 1, 0)
    index = random_split(n, split, seed, val_fraction, TEST_FRACTION)
    return _make_dataset(
        x, labels, index, num_levels=num_levels, num_classes=num_classes, name=spec, split=split
    )


# --------------------------------------------------------------------------- synthetic

#: Examples per split of ``synthetic:`` sets; fixed (``val_fraction`` is ignored), small enough
#: for smoke runs of the recipes.
SYNTHETIC_SIZES: dict[str, int] = {"train": 256, "val": 64, "test": 64}
_SYNTHETIC_MAX_VALUES = 2**18  # per image: 3 x 256 x 256 at most, so a set stays < 100 MB
_SYNTHETIC_FORM = re.compile(r"(\d+)[x×](\d+)[x×](\d+)(?::(\d+))?(?::(\d+))?")


def parse_synthetic(spec: str) -> tuple[tuple[int, int, int], int, int]:
    """``(C, H, W), levels, classes`` of ``synthetic:CxHxW[:LEVELS[:CLASSES]]``.

    Raises:
        ValueError: The spec does not read ``synthetic:CxHxW``, or a value is out of range.
    """
    body = spec.partition(":")[2]
    match = _SYNTHETIC_FORM.fullmatch(body)
    if match is None:
        raise ValueError(
            f"{spec!r}: expected 'synthetic:CxHxW[:LEVELS[:CLASSES]]', e.g. 'synthetic:1x28x28' "
            "or 'synthetic:3x32x32:256:10' (defaults: 256 levels, 10 classes)"
        )
    c, h, w = (int(match[i]) for i in (1, 2, 3))
    levels = int(match[4]) if match[4] is not None else 256
    classes = int(match[5]) if match[5] is not None else 10
    if min(c, h, w) < 1 or c * h * w > _SYNTHETIC_MAX_VALUES:
        raise ValueError(
            f"{spec!r}: C, H and W must be >= 1 with C*H*W <= {_SYNTHETIC_MAX_VALUES:,}, "
            f"got {c}x{h}x{w}"
        )
    if not 2 <= levels <= 256:
        raise ValueError(f"{spec!r}: LEVELS must lie in 2..256, got {levels}")
    return (c, h, w), levels, classes


def load_synthetic(spec: str, split: str, seed: int) -> ImageDataset:
    """Random images for smoke runs: ``synthetic:CxHxW[:LEVELS[:CLASSES]]``.

    Every pixel is a uniform level and every label a uniform class (``CLASSES`` = 0: unlabelled,
    label -1), drawn from NumPy's legacy generator seeded by ``(seed, split)``, so a split is the
    same on every machine and call. Sizes are :data:`SYNTHETIC_SIZES`; ``all`` is train, val and
    test in that order.
    """
    shape, levels, classes = parse_synthetic(spec)
    parts = list(SYNTHETIC_SIZES) if split == "all" else [split]
    offsets = dict(zip(SYNTHETIC_SIZES, np.cumsum([0, *SYNTHETIC_SIZES.values()]), strict=False))
    images, labels, indices = [], [], []
    for part in parts:
        n = SYNTHETIC_SIZES[part]
        rng = np.random.RandomState([seed, list(SYNTHETIC_SIZES).index(part)])
        images.append(rng.randint(0, levels, size=(n, *shape)).astype(np.uint8))
        y = rng.randint(0, classes, size=n) if classes > 0 else np.full(n, -1)
        labels.append(y.astype(np.int64))
        indices.append(offsets[part] + np.arange(n))
    return ImageDataset(
        torch.from_numpy(np.concatenate(images)),
        torch.from_numpy(np.concatenate(labels)),
        num_levels=levels,
        num_classes=classes,
        name=spec,
        split=split,
        indices=torch.from_numpy(np.concatenate(indices)),
    )
