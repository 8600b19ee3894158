"""The DataLoader reader: the same batches as the in-memory path, and file-backed datasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_training_scale import EPOCH_RUN, assert_same_run
from torch.utils.data import Dataset

import hybridflow.training.setup as training_setup
from hybridflow.data import load_dataset
from hybridflow.evaluation import predict
from hybridflow.training import load_run, train

CONFIG = {**EPOCH_RUN, "augment_shift": 1, "perturb_rate": 0.1}


class NpyFiles(Dataset):
    """A file-backed image dataset: one ``.npy`` file per example, read on demand.

    It has no ``labels`` tensor, so the trainer must read the labels through the dataset.
    """

    in_memory = False

    def __init__(self, folder: Path, source) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.files = []
        for i, (image, label) in enumerate(zip(source.images, source.labels, strict=True)):
            path = folder / f"{i:05d}_{int(label)}.npy"
            np.save(path, image.numpy())
            self.files.append(path)
        self.shape = source.shape
        self.num_levels, self.num_classes = source.num_levels, source.num_classes

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path = self.files[i]
        return torch.from_numpy(np.load(path)), int(path.stem.split("_")[1])


@pytest.fixture(scope="module")
def digits_files(tmp_path_factory) -> dict[str, NpyFiles]:
    root = tmp_path_factory.mktemp("npy")
    return {s: NpyFiles(root / s, load_dataset("digits", s)) for s in ("train", "val")}


@pytest.fixture
def memory_run(tmp_path_factory) -> Path:
    return train({**CONFIG, "out_dir": str(tmp_path_factory.mktemp("memory")), "name": "run"})


def test_torch_loader_trains_bit_identically_to_memory(memory_run: Path, tmp_path: Path) -> None:
    run = train({**CONFIG, "loader": "torch", "out_dir": str(tmp_path), "name": "run"})
    assert_same_run(memory_run, run)


def test_file_backed_dataset_trains_and_evaluates(
    memory_run: Path, digits_files: dict[str, NpyFiles], tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(
        training_setup, "load_dataset", lambda name, split, **kw: digits_files[split]
    )
    with pytest.raises(ValueError, match="loader=memory, but dataset 'digits' is not held in"):
        train({**CONFIG, "loader": "memory", "out_dir": str(tmp_path), "name": "refused"})
    # loader=auto streams it, with worker processes; the same examples give the same run.
    run = train({**CONFIG, "loader_workers": 2, "out_dir": str(tmp_path), "name": "run"})
    assert_same_run(memory_run, run)
    model, _ = load_run(run)
    streamed = predict(model, digits_files["val"], batch_size=64, num_workers=2)
    in_memory = predict(model, load_dataset("digits", "val"), batch_size=64)
    assert streamed.keys() == in_memory.keys()
    for key in ("logits", "log_prob", "labels"):
        np.testing.assert_array_equal(streamed[key], in_memory[key])
