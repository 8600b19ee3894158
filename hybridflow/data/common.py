"""What every dataset family shares: the in-memory containers, errors, argument checks and splits.

This is the bottom layer of :mod:`hybridflow.data`: it imports no sibling module, the families
(:mod:`~hybridflow.data.images`, :mod:`~hybridflow.data.toy`, :mod:`~hybridflow.data.tabular`,
:mod:`~hybridflow.data.derived`) import it, and :mod:`~hybridflow.data.registry` sits on top.

Splits are fixed and seeded: the same ``seed`` gives the same split on every machine (index
choices use NumPy's legacy ``RandomState`` and scikit-learn, whose streams are frozen across
versions), and the train/val/test splits of one seed never overlap.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from hybridflow.naming import closest_name

__all__ = [
    "DEFAULT_DATA_ROOT",
    "SPLITS",
    "TEST_FRACTION",
    "DatasetNotFoundError",
    "ImageDataset",
    "PointDataset",
    "UnknownDatasetError",
    "check_fractions",
    "check_seed",
    "check_split",
    "data_root_path",
    "dataset_tensors",
    "file_key",
    "find_data_path",
    "find_files",
    "random_split",
    "readonly",
    "stratified_split",
    "unknown_dataset_error",
]

DEFAULT_DATA_ROOT = "~/.cache/hybridflow"
# Share of all examples held out as test set for sources without an official test split.
TEST_FRACTION = 0.2
SPLITS: tuple[str, ...] = ("train", "val", "test", "all")


# --------------------------------------------------------------------------- errors


class DatasetNotFoundError(FileNotFoundError):
    """The data files of a dataset are not on this machine; the message says how to get them."""


class UnknownDatasetError(ValueError):
    """A dataset name no loader accepts; ``suggestion`` is the closest valid name (or None).

    Built by :func:`unknown_dataset_error`. The attributes are set after construction, so the
    exception pickles (e.g. out of a sweep worker process) like a plain ``ValueError``.
    """

    name: str = ""
    suggestion: str | None = None
    valid: tuple[str, ...] = ()


def unknown_dataset_error(
    name: str,
    valid: Sequence[str],
    *,
    candidates: Sequence[str] | None = None,
    kind: str = "dataset",
) -> UnknownDatasetError:
    """``unknown KIND 'NAME'; did you mean 'X'? (valid: ...)``, listing ``valid`` in order.

    Args:
        name: The name that was refused.
        valid: Every valid name, as listed to the user (patterns such as ``npz:PATH`` allowed).
        candidates: Concrete names the suggestion is drawn from; defaults to ``valid``.
        kind: What the name names, e.g. ``"dataset"`` or ``"toy dataset"``.
    """
    suggestion = closest_name(name, valid if candidates is None else candidates)
    hint = f"; did you mean {suggestion!r}?" if suggestion is not None else ""
    error = UnknownDatasetError(f"unknown {kind} {name!r}{hint} (valid: {', '.join(valid)})")
    error.name, error.suggestion, error.valid = name, suggestion, tuple(valid)
    return error


# --------------------------------------------------------------------------- argument checks


def check_split(split: str) -> str:
    """Return ``split`` if it is a valid split name, else raise ``ValueError``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits are {', '.join(SPLITS)}")
    return split


def check_seed(seed: int) -> int:
    """Return ``seed`` as an ``int`` if it is an integer in ``[0, 2**32)``, else raise."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    return int(seed)


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """Validate ``val_fraction`` so that train keeps at least part of the data."""
    if not 0.0 <= val_fraction < 1.0 - test_fraction:
        raise ValueError(
            f"val_fraction must be in [0, {1.0 - test_fraction:g}) so that the train split is "
            f"not empty, got {val_fraction}"
        )


# --------------------------------------------------------------------------- containers


class ImageDataset(Dataset):
    """Integer-level images with labels, held in memory.

    Attributes:
        in_memory: Always ``True``: :func:`dataset_tensors` returns the whole split at once
            (file-backed datasets such as ``folder:PATH`` set it to ``False``).
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

    in_memory: bool = True

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


