"""Image datasets held in memory as integer pixel levels, and the :func:`load_dataset` entry point.

Images are stored as uint8 ``N x C x H x W`` tensors of *levels* ``0..num_levels-1``; the
dequantisation and scaling to floats belong to the model, not to the data. Splits are fixed and
seeded: the same ``seed`` gives the same split on every machine (index choices use NumPy's
legacy ``RandomState`` and scikit-learn, whose streams are frozen across versions), and the
train/val/test splits of one seed never overlap.

Parsed source files are cached per process (keyed by path, modification time and size), so
loading ``train``, ``val`` and ``test`` in turn reads each file once.
"""

from __future__ import annotations

import functools
import gzip
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from hybridflow.data.toy import (
    TOY_DATASETS,
    PointDataset,
    ToyDataset,
    check_split,
    make_toy_dataset,
)

__all__ = [
    "DEFAULT_DATA_ROOT",
    "IDX_SOURCES",
    "TEST_FRACTION",
    "DatasetNotFoundError",
    "IdxSource",
    "ImageDataset",
    "available_datasets",
    "dataset_tensors",
    "load_dataset",
    "read_idx",
]

DEFAULT_DATA_ROOT = "~/.cache/hybridflow"
# Share of all examples held out as test set for sources without an official test split.
TEST_FRACTION = 0.2

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


class DatasetNotFoundError(FileNotFoundError):
    """The data files of a dataset are not on this machine; the message says how to get them."""


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


class ImageDataset(Dataset):
    """Integer-level images with labels, held in memory.

    Attributes:
        images: uint8 ``N x C x H x W`` with values in ``0..num_levels-1``.
        labels: int64 ``N``; all -1 when the source has no labels.
        num_levels: Size of the pixel alphabet (17 for ``digits``, 256 otherwise); bits/dim
            must be computed on this alphabet.
        num_classes: Number of classes (0 when unlabelled).
        name: Dataset name, e.g. ``"digits"`` or ``"npz:/path/file.npz"``.
        split: One of ``train``, ``val``, ``test``, ``all``.
        indices: int64 ``N``, position of each example in the ``all`` split of the same source
            (``all`` lists the train file then the test file where a source has both).
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        *,
        num_levels: int,
        num_classes: int,
        name: str,
        split: str,
        indices: Tensor | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(
                f"images must be uint8 N x C x H x W, got {images.dtype} {tuple(images.shape)}"
            )
        if labels.shape != (images.shape[0],):
            raise ValueError("labels must be a 1-D tensor with one entry per image")
        if not 2 <= num_levels <= 256:
            raise ValueError(f"num_levels must be in 2..256, got {num_levels}")
        if images.numel() and int(images.max()) >= num_levels:
            raise ValueError(f"pixel values exceed the alphabet of {num_levels} levels")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.num_levels = num_levels
        self.num_classes = num_classes
        self.name = name
        self.split = split
        self.indices = torch.arange(images.shape[0]) if indices is None else indices.to(torch.int64)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape of one image: ``(C, H, W)``."""
        c, h, w = self.images.shape[1:]
        return (c, h, w)

    @property
    def dim(self) -> int:
        """Number of pixels times channels of one image."""
        c, h, w = self.shape
        return c * h * w

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.labels[index]

    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.name!r}, split={self.split!r}, n={len(self)}, "
            f"shape={self.shape}, num_levels={self.num_levels})"
        )


# --------------------------------------------------------------------------- helpers


def _file_key(path: Path) -> tuple[str, int, int]:
    """Cache key of a file: resolved path plus mtime and size, so edited files are re-read."""
    st = path.stat()
    return (str(path.resolve()), st.st_mtime_ns, st.st_size)


