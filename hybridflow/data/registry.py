"""The one registry of dataset names: every family registers a loader here, and
:func:`load_dataset` / :func:`available_datasets` dispatch through it.

Layers, bottom to top: :mod:`~hybridflow.data.common` (containers, checks, splits) →
the families (:mod:`~hybridflow.data.images`, :mod:`~hybridflow.data.folder`,
:mod:`~hybridflow.data.toy`, :mod:`~hybridflow.data.tabular`, :mod:`~hybridflow.data.derived`)
→ this module → :mod:`hybridflow.data`. Only this module knows every family, so no family
imports another.

A family is named by a pattern: an exact name (``"digits"``) or ``"KIND:ARG"`` for every name
that starts with ``KIND:`` (``"toy:NAME"``, ``"npz:PATH"``), optionally restricted to a fixed
tuple of ``choices``. An unknown name raises :class:`~hybridflow.data.common.UnknownDatasetError`
naming the closest valid name and listing :func:`available_datasets`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

from hybridflow.data.common import (
    ImageDataset,
    PointDataset,
    UnknownDatasetError,
    check_seed,
    check_split,
    unknown_dataset_error,
)
from hybridflow.data.derived import DERIVED_KINDS, load_derived
from hybridflow.data.folder import ImageFolderDataset, load_folder
from hybridflow.data.images import (
    IDX_SOURCES,
    load_cifar10,
    load_digits,
    load_idx_dataset,
    load_npz,
    load_svhn,
    load_synthetic,
)
from hybridflow.data.tabular import TABULAR_DATASETS, load_tabular
from hybridflow.data.toy import TOY_DATASETS, make_toy_dataset

__all__ = [
    "DatasetFamily",
    "LoadOptions",
    "available_datasets",
    "check_dataset_name",
    "dataset_families",
    "load_dataset",
    "register_family",
]


@dataclass(frozen=True)
class LoadOptions:
    """The keyword options of :func:`load_dataset` that every loader receives."""

    data_root: str | None = None
    seed: int = 0
    val_fraction: float = 0.1
    download: bool = False


#: ``loader(name, split, options)``: the split ``split`` of the dataset ``name``.
DatasetLoader = Callable[
    [str, str, LoadOptions], "ImageDataset | PointDataset | ImageFolderDataset"
]


@dataclass(frozen=True)
class DatasetFamily:
    """Dataset names served by one loader.

    Attributes:
        pattern: An exact name (``"digits"``) or ``"KIND:ARG"``, which claims every name
            starting with ``KIND:``; ``ARG`` only documents the argument (``"npz:PATH"``).
        load: ``load(name, split, options)``; receives names this family accepts.
        choices: The full names a ``KIND:`` family accepts (``("toy:moons", ...)``), listed by
            :func:`available_datasets` one by one; ``None`` accepts any argument and lists the
            pattern.
    """

    pattern: str
    load: DatasetLoader
    choices: tuple[str, ...] | None = None

    @property
    def prefix(self) -> str | None:
        """``"KIND:"`` of a prefix family, ``None`` for an exact name."""
        kind, colon, _ = self.pattern.partition(":")
        return kind + colon if colon else None

    @property
    def listed(self) -> tuple[str, ...]:
        """How :func:`available_datasets` lists the family."""
        return (self.pattern,) if self.choices is None else self.choices

    def accepts(self, name: str) -> bool:
        """Whether ``name`` belongs to this family."""
        if self.prefix is None:
            return name == self.pattern
        return name.startswith(self.prefix) and (self.choices is None or name in self.choices)


_FAMILIES: list[DatasetFamily] = []


def register_family(family: DatasetFamily) -> DatasetFamily:
    """Add ``family`` to the registry (after those already there); returns it.

    Raises:
        ValueError: Another family already claims the same exact name or ``KIND:`` prefix.
    """
    key = family.prefix or family.pattern
    for other in _FAMILIES:
        if (other.prefix or other.pattern) == key:
            raise ValueError(f"dataset family {key!r} is already registered ({other.pattern})")
    _FAMILIES.append(family)
    return family


def dataset_families() -> tuple[DatasetFamily, ...]:
    """The registered families, in registration (and listing) order."""
    return tuple(_FAMILIES)


def available_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset` (``npz:PATH`` takes a file path, ``KIND:BASE`` a
    base image dataset)."""
    return [name for family in _FAMILIES for name in family.listed]


def _suggestable_names() -> list[str]:
    """Concrete valid names for the did-you-mean hint: fixed names, plus every derived set of
    an exact-name base (``noise:digits``, ...), so ``"noise:digts"`` finds ``"noise:digits"``."""
    fixed = [n for f in _FAMILIES if f.prefix is None or f.choices is not None for n in f.listed]
    bases = [f.pattern for f in _FAMILIES if f.prefix is None]
    return fixed + [f"{kind}:{base}" for kind in DERIVED_KINDS for base in bases]


def _unknown(name: str) -> UnknownDatasetError:
    candidates = _suggestable_names()
    kind, colon, arg = name.partition(":")
    if colon and arg and not any(f.prefix == kind + colon for f in _FAMILIES):
        # A misspelt kind before a free argument ("foldr:/data/x", "synthetc:1x28x28"): offer
        # the argument under every kind that takes any argument.
        candidates += [f"{f.prefix}{arg}" for f in _FAMILIES if f.prefix and f.choices is None]
    return unknown_dataset_error(name, available_datasets(), candidates=candidates)


