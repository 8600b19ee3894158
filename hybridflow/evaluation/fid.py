"""Fréchet distances between generated and real images: Inception FID and an offline variant.

The Fréchet distance between Gaussian fits of feature vectors of real and generated images,
``‖μ_r − μ_g‖² + tr(Σ_r + Σ_g − 2 (Σ_r Σ_g)^{1/2})`` (Heusel et al. 2017, "GANs Trained by a Two
Time-Scale Update Rule Converge to a Local Nash Equilibrium"), computed by torchmetrics'
``FrechetInceptionDistance`` (float64 statistics, eigenvalue form of the matrix square root)
with one of two feature networks:

* ``"inception"``: the 2,048-d pool features of Inception-v3 in torchvision's layout, with
  weights the user supplies (``weights_path``: a ``state_dict`` of
  ``torchvision.models.inception_v3(weights="IMAGENET1K_V1")``, saved with ``torch.save`` on a
  machine with internet). Images are scaled to [0, 1], gray repeated to 3 channels, resized to
  299 × 299 and normalised with ImageNet statistics. Labelled ``"FID (Inception-v3, torchvision
  ImageNet weights)"``: published FIDs (e.g. the Residual Flows paper's Table 2) use the
  TensorFlow Inception graph, whose features differ, so compare these with each other only.
* ``"classifier"``: the 128-d penultimate features of a small CNN classifier trained on the
  dataset itself (``recipes/train_fid_features.py``; shipped in ``hybridflow/weights/fid/``
  for digits and Fashion-MNIST). Offline and cheap; labelled ``"FD (<dataset> CNN features)"``
  so that no one reads it as an Inception FID.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = [
    "FID_FEATURES",
    "FID_WEIGHTS_DIR",
    "ClassifierFeatures",
    "InceptionFeatures",
    "fid_feature_network",
    "frechet_distance",
]

#: Feature networks of :func:`fid_feature_network`.
FID_FEATURES = ("classifier", "inception")
#: Shipped classifier feature networks (``<dataset>.pt``) and their ``index.json``.
FID_WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights" / "fid"


class ClassifierFeatures(nn.Module):
    """A small CNN classifier whose penultimate layer gives FID features (``num_features``).

    ``forward`` reads integer levels ``[N, C, H, W]`` in ``[0, num_levels − 1]`` and returns the
    features; :meth:`logits` classifies (how the network is trained).
    """

    def __init__(self, channels: int, num_levels: int, num_classes: int = 10, width: int = 32):
        super().__init__()
        self.num_levels, self.num_features = num_levels, 4 * width
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, stride=2),
            nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(2 * width * 16, self.num_features),
            nn.ReLU(),
        )
        self.head = nn.Linear(self.num_features, num_classes)

    def forward(self, levels: Tensor) -> Tensor:
        return self.body(levels.float() / (self.num_levels - 1) - 0.5)

    def logits(self, levels: Tensor) -> Tensor:
        return self.head(self.forward(levels))


class InceptionFeatures(nn.Module):
    """Inception-v3 pool features (2,048-d) of level images, torchvision layout and weights."""

    num_features = 2048

    def __init__(self, weights_path: str | Path, num_levels: int) -> None:
        super().__init__()
        from torchvision.models import inception_v3

        path = Path(weights_path)
        if not path.exists():
            raise FileNotFoundError(
                f"Inception weights {path} not found; on a machine with internet run "
                '`python -c "import torch, torchvision; torch.save(torchvision.models.'
                "inception_v3(weights='IMAGENET1K_V1').state_dict(), 'inception_v3.pt')\"` "
                "and pass that file"
            )
        self.net = inception_v3(weights=None, aux_logits=True, init_weights=False).float()
        self.net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.net.fc = nn.Identity()
        self.net.eval()
        self.num_levels = num_levels
        stats = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
        self.register_buffer("mean", torch.tensor(stats[0], dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(stats[1], dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, levels: Tensor) -> Tensor:
        x = levels.float() / (self.num_levels - 1)
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        self.net.eval()
        return self.net((x - self.mean) / self.std)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fid_feature_network(
    kind: str,
    dataset: str,
    num_levels: int,
    weights_path: str | Path | None = None,
) -> tuple[nn.Module, str]:
    """The feature network of a Fréchet distance and the label every output must carry.

    Args:
        kind: ``"classifier"`` (shipped per dataset, offline) or ``"inception"``.
        dataset: The images' dataset name (picks the shipped classifier).
        num_levels: The images' alphabet size.
        weights_path: Inception weights (required for ``"inception"``), or a classifier
            file other than the shipped one.

    Raises:
        ValueError: Unknown kind, no shipped classifier for ``dataset``, or a shipped file whose
            checksum differs from its index.
    """
    if kind not in FID_FEATURES:
        raise ValueError(f"FID features must be one of {FID_FEATURES}, got {kind!r}")
    if kind == "inception":
        if weights_path is None:
            raise ValueError("Inception FID needs weights_path (see hybridflow.evaluation.fid)")
        net = InceptionFeatures(weights_path, num_levels)
        return net.eval(), "FID (Inception-v3, torchvision ImageNet weights)"
    path = Path(weights_path) if weights_path else FID_WEIGHTS_DIR / f"{dataset}.pt"
    if weights_path is None:
        index = json.loads((FID_WEIGHTS_DIR / "index.json").read_text())
        if dataset not in index:
            raise ValueError(
                f"no shipped FID classifier for {dataset!r} (shipped: {', '.join(index)}); "
                "train one with recipes/train_fid_features.py or use kind='inception'"
            )
        if _sha256(path) != index[dataset]["sha256"]:
            raise ValueError(f"{path}: SHA-256 differs from {FID_WEIGHTS_DIR}/index.json")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    net = ClassifierFeatures(**saved["config"]).float()  # float32, whatever the default dtype
    net.load_state_dict(saved["model"])
    if saved["config"]["num_levels"] != num_levels:
        raise ValueError(
            f"{path} reads {saved['config']['num_levels']}-level images, these have {num_levels}"
        )
    return net.eval(), f"FD ({dataset} CNN features)"


@torch.no_grad()
def frechet_distance(
    real: Tensor, fake: Tensor, features: nn.Module, batch_size: int = 500
) -> float:
    """Fréchet distance between the feature statistics of ``real`` and ``fake`` images.

    ``features`` maps a batch to ``[N, features.num_features]`` (see
    :func:`fid_feature_network`); at least 2 images per side.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    if len(real) < 2 or len(fake) < 2:
        raise ValueError(f"need >= 2 images per side, got {len(real)} real and {len(fake)} fake")
    metric = FrechetInceptionDistance(feature=features, normalize=False)
    for images, is_real in ((real, True), (fake, False)):
        for i in range(0, len(images), batch_size):
            metric.update(images[i : i + batch_size], real=is_real)
    return float(metric.compute())
