"""Datasets of hybridflow: integer-level images, 2-D toy densities and tabular benchmarks.

Use :func:`load_dataset` with a name from :func:`available_datasets`.
"""

from hybridflow.data.images import (
    DatasetNotFoundError,
    ImageDataset,
    available_datasets,
    dataset_tensors,
    load_dataset,
    read_idx,
)
from hybridflow.data.tabular import TABULAR_DATASETS, TabularDataset, load_tabular
from hybridflow.data.toy import (
    TOY_DATASETS,
    PointDataset,
    ToyDataset,
    sample_toy,
    toy_log_density,
)

__all__ = [
    "TABULAR_DATASETS",
    "TOY_DATASETS",
    "DatasetNotFoundError",
    "ImageDataset",
    "PointDataset",
    "TabularDataset",
    "ToyDataset",
    "available_datasets",
    "dataset_tensors",
    "load_dataset",
    "load_tabular",
    "read_idx",
    "sample_toy",
    "toy_log_density",
]