def _readonly(array: np.ndarray) -> np.ndarray:
    """Freeze a cached array so that no caller can silently corrupt the cache."""
    array.setflags(write=False)
    return array


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


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    """Validate ``val_fraction`` so that train keeps at least part of the data."""
    if not 0.0 <= val_fraction < 1.0 - test_fraction:
        raise ValueError(
            f"val_fraction must be in [0, {1.0 - test_fraction:g}) so that the train split is "
            f"not empty, got {val_fraction}"
        )


def _random_split(
    n: int, split: str, seed: int, val_fraction: float, test_fraction: float
) -> np.ndarray:
    """Sorted indices of ``split`` from one seeded permutation of ``range(n)``."""
    if split == "all":
        return np.arange(n)
    perm = np.random.RandomState(seed).permutation(n)
    n_test = round(test_fraction * n)
    n_val = round(val_fraction * n)
    parts = {
        "test": perm[:n_test],
        "val": perm[n_test : n_test + n_val],
        "train": perm[n_test + n_val :],
    }
    return np.sort(parts[split])


# --------------------------------------------------------------------------- digits


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images.astype(np.uint8)[:, None]  # levels 0..16, exact in float64
    return _readonly(images), _readonly(bunch.target.astype(np.int64))


def _load_digits(split: str, seed: int, val_fraction: float) -> ImageDataset:
    """scikit-learn's 8x8 digits: 1,797 images, 17 levels (0..16), stratified splits.

    test = 20 % of all images, val = ``val_fraction`` of all images taken from the remainder,
    train = the rest; both cuts are stratified by label with ``random_state=seed``.
    """
    from sklearn.model_selection import train_test_split

    _check_fractions(val_fraction, TEST_FRACTION)
    images, labels = _digits_arrays()
    n = len(labels)
    if split == "all":
        index = np.arange(n)
    else:
        rest, test = train_test_split(
            np.arange(n), test_size=TEST_FRACTION, random_state=seed, stratify=labels
        )
        n_val = round(val_fraction * n)
        if n_val > 0:
            train, val = train_test_split(
                rest, test_size=n_val, random_state=seed, stratify=labels[rest]
            )
        else:
            train, val = rest, rest[:0]
        index = np.sort({"train": train, "val": val, "test": test}[split])
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
        _readonly(arrays[0][:, None]),
        _readonly(arrays[1].astype(np.int64)),
        _readonly(arrays[2][:, None]),
        _readonly(arrays[3].astype(np.int64)),
    )


def _idx_files_in(folder: Path) -> tuple[dict[str, Path] | None, list[str]]:
    """The four IDX files in ``folder`` (raw preferred to ``.gz``), or None and what is missing."""
    found: dict[str, Path] = {}
    missing: list[str] = []
    for role, stem in _IDX_FILES.items():
        for candidate in (folder / stem, folder / f"{stem}.gz"):
            if candidate.is_file():
                found[role] = candidate
                break
        else:
            missing.append(f"{stem}[.gz]")
    return (found if not missing else None), missing


def _idx_search_dirs(source: IdxSource, root: Path) -> list[tuple[Path, str]]:
    """Folders searched in order, with a note for the error message."""
    dirs = [(root, "data_root"), (root / source.torchvision_class / "raw", "torchvision layout")]
    dirs += [(Path(d), "system package") for d in source.system_dirs]
    return dirs


def _not_found_message(
    name: str, source: IdxSource, root: Path, searched: list[str], reason: str = ""
) -> str:
    lines = [f"{source.title} ({name!r}) not found. Searched, in order:"]
    lines += [f"  - {entry}" for entry in searched]
    lines.append(
        "Each place needs the four IDX files "
        + ", ".join(f"{s}[.gz]" for s in _IDX_FILES.values())
        + "."
    )
    if reason:
        lines.append(reason)
    lines.append("To get the data, either:")
    if source.apt_package:
        lines.append(
            f"  - install the Debian/Ubuntu package: sudo apt-get install -y {source.apt_package} "
            f"(puts the files in {', '.join(source.system_dirs)}), or"
        )
    lines.append(
        f"  - with internet access, pass download=True (CLI: --download) to fetch it with "
        f"torchvision.datasets.{source.torchvision_class} into {root / source.torchvision_class}"
        f"/raw, or"
    )
    lines.append("  - copy the four files into data_root (CLI: --data-root).")
    return "\n".join(lines)


