"""Image dataset families held in memory as integer pixel levels: digits, the MNIST family, npz.

Images are stored as uint8 ``N x C x H x W`` tensors of *levels* ``0..num_levels-1``; the
dequantisation and scaling to floats belong to the model, not to the data. Splits are fixed and
seeded (see :mod:`hybridflow.data.common`). Load them by name with
:func:`hybridflow.data.load_dataset`, which dispatches to the loaders here.

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

from hybridflow.data.common import (
    DEFAULT_DATA_ROOT,
    TEST_FRACTION,
    DatasetNotFoundError,
    ImageDataset,
    check_fractions,
    dataset_tensors,
    file_key,
    random_split,
    readonly,
    stratified_split,
)

__all__ = [
    "DEFAULT_DATA_ROOT",
    "IDX_SOURCES",
    "TEST_FRACTION",
    "DatasetNotFoundError",
    "IdxSource",
    "ImageDataset",
    "dataset_tensors",
    "load_digits",
    "load_idx_dataset",
    "load_npz",
    "read_idx",
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


# --------------------------------------------------------------------------- digits


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn import datasets

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


def load_idx_dataset(
    name: str, split: str, data_root: str | None, seed: int, val_fraction: float, download: bool
) -> ImageDataset:
    """MNIST-family dataset: official test file; val = seeded ``val_fraction`` of train file."""
    check_fractions(val_fraction, 0.0)
    files = _locate_idx(name, data_root, download)
    keys = tuple(file_key(files[role]) for role in _IDX_FILES)
    train_x, train_y, test_x, test_y = _idx_arrays(keys)
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
    x, y, num_levels = _npz_arrays(file_key(path))
    n = len(x)
    labels = np.full(n, -1, dtype=np.int64) if y is None else y
    num_classes = 0 if y is None or y.size == 0 else max(int(y.max()) + 1, 0)
    index = random_split(n, split, seed, val_fraction, TEST_FRACTION)
    return _make_dataset(
        x, labels, index, num_levels=num_levels, num_classes=num_classes, name=spec, split=split
    )
