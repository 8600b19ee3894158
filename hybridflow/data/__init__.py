"""Datasets of hybridflow: integer-level image datasets and 2-D toy densities.

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
from hybridflow.data.toy import TOY_DATASETS, ToyDataset, sample_toy, toy_log_density

__all__ = [
    "TOY_DATASETS",
    "DatasetNotFoundError",
    "ImageDataset",
    "ToyDataset",
    "available_datasets",
    "dataset_tensors",
    "load_dataset",
    "read_idx",
    "sample_toy",
    "toy_log_density",
]