def _locate_idx(name: str, data_root: str | None, download: bool) -> dict[str, Path]:
    """Find (or download) the IDX files of ``name``; raise DatasetNotFoundError otherwise."""
    source = IDX_SOURCES[name]
    root = Path(data_root or DEFAULT_DATA_ROOT).expanduser()
    searched: list[str] = []
    for folder, note in _idx_search_dirs(source, root):
        files, missing = _idx_files_in(folder)
        if files is not None:
            return files
        if not folder.is_dir():
            searched.append(f"{folder} ({note}): no such directory")
        else:
            searched.append(f"{folder} ({note}): missing {', '.join(missing)}")
    if not download:
        raise DatasetNotFoundError(_not_found_message(name, source, root, searched))
    try:
        import torchvision.datasets

        dataset_cls = getattr(torchvision.datasets, source.torchvision_class)
        # One call downloads train and test files into root/<class>/raw.
        dataset_cls(root=str(root), train=True, download=True)
    except Exception as exc:  # any failure (offline, HTTP, checksum) means "not found"
        reason = f"Download with torchvision failed: {type(exc).__name__}: {exc}"
        raise DatasetNotFoundError(
            _not_found_message(name, source, root, searched, reason)
        ) from exc
    folder = root / source.torchvision_class / "raw"
    files, missing = _idx_files_in(folder)
    if files is None:
        reason = f"torchvision finished but {folder} still misses {', '.join(missing)}."
        raise DatasetNotFoundError(_not_found_message(name, source, root, searched, reason))
    return files


def _load_idx_dataset(
    name: str, split: str, data_root: str | None, seed: int, val_fraction: float, download: bool
) -> ImageDataset:
    """MNIST-family dataset: official test file; val = seeded ``val_fraction`` of train file."""
    _check_fractions(val_fraction, 0.0)
    files = _locate_idx(name, data_root, download)
    keys = tuple(_file_key(files[role]) for role in _IDX_FILES)
    train_x, train_y, test_x, test_y = _idx_arrays(keys)
    n_train = len(train_y)
    common = {"num_levels": 256, "num_classes": 10, "name": name, "split": split}
    if split in ("train", "val"):
        index = _random_split(n_train, split, seed, val_fraction, 0.0)
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
            f"keys present: {sorted(contents)}; optional key 'y' holds integer labels"
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
        if y.size and y.min() < 0:
            raise ValueError(f"{path}: 'y' must hold non-negative labels, got min {y.min()}")
        y = _readonly(y.astype(np.int64))
    num_levels = 256 if levels is None else int(levels)
    return _readonly(np.ascontiguousarray(x)), y, num_levels


def _load_npz(
    spec: str, split: str, data_root: str | None, seed: int, val_fraction: float
) -> ImageDataset:
    """Images from ``npz:PATH``; seeded random split test 20 % / val / train."""
    _check_fractions(val_fraction, TEST_FRACTION)
    raw_path = spec[len("npz:") :]
    if not raw_path:
        raise ValueError("npz dataset needs a path: use 'npz:/path/to/file.npz'")
    path = Path(raw_path).expanduser()
    tried = [path]
    if not path.is_file() and not path.is_absolute() and data_root:
        path = Path(data_root).expanduser() / path
        tried.append(path)
    if not path.is_file():
        raise DatasetNotFoundError(
            f"npz file not found (tried: {', '.join(map(str, tried))}). Create it with "
            "numpy.savez(path, x=uint8 images N x H x W or N x C x H x W, y=integer labels)."
        )
    x, y, num_levels = _npz_arrays(_file_key(path))
    n = len(x)
    labels = np.full(n, -1, dtype=np.int64) if y is None else y
    num_classes = 0 if y is None or y.size == 0 else int(y.max()) + 1
    index = _random_split(n, split, seed, val_fraction, TEST_FRACTION)
    return _make_dataset(
        x, labels, index, num_levels=num_levels, num_classes=num_classes, name=spec, split=split
    )


