"""Datasets of hybridflow: integer-level images, 2-D toy densities and tabular benchmarks.

Use :func:`load_dataset` with a name from :func:`available_datasets`. Modules, bottom to top:
``common`` (containers, checks, splits) → the families ``images``, ``folder``, ``toy``,
``tabular`` and ``derived`` → ``registry`` (the one name → loader table) → this package.
Every dataset is held in memory except ``folder:PATH`` (:class:`ImageFolderDataset`, whose
``in_memory`` is ``False``), which decodes one image file per ``dataset[i]``.
"""

from hybridflow.data.binary import binarize, load_binarized
from hybridflow.data.common import (
    DatasetNotFoundError,
    ImageDataset,
    PointDataset,
    UnknownDatasetError,
    dataset_tensors,
)
from hybridflow.data.derived import DERIVED_KINDS
from hybridflow.data.energies import Target, gaussian_target, list_targets, load_target
from hybridflow.data.folder import ImageFolderDataset
from hybridflow.data.images import read_idx
from hybridflow.data.registry import (
    DatasetFamily,
    available_datasets,
    check_dataset_name,
    load_dataset,
    register_family,
)
from hybridflow.data.tabular import TABULAR_DATASETS, TabularDataset, load_tabular
from hybridflow.data.toy import (
    TOY_DATASETS,
    ToyDataset,
    sample_toy,
    toy_log_density,
)

__all__ = [
    "DERIVED_KINDS",
    "TABULAR_DATASETS",
    "TOY_DATASETS",
    "DatasetFamily",
    "DatasetNotFoundError",
    "ImageDataset",
    "ImageFolderDataset",
    "PointDataset",
    "TabularDataset",
    "Target",
    "ToyDataset",
    "UnknownDatasetError",
    "available_datasets",
    "binarize",
    "check_dataset_name",
    "dataset_tensors",
    "gaussian_target",
    "list_targets",
    "load_binarized",
    "load_dataset",
    "load_tabular",
    "load_target",
    "read_idx",
    "register_family",
    "sample_toy",
    "toy_log_density",
]