def _family_of(name: str) -> DatasetFamily:
    for family in _FAMILIES:
        if family.accepts(name):
            return family
    raise _unknown(name)


def check_dataset_name(name: str) -> str:
    """``name`` if some family accepts it (nothing is read); else :class:`UnknownDatasetError`
    with the closest valid name. Files are looked for only when the dataset is loaded."""
    _family_of(name)
    return name


def load_dataset(
    name: str,
    split: str = "train",
    *,
    data_root: str | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    download: bool = False,
) -> ImageDataset | PointDataset | ImageFolderDataset:
    """Load a dataset split (into memory, except the file-backed ``folder:PATH``).

    Args:
        name: ``digits`` (17 levels), ``fashion-mnist``, ``mnist``, ``npz:PATH``, ``toy:NAME``,
            a tabular set (``uci:NAME``, ``sk:NAME``; see :mod:`hybridflow.data.tabular`), an
            OOD set made in code (``noise:BASE``, ``inverted:BASE``, ...; see
            :mod:`hybridflow.data.derived`), ``svhn``, ``cifar10``, an ImageFolder tree
            ``folder:PATH`` (see :mod:`hybridflow.data.folder`) or random images
            ``synthetic:CxHxW[:LEVELS[:CLASSES]]``; see :func:`available_datasets`.
        split: ``train``, ``val``, ``test`` or ``all`` (every example; train then test file
            where the source has both).
        data_root: Folder searched first for IDX files (then its torchvision layout
            ``<Class>/raw``), SVHN's and CIFAR-10's files and download target, and the folder
            of the UCI files; defaults to ``~/.cache/hybridflow``.
            Relative npz and folder paths that do not exist are also tried under it.
        seed: Seed of the split (non-negative integer); same seed, same split everywhere.
        val_fraction: Share of the examples used for validation: of all examples for
            ``digits``/npz/a folder without ``train``/``test`` (test is 20 % of all), of the
            train file for the MNIST family, SVHN, CIFAR-10 and a folder with ``train``/``test``.
            Ignored by toy and synthetic datasets, whose sizes are fixed.
        download: Fetch MNIST/Fashion-MNIST/SVHN/CIFAR-10 with torchvision (needs internet) if
            not found.

    Returns:
        An :class:`~hybridflow.data.ImageDataset`, a :class:`~hybridflow.data.ToyDataset` /
        :class:`~hybridflow.data.TabularDataset` (both :class:`~hybridflow.data.PointDataset`),
        or a file-backed :class:`~hybridflow.data.ImageFolderDataset` (``in_memory = False``).

    Raises:
        UnknownDatasetError: Unknown name (a ``ValueError``; the message suggests the closest).
        ValueError: Unknown split, bad fraction or seed, malformed files.
        DatasetNotFoundError: The files are absent; the message says how to get them.
    """
    check_split(split)
    options = LoadOptions(data_root, check_seed(seed), val_fraction, download)
    return _family_of(name).load(name, split, options)


# --------------------------------------------------------------------------- the families


def _load_derived(name: str, split: str, options: LoadOptions) -> ImageDataset:
    base = name.partition(":")[2]
    if base:  # an empty base gets load_derived's own, more specific message
        try:
            _family_of(base)
        except UnknownDatasetError:
            # Name the whole set, so the hint reads "noise:digits", not "digits".
            raise _unknown(name) from None
    return load_derived(name, split, load_base=load_dataset, **asdict(options))


register_family(
    DatasetFamily("digits", lambda name, split, o: load_digits(split, o.seed, o.val_fraction))
)
for _idx_name in IDX_SOURCES:
    register_family(
        DatasetFamily(
            _idx_name,
            lambda name, split, o: load_idx_dataset(
                name, split, o.data_root, o.seed, o.val_fraction, o.download
            ),
        )
    )
register_family(
    DatasetFamily(
        "npz:PATH",
        lambda name, split, o: load_npz(name, split, o.data_root, o.seed, o.val_fraction),
    )
)
register_family(
    DatasetFamily(
        "toy:NAME",
        lambda name, split, o: make_toy_dataset(name, split, o.seed),
        choices=tuple(f"toy:{toy}" for toy in TOY_DATASETS),
    )
)
for _tabular_kind in ("uci", "sk"):
    register_family(
        DatasetFamily(
            f"{_tabular_kind}:NAME",
            lambda name, split, o: load_tabular(
                name, split, root=o.data_root, seed=o.seed, val_fraction=o.val_fraction
            ),
            choices=tuple(n for n in TABULAR_DATASETS if n.startswith(f"{_tabular_kind}:")),
        )
    )
for _derived_kind in DERIVED_KINDS:
    register_family(DatasetFamily(f"{_derived_kind}:BASE", _load_derived))
# Families added after the first release are listed after it, so existing listings keep order.
register_family(
    DatasetFamily(
        "svhn",
        lambda name, split, o: load_svhn(split, o.data_root, o.seed, o.val_fraction, o.download),
    )
)
register_family(
    DatasetFamily(
        "cifar10",
        lambda name, split, o: load_cifar10(split, o.data_root, o.seed, o.val_fraction, o.download),
    )
)
register_family(
    DatasetFamily(
        "folder:PATH",
        lambda name, split, o: load_folder(name, split, o.data_root, o.seed, o.val_fraction),
    )
)
register_family(
    DatasetFamily("synthetic:CxHxW", lambda name, split, o: load_synthetic(name, split, o.seed))
)