# --------------------------------------------------------------------------- entry points


def available_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset` (``npz:PATH`` takes a file path)."""
    from hybridflow.data.tabular import TABULAR_DATASETS  # tabular imports this module

    toys = [f"toy:{t}" for t in TOY_DATASETS]
    from hybridflow.data.derived import DERIVED_KINDS

    derived = [f"{kind}:BASE" for kind in DERIVED_KINDS]
    return ["digits", "fashion-mnist", "mnist", "npz:PATH", *toys, *TABULAR_DATASETS, *derived]


def load_dataset(
    name: str,
    split: str = "train",
    *,
    data_root: str | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    download: bool = False,
) -> ImageDataset | ToyDataset:
    """Load a dataset split into memory.

    Args:
        name: ``digits`` (17 levels), ``fashion-mnist``, ``mnist``, ``npz:PATH``, ``toy:NAME``,
            a tabular set (``uci:NAME``, ``sk:NAME``; see :mod:`hybridflow.data.tabular`) or an
            OOD set made in code (``noise:BASE``, ``inverted:BASE``, ...; see
            :mod:`hybridflow.data.derived`); see :func:`available_datasets`.
        split: ``train``, ``val``, ``test`` or ``all`` (every example; train then test file
            where the source has both).
        data_root: Folder searched first for IDX files (then its torchvision layout
            ``<Class>/raw``) and download target, and the folder of the UCI files; defaults to
            ``~/.cache/hybridflow``.
            Relative npz paths that do not exist are also tried under it.
        seed: Seed of the split (non-negative integer); same seed, same split everywhere.
        val_fraction: Share of the examples used for validation: of all examples for
            ``digits``/npz (test is 20 % of all), of the 60,000 train images for the MNIST
            family. Ignored by toy datasets, whose sizes are fixed.
        download: Fetch MNIST/Fashion-MNIST with torchvision (needs internet) if not found.

    Raises:
        ValueError: Unknown name or split, bad fraction or seed, malformed files.
        DatasetNotFoundError: The files are absent; the message says how to get them.
    """
    check_split(split)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    seed = int(seed)
    if name == "digits":
        return _load_digits(split, seed, val_fraction)
    if name in IDX_SOURCES:
        return _load_idx_dataset(name, split, data_root, seed, val_fraction, download)
    if name.startswith("npz:"):
        return _load_npz(name, split, data_root, seed, val_fraction)
    if name.startswith("toy:") and name[4:] in TOY_DATASETS:
        return make_toy_dataset(name, split, seed)
    kind = name.partition(":")[0]
    if kind in ("noise", "constant", "photos", "inverted", "hflip", "vflip") and ":" in name:
        from hybridflow.data.derived import load_derived  # derived imports this module

        return load_derived(
            name,
            split,
            data_root=data_root,
            seed=seed,
            val_fraction=val_fraction,
            download=download,
        )
    if name.startswith(("uci:", "sk:")):
        from hybridflow.data.tabular import load_tabular

        return load_tabular(name, split, root=data_root, seed=seed, val_fraction=val_fraction)
    raise ValueError(
        f"unknown dataset {name!r}; valid choices are {', '.join(available_datasets())}"
    )


def dataset_tensors(dataset) -> tuple[Tensor, Tensor]:
    """The ``(inputs, labels)`` tensors of an in-memory dataset: images, toy or tabular points."""
    if isinstance(dataset, ImageDataset):
        return dataset.images, dataset.labels
    if isinstance(dataset, PointDataset):
        return dataset.points, dataset.labels
    raise TypeError(
        f"expected an ImageDataset, ToyDataset or TabularDataset, got {type(dataset).__name__}"
    )
