"""File-backed image datasets: a torchvision ``ImageFolder`` tree, decoded one image at a time.

``folder:PATH`` names a tree laid out as ``torchvision.datasets.ImageFolder`` reads it,
``PATH/<class>/.../<image>``, for datasets larger than memory. Images stay on disk: the dataset
holds file names and labels, and ``dataset[i]`` decodes image ``i`` with PIL into a uint8
``C x H x W`` tensor of levels ``0..255``. So :attr:`ImageFolderDataset.in_memory` is ``False``
and :func:`~hybridflow.data.common.dataset_tensors` refuses it: read it through a
``torch.utils.data.DataLoader``.

Splits: with both ``PATH/train`` and ``PATH/test`` (each an ImageFolder tree, the test classes a
subset of the train classes), test is ``PATH/test`` and val a seeded ``val_fraction`` of
``PATH/train``, as for MNIST; otherwise the whole tree is split at random like an npz file (test
20 %, val ``val_fraction``, train the rest). Classes are the sorted folder names, and images are
listed in ``ImageFolder``'s order (class by class, files sorted), so example ``i`` of the ``all``
split of a single tree is ``ImageFolder(PATH)[i]``.

All images must share one size and one mode, ``L`` (1 channel) or ``RGB`` (3 channels): the
headers of every file are read when a tree is first loaded in a process (PIL reads a few bytes per
file, not the pixels), and each decoded image is checked again.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from hybridflow.data.common import (
    TEST_FRACTION,
    DatasetNotFoundError,
    check_fractions,
    find_data_path,
    random_split,
)

__all__ = ["FOLDER_MODES", "IMAGE_EXTENSIONS", "ImageFolderDataset", "load_folder"]

#: Image modes accepted, and the number of channels each becomes.
FOLDER_MODES: dict[str, int] = {"L": 1, "RGB": 3}
#: File extensions read as images (torchvision's ``IMG_EXTENSIONS``), case-insensitive.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_LAYOUT = (
    "lay it out as torchvision's ImageFolder: PATH/<class>/<image>.png (or .jpg, ...), "
    "optionally split as PATH/train/<class>/... and PATH/test/<class>/..."
)


class ImageFolderDataset(Dataset):
    """Integer-level images read from files on demand (``folder:PATH``).

    Attributes:
        in_memory: Always ``False``: read examples with ``dataset[i]`` (e.g. a DataLoader).
        files: Path of every example's image file.
        labels: int64 ``N``, the class index of every example.
        classes: Class names (folder names), indexed by label.
        num_levels: 256 (8-bit images).
        num_classes: Number of classes.
        name: ``folder:PATH`` as given.
        split: One of ``train``, ``val``, ``test``, ``all``.
        indices: int64 ``N``, position of each example in the ``all`` split.
        mode: PIL mode of every image, ``"L"`` or ``"RGB"``.
    """

    in_memory: bool = False

    def __init__(
        self,
        files: Sequence[str],
        labels: Tensor,
        *,
        classes: Sequence[str],
        image_size: tuple[int, int],
        mode: str,
        name: str,
        split: str,
        indices: Tensor,
    ) -> None:
        if labels.shape != (len(files),) or indices.shape != (len(files),):
            raise ValueError("labels and indices must have one entry per file")
        if mode not in FOLDER_MODES:
            raise ValueError(f"mode must be one of {', '.join(FOLDER_MODES)}, got {mode!r}")
        self.files = list(files)
        self.labels = labels.to(torch.int64)
        self.classes = tuple(classes)
        self.num_levels = 256
        self.num_classes = len(self.classes)
        self.name = name
        self.split = split
        self.indices = indices.to(torch.int64)
        self.mode = mode
        self._size = image_size  # PIL's (width, height)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape of one image: ``(C, H, W)``."""
        width, height = self._size
        return (FOLDER_MODES[self.mode], height, width)

    @property
    def dim(self) -> int:
        """Number of pixels times channels of one image."""
        c, h, w = self.shape
        return c * h * w

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        """Decode example ``index``: ``(uint8 C x H x W levels, class index)``."""
        i = range(len(self.files))[int(index)]  # negative indices and IndexError as for lists
        image = _decode(self.files[i])
        if image.size != self._size or image.mode != self.mode:
            raise ValueError(
                f"{self.files[i]}: a {image.mode} image of {image.size[0]} x {image.size[1]} "
                f"pixels in a dataset of {self.mode} images of {self._size[0]} x "
                f"{self._size[1]}; the file changed after the dataset was loaded"
            )
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))
        levels = pixels[None] if pixels.ndim == 2 else pixels.permute(2, 0, 1).contiguous()
        return levels, int(self.labels[i])

    def __repr__(self) -> str:
        return (
            f"ImageFolderDataset(name={self.name!r}, split={self.split!r}, n={len(self)}, "
            f"shape={self.shape}, classes={len(self.classes)})"
        )


def _decode(path: str):  # -> PIL.Image.Image
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (OSError, UnidentifiedImageError) as exc:
        raise ValueError(f"{path}: cannot read as an image ({exc})") from exc


# --------------------------------------------------------------------------- listing


