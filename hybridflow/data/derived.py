"""OOD image sets made in code, shaped like a base dataset: ``KIND:BASE`` (e.g. ``noise:digits``).

They need no download, so OOD evaluation works offline for any image dataset, on its own
alphabet and shape:

- ``noise:BASE``: every pixel an independent uniform level.
- ``constant:BASE``: every image one level throughout, the level uniform per image.
- ``photos:BASE``: random square crops of scikit-learn's two bundled sample photographs
  (``load_sample_images``), area-resized to the base's size, grey for 1-channel bases.
- ``inverted:BASE``: the base's test images with levels reversed (``K - 1 - x``).
- ``hflip:BASE`` / ``vflip:BASE``: the base's test images mirrored left-right / upside-down.

Generated sets have as many images as the base's test split, at most 2,000; transformed sets
have exactly its test images. All are unlabelled and the same on every call (fixed seeds). A
file-backed base (``folder:PATH``) takes the generated kinds only: the transformed ones would
load its whole test split into memory.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from hybridflow.data.common import ImageDataset

__all__ = ["DERIVED_KINDS", "MAX_GENERATED", "load_derived"]

#: Images in a generated set (noise, constant, photos), at most.
MAX_GENERATED = 2_000


def _generator(kind: str, base: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{kind}:{base}".encode()))


def _noise(ref: ImageDataset, n: int, gen: torch.Generator) -> Tensor:
    return torch.randint(0, ref.num_levels, (n, *ref.shape), generator=gen, dtype=torch.uint8)


def _constant(ref: ImageDataset, n: int, gen: torch.Generator) -> Tensor:
    levels = torch.randint(0, ref.num_levels, (n, 1, 1, 1), generator=gen, dtype=torch.uint8)
    return levels.expand(n, *ref.shape).contiguous()


def _photos(ref: ImageDataset, n: int, gen: torch.Generator) -> Tensor:
    from sklearn.datasets import load_sample_images  # start-up time: sklearn pulls scipy

    c, h, w = ref.shape
    photos = [
        torch.from_numpy(np.array(p)).permute(2, 0, 1).float() / 255.0
        for p in load_sample_images().images
    ]  # two 427 × 640 RGB images
    if c == 1:  # ITU-R BT.601 luma
        weights = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
        photos = [(p * weights).sum(0, keepdim=True) for p in photos]
    elif c != 3:
        raise ValueError(f"photos:BASE needs 1- or 3-channel images, the base has {c}")
    out = torch.empty(n, c, h, w, dtype=torch.uint8)
    for i in range(n):
        photo = photos[int(torch.randint(len(photos), (1,), generator=gen))]
        _, ph, pw = photo.shape
        # Crops from the base's own size up to 8×, so both textures and whole objects appear.
        side = int(torch.randint(max(h, w), min(ph, pw, 8 * max(h, w)) + 1, (1,), generator=gen))
        top = int(torch.randint(ph - side + 1, (1,), generator=gen))
        left = int(torch.randint(pw - side + 1, (1,), generator=gen))
        crop = photo[None, :, top : top + side, left : left + side]
        small = torch.nn.functional.interpolate(crop, size=(h, w), mode="area")[0]
        levels = torch.floor(small.clamp(0, 1) * ref.num_levels).clamp(max=ref.num_levels - 1)
        out[i] = levels.to(torch.uint8)
    return out


_GENERATED: dict[str, Callable[[ImageDataset, int, torch.Generator], Tensor]] = {
    "noise": _noise,
    "constant": _constant,
    "photos": _photos,
}
_TRANSFORMED: dict[str, Callable[[Tensor, int], Tensor]] = {
    "inverted": lambda x, k: (k - 1 - x.to(torch.int64)).to(torch.uint8),
    "hflip": lambda x, k: x.flip(-1),
    "vflip": lambda x, k: x.flip(-2),
}
#: The kinds accepted before the colon of ``KIND:BASE``.
DERIVED_KINDS = (*_GENERATED, *_TRANSFORMED)


def load_derived(
    name: str,
    split: str = "all",
    *,
    load_base: Callable[..., Dataset],
    data_root: str | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    download: bool = False,
) -> ImageDataset:
    """An OOD set ``KIND:BASE`` made from the base dataset's test split (see the module doc).

    The base is loaded with the same ``seed`` and ``val_fraction`` (its test split, which the
    model never saw). ``split`` must be ``all`` or ``test``: the set has no train/val parts.

    Args:
        load_base: Loads the base by name, with :func:`hybridflow.data.load_dataset`'s
            signature; passed in by the dataset registry, which this module sits below (so a
            base may itself be any registered image dataset, even a derived one).
    """
    kind, _, base = name.partition(":")
    if kind not in DERIVED_KINDS:
        raise ValueError(f"unknown derived dataset kind {kind!r}; choose from {DERIVED_KINDS}")
    if not base:
        raise ValueError(f"{name!r} needs a base dataset, e.g. '{kind}:digits'")
    if split not in ("all", "test"):
        raise ValueError(f"{name} is an OOD set with no {split!r} split; use 'all' or 'test'")
    ref = load_base(
        base,
        "test",
        data_root=data_root,
        seed=seed,
        val_fraction=val_fraction,
        download=download,
    )
    # A file-backed base (``folder:PATH``, in_memory False) has the shape, alphabet and size
    # the generated kinds need, but its images are on disk: the transformed kinds would have to
    # decode its whole test split into memory.
    file_backed = getattr(ref, "in_memory", True) is False
    if not isinstance(ref, ImageDataset) and not (
        file_backed and getattr(ref, "num_levels", None) and len(ref.shape) == 3
    ):
        raise ValueError(f"{name}: the base {base!r} is not an image dataset")
    if file_backed and kind in _TRANSFORMED:
        raise ValueError(
            f"{name}: {kind} transforms the base's test images, but {base!r} is file-backed "
            f"(read from disk one image at a time); use a generated kind "
            f"({', '.join(f'{k}:{base}' for k in _GENERATED)}) or an in-memory copy (npz:PATH)"
        )
    if kind in _GENERATED:
        images = _GENERATED[kind](ref, min(len(ref), MAX_GENERATED), _generator(kind, base))
    else:
        images = _TRANSFORMED[kind](ref.images, ref.num_levels)
    return ImageDataset(
        images.contiguous(),
        torch.full((len(images),), -1, dtype=torch.int64),
        num_levels=ref.num_levels,
        num_classes=0,
        name=name,
        split=split,
    )