class PointDataset(Dataset):
    """Continuous points ``N x D`` with labels, held in memory (toy and tabular datasets).

    Attributes:
        in_memory: Always ``True`` (see :class:`ImageDataset`).
        points: float32 ``N x D``.
        labels: int64 ``N`` (class index, or -1 when unknown).
        num_levels: Always ``None`` (continuous data).
        num_classes: Number of classes (0 when unlabelled).
        name: Dataset name.
        split: One of ``train``, ``val``, ``test``, ``all``.
        indices: int64 ``N``, position of each point in the ``all`` split of the same source.
    """

    in_memory: bool = True

    def __init__(
        self,
        points: Tensor,
        labels: Tensor,
        *,
        name: str,
        split: str,
        num_classes: int,
        indices: Tensor | None = None,
    ) -> None:
        if points.dtype != torch.float32 or points.ndim != 2:
            raise ValueError(
                f"points must be float32 N x D, got {points.dtype} {tuple(points.shape)}"
            )
        if labels.shape != (points.shape[0],):
            raise ValueError("labels must be a 1-D tensor with one entry per point")
        if indices is not None and indices.shape != (points.shape[0],):
            raise ValueError("indices must be a 1-D tensor with one entry per point")
        self.points = points
        self.labels = labels.to(torch.int64)
        self.num_levels: int | None = None
        self.num_classes = num_classes
        self.name = name
        self.split = split
        self.indices = torch.arange(points.shape[0]) if indices is None else indices.to(torch.int64)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one example: ``(D,)``."""
        return (self.points.shape[1],)

    @property
    def dim(self) -> int:
        """Number of dimensions of one example: ``D``."""
        return self.points.shape[1]

    def __len__(self) -> int:
        return self.points.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.points[index], self.labels[index]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, n={len(self)}, "
            f"dim={self.dim})"
        )


def dataset_tensors(dataset: Dataset) -> tuple[Tensor, Tensor]:
    """The ``(inputs, labels)`` tensors of an in-memory dataset: images, toy or tabular points.

    Raises:
        TypeError: ``dataset`` is file-backed (``in_memory`` is ``False``, e.g. ``folder:PATH``)
            or not a hybridflow dataset.
    """
    if getattr(dataset, "in_memory", True) is False:
        # Stacking a file-backed split would decode every image at once: the very thing such
        # datasets exist to avoid. Their readers take one example at a time.
        raise TypeError(
            f"dataset {getattr(dataset, 'name', type(dataset).__name__)!r} "
            f"({getattr(dataset, 'split', '?')} split, {len(dataset)} examples) is file-backed "
            "(in_memory = False) and is not loaded into one tensor; read it example by example "
            "(dataset[i] -> (uint8 C x H x W image, label)), e.g. through a "
            "torch.utils.data.DataLoader"
        )
    if isinstance(dataset, ImageDataset):
        return dataset.images, dataset.labels
    if isinstance(dataset, PointDataset):
        return dataset.points, dataset.labels
    raise TypeError(
        f"expected an ImageDataset, ToyDataset or TabularDataset, got {type(dataset).__name__}"
    )


# --------------------------------------------------------------------------- file lookup


def find_data_path(
    spec: str, data_root: str | None, exists: Callable[[Path], bool], example: str
) -> tuple[Path | None, list[Path]]:
    """The ``PATH`` of ``KIND:PATH`` (``~`` expanded) if it ``exists``, else ``data_root/PATH``
    for a relative ``PATH``.

    Returns the path found (``None`` if neither exists) and every path tried, for the message
    of the caller's :class:`DatasetNotFoundError`.

    Raises:
        ValueError: ``spec`` has no path (the message shows ``KIND:example``).
    """
    kind, _, raw = spec.partition(":")
    if not raw:
        raise ValueError(f"{kind} dataset needs a path: use '{kind}:{example}'")
    path = Path(raw).expanduser()
    tried = [path]
    if not exists(path) and not path.is_absolute() and data_root:
        path = Path(data_root).expanduser() / path
        tried.append(path)
    return (path if exists(path) else None), tried


# --------------------------------------------------------------------------- locating files


def data_root_path(data_root: str | None) -> Path:
    """The data folder: ``data_root``, or :data:`DEFAULT_DATA_ROOT`, with ``~`` expanded."""
    return Path(data_root or DEFAULT_DATA_ROOT).expanduser()


def _files_in(
    folder: Path, wanted: dict[str, tuple[str, ...]]
) -> tuple[dict[str, Path] | None, list[str]]:
    """The first existing candidate of every role in ``folder``, or None and what is missing.

    ``wanted`` maps a role to its file names, preferred first; a missing role is reported by
    its first name, with ``[.gz]`` where the second name is its gzip copy.
    """
    found: dict[str, Path] = {}
    missing: list[str] = []
    for role, names in wanted.items():
        for candidate in names:
            if (folder / candidate).is_file():
                found[role] = folder / candidate
                break
        else:
            gz = len(names) > 1 and names[1] == f"{names[0]}.gz"
            missing.append(f"{names[0]}[.gz]" if gz else names[0])
    return (found if not missing else None), missing


def find_files(
    places: list[tuple[Path, str]], wanted: dict[str, tuple[str, ...]]
) -> tuple[dict[str, Path] | None, list[str]]:
    """The files ``wanted`` from the first of ``places`` that holds them all.

    Args:
        places: ``(folder, note)`` pairs searched in order; the note names the place in the
            lines returned for an error message.
        wanted: Role -> candidate file names, preferred first (``("x.idx", "x.idx.gz")``).

    Returns:
        Role -> path (``None`` if no place holds them all), and one line per place searched
        saying what it lacked, for the caller's "not found" message.
    """
    searched: list[str] = []
    for folder, note in places:
        files, missing = _files_in(folder, wanted)
        if files is not None:
            return files, searched
        if not folder.is_dir():
            searched.append(f"{folder} ({note}): no such directory")
        else:
            searched.append(f"{folder} ({note}): missing {', '.join(missing)}")
    return None, searched


# --------------------------------------------------------------------------- file cache helpers


def file_key(path: Path) -> tuple[str, int, int]:
    """Cache key of a file: resolved path plus mtime and size, so edited files are re-read."""
    st = path.stat()
    return (str(path.resolve()), st.st_mtime_ns, st.st_size)


def readonly(array: np.ndarray) -> np.ndarray:
    """Freeze a cached array so that no caller can silently corrupt the cache."""
    array.setflags(write=False)
    return array


# --------------------------------------------------------------------------- splits


def random_split(
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


def stratified_split(
    labels: np.ndarray, seed: int, val_fraction: float, test_fraction: float = TEST_FRACTION
) -> dict[str, np.ndarray]:
    """Sorted indices of train/val/test, both cuts stratified by label.

    test = ``test_fraction`` of all examples, val = ``val_fraction`` of all examples taken from
    the remainder, train = the rest; both cuts use scikit-learn with ``random_state=seed``.
    """
    from sklearn.model_selection import train_test_split  # start-up time: sklearn pulls scipy

    n = len(labels)
    rest, test = train_test_split(
        np.arange(n), test_size=test_fraction, random_state=seed, stratify=labels
    )
    n_val = round(val_fraction * n)
    if n_val > 0:
        train, val = train_test_split(
            rest, test_size=n_val, random_state=seed, stratify=labels[rest]
        )
    else:
        train, val = rest, rest[:0]
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}