def _classes(root: Path) -> list[str]:
    """Class names of an ImageFolder tree: its sub-folders, sorted (torchvision's order)."""
    return sorted(entry.name for entry in os.scandir(root) if entry.is_dir())


def _walk(root: Path, classes: Sequence[str]) -> tuple[list[str], list[int]]:
    """Image files below ``root/<class>`` and their class indices, in ImageFolder's order."""
    files: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            continue
        for dirpath, _, names in sorted(os.walk(folder, followlinks=True)):
            for file in sorted(names):
                if file.lower().endswith(IMAGE_EXTENSIONS):
                    files.append(os.path.join(dirpath, file))
                    labels.append(label)
    return files, labels


@functools.lru_cache(maxsize=4)
def _common_format(spec: str, files: tuple[str, ...]) -> tuple[tuple[int, int], str]:
    """The one ``(width, height)`` and mode of ``files``, read from their headers.

    Raises:
        ValueError: Files differ in size or mode, a mode is not L or RGB, or a file is not an
            image.
    """
    formats: dict[tuple[tuple[int, int], str], list[str]] = {}
    for path in files:
        try:
            with Image.open(path) as image:  # reads the header only
                key = (image.size, image.mode)
        except (OSError, UnidentifiedImageError) as exc:
            raise ValueError(f"{spec}: {path} cannot be read as an image ({exc})") from exc
        formats.setdefault(key, []).append(path)
    if len(formats) > 1:
        found = "; ".join(
            f"{len(paths)} {mode} image(s) of {w} x {h} (e.g. {paths[0]})"
            for ((w, h), mode), paths in sorted(formats.items(), key=lambda kv: -len(kv[1]))
        )
        raise ValueError(
            f"{spec}: every image must have the same size and mode, found {found}; resize or "
            "convert the images (e.g. with PIL: image.convert('RGB').resize((32, 32)))"
        )
    (size, mode), paths = next(iter(formats.items()))
    if mode not in FOLDER_MODES:
        raise ValueError(
            f"{spec}: images must be greyscale (mode L, 1 channel) or RGB (3 channels), got mode "
            f"{mode} (e.g. {paths[0]}); convert them, e.g. with PIL: image.convert('RGB')"
        )
    return size, mode


def load_folder(
    spec: str, split: str, data_root: str | None, seed: int, val_fraction: float
) -> ImageFolderDataset:
    """The ``split`` of the ImageFolder tree ``folder:PATH`` (see the module docstring).

    A relative ``PATH`` that is not a folder is also tried under ``data_root``.

    Raises:
        DatasetNotFoundError: ``PATH`` is not a folder or holds no image.
        ValueError: A bad layout (only one of ``train``/``test``, test classes missing from
            train), or images of different sizes or modes, or of another mode than L or RGB.
    """
    root, tried = find_data_path(spec, data_root, Path.is_dir, "/path/to/tree")
    if root is None:
        raise DatasetNotFoundError(
            f"image folder not found (tried: {', '.join(map(str, tried))}); {_LAYOUT}"
        )
    train_dir, test_dir = root / "train", root / "test"
    if train_dir.is_dir() != test_dir.is_dir():
        present, absent = (train_dir, test_dir) if train_dir.is_dir() else (test_dir, train_dir)
        raise ValueError(
            f"{spec}: {present} exists but {absent} does not; give both train/ and test/ "
            "ImageFolder trees, or neither (then the whole tree is split at random)"
        )
    if train_dir.is_dir():
        check_fractions(val_fraction, 0.0)
        classes = _classes(train_dir)
        extra = sorted(set(_classes(test_dir)) - set(classes))
        if extra:
            raise ValueError(
                f"{spec}: test classes {extra} have no folder in {train_dir}; the labels of "
                "both trees come from the train folder names"
            )
        train_files, train_labels = _walk(train_dir, classes)
        test_files, test_labels = _walk(test_dir, classes)
        n_train, n_test = len(train_files), len(test_files)
        if split in ("train", "val"):
            index = random_split(n_train, split, seed, val_fraction, 0.0)
        elif split == "test":
            index = np.arange(n_train, n_train + n_test)
        else:
            index = np.arange(n_train + n_test)
        files, labels = train_files + test_files, train_labels + test_labels
    else:
        check_fractions(val_fraction, TEST_FRACTION)
        classes = _classes(root)
        files, labels = _walk(root, classes)
        index = random_split(len(files), split, seed, val_fraction, TEST_FRACTION)
    if not files or (split in ("train", "test") and not len(index)):
        where = root if not train_dir.is_dir() else f"{train_dir} and {test_dir}"
        raise DatasetNotFoundError(
            f"{spec}: no {split} images found in {where} (extensions "
            f"{', '.join(IMAGE_EXTENSIONS)}); {_LAYOUT}"
        )
    size, mode = _common_format(spec, tuple(files))
    return ImageFolderDataset(
        [files[i] for i in index],
        torch.tensor([labels[i] for i in index], dtype=torch.int64),
        classes=classes,
        image_size=size,
        mode=mode,
        name=spec,
        split=split,
        indices=torch.from_numpy(np.asarray(index, dtype=np.int64)),
    )
