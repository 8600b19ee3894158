"""Evaluate a hybrid model: bits/dim, classification and calibration, OOD detection."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..data import dataset_tensors
from ..models import HybridModel
from .metrics import classification_metrics, ood_metrics
from .ood import bpd_score, energy_score, max_softmax_score

__all__ = [
    "Predictions",
    "evaluate_predictions",
    "index_loader",
    "is_in_memory",
    "merge_predictions",
    "ood_scores",
    "ood_table",
    "predict",
]


class Predictions(dict):
    """Per-example arrays from :func:`predict`: ``logits``, ``log_prob`` (nats), ``labels``."""


def is_in_memory(dataset: Dataset) -> bool:
    """Whether ``dataset`` holds its tensors in memory (file-backed ones set ``in_memory``
    to ``False`` and are read example by example)."""
    return bool(getattr(dataset, "in_memory", True))


def index_loader(
    dataset: Dataset, batches: Sequence[Sequence[int]], workers: int = 0, pin_memory: bool = False
) -> DataLoader:
    """A ``DataLoader`` reading ``dataset`` in exactly the given index ``batches``."""
    # Its own generator: a DataLoader otherwise seeds its workers from the global torch RNG,
    # which would shift every later random draw of a training run.
    return DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=workers,
        pin_memory=pin_memory,
        generator=torch.Generator(),
    )


def _batches(
    dataset: Dataset, batch_size: int, num_workers: int, mine: Callable[[int], bool]
) -> Iterator[tuple[int, torch.Tensor | None, torch.Tensor | None]]:
    """``(size, inputs, labels)`` of consecutive batches, inputs ``None`` where not ``mine``."""
    n = len(dataset)
    starts = range(0, n, batch_size)
    if is_in_memory(dataset):
        inputs, labels = dataset_tensors(dataset)
        for k, start in enumerate(starts):
            part = slice(start, start + batch_size)
            size = len(inputs[part])
            yield (size, inputs[part], labels[part]) if mine(k) else (size, None, None)
        return
    own = [list(range(s, min(s + batch_size, n))) for k, s in enumerate(starts) if mine(k)]
    loaded = iter(index_loader(dataset, own, num_workers))
    for k, start in enumerate(starts):
        size = min(batch_size, n - start)
        if mine(k):
            x, y = next(loaded)
            yield size, x, torch.as_tensor(y)
        else:
            yield size, None, None


@torch.no_grad()
def predict(
    model: HybridModel,
    dataset,
    batch_size: int = 512,
    dequant_samples: int = 1,
    device: torch.device | str | None = None,
    seed: int = 0,
    iw_samples: int = 0,
    features: bool = False,
    num_workers: int = 0,
    shard: tuple[int, int] | None = None,
) -> Predictions:
    """Run ``model`` over ``dataset`` in eval mode.

    For discrete data ``log_prob`` is a lower bound on ``log P(x)`` from the model's own
    dequantizer (uniform or variational): with ``iw_samples = S > 0`` the importance-weighted bound
    over ``S`` draws (Flow++ eq. 13; tighter as ``S`` grows, comparable across dequantizers),
    otherwise the mean of ``dequant_samples`` single-draw bounds (each an unbiased estimate of
    the same bound, so averaging only lowers variance). ``logits`` come from one deterministic
    pass at the bin centres, so accuracy and calibration do not depend on noise; a model without
    classes (``num_classes = 0``) gets ``(N, 0)`` logits. With ``features=True`` that pass also
    returns ``latent`` (the flow's flat D-dimensional latent z, the trunk's output) and
    ``pre_logits`` (the head's features), as float32.

    Datasets that are not in memory (``in_memory = False``) are streamed through a
    ``DataLoader`` with ``num_workers`` workers. ``shard = (rank, world_size)`` predicts only
    the batches ``k`` with ``k % world_size == rank`` and adds their example positions as
    ``index``; the dequantization draws of the other batches are made and discarded, so
    :func:`merge_predictions` of all shards equals the unsharded result (but for draws the
    backbone makes from the global RNG, e.g. residual-flow log-det probes).
    """
    if iw_samples < 0 or dequant_samples < 1:
        raise ValueError("need iw_samples >= 0 and dequant_samples >= 1")
    if shard is not None and iw_samples:
        raise ValueError("the importance-weighted bound (iw_samples) is not sharded")
    rank, world = shard or (0, 1)
    model.eval()
    device = device or next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    discrete = model.flow.num_levels is not None
    gen = torch.Generator(device="cpu").manual_seed(seed)
    logits, log_probs, latents, pre_logits, labels, index = [], [], [], [], [], []
    start = 0
    for size, inputs, y in _batches(dataset, batch_size, num_workers, lambda k: k % world == rank):
        start += size
        if inputs is None:  # another rank's batch: draw its noise, so ours follows it
            if discrete:
                blank = torch.zeros(size, *model.flow.input_shape, device=device, dtype=dtype)
                for _ in range(dequant_samples):
                    model.flow.dequantize(blank, generator=gen)
            continue
        labels.append(y)
        index.append(torch.arange(start - size, start))
        x = inputs.to(device=device, dtype=dtype)
        out = model(x, dequant_noise=0.5 if discrete else None)
        # With no classes the head's fc is the identity: its "logits" are features, not logits.
        logits.append(out.logits.double().cpu() if model.num_classes else x.new_zeros(len(x), 0))
        if features:
            latents.append(model.flow.backbone.flatten_features(out.features).float().cpu())
            pre_logits.append(model.forward_head(out.features, pre_logits=True).float().cpu())
        if discrete:
            if iw_samples:
                lp = model.flow.log_prob_iw(x, iw_samples, generator=gen).double().cpu()
            else:
                lp = torch.zeros(x.shape[0], dtype=torch.float64)
                for _ in range(dequant_samples):
                    lp += model.flow.log_prob(x, generator=gen).double().cpu()
                lp /= dequant_samples
            log_probs.append(lp)
        else:
            log_probs.append(out.log_prob.double().cpu())
    pred = Predictions(
        logits=_cat(logits, (0, model.num_classes)).double().cpu().numpy(),
        log_prob=_cat(log_probs, (0,)).numpy(),
        labels=_cat(labels, (0,), torch.int64).numpy().astype(np.int64),
        dim=model.dim,
    )
    if features:
        pred.update(
            latent=_cat(latents, (0, model.dim), torch.float32).numpy(),
            pre_logits=_cat(pre_logits, (0, model.num_features), torch.float32).numpy(),
        )
    if shard is not None:
        pred["index"] = _cat(index, (0,), torch.int64).numpy()
    return pred


def _cat(
    parts: list[torch.Tensor], empty_shape: tuple[int, ...], dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """``torch.cat(parts)``, or an empty tensor for a shard that got no batch."""
    return torch.cat(parts) if parts else torch.zeros(empty_shape, dtype=dtype)


def merge_predictions(parts: Sequence[Mapping[str, Any]]) -> Predictions:
    """One :class:`Predictions` from the shards of :func:`predict` (``shard=``), in the
    dataset's order."""
    index = np.concatenate([p["index"] for p in parts])
    order = np.argsort(index, kind="stable")
    merged = Predictions(dim=parts[0]["dim"])
    for key in parts[0]:
        if key not in ("dim", "index"):
            merged[key] = np.concatenate([p[key] for p in parts])[order]
    return merged


def evaluate_predictions(pred: Mapping, n_bins: int = 15) -> dict[str, float]:
    """Bits/dim and NLL (nats) of the data; accuracy, ECE, Brier and NLL of the labels.

    Classification metrics cover the labelled examples (label ≥ 0) and are absent when there
    are none or the model has no classes: unlabelled data get density metrics only.
    """
    nll = -np.asarray(pred["log_prob"], dtype=np.float64)
    result = {
        "nll_nats": float(nll.mean()),
        "bpd": float(nll.mean() / (pred["dim"] * math.log(2))),
    }
    labels, logits = np.asarray(pred["labels"]), pred["logits"]
    known = labels >= 0
    if known.any() and logits.shape[1] > 0:
        if not known.all():  # partly labelled data: score the labelled part
            labels, logits = labels[known], logits[known]
        cls = classification_metrics(logits, labels, n_bins=n_bins)
        result.update({k if k != "nll" else "class_nll": v for k, v in cls.items()})
    return result


def ood_scores(pred: Mapping) -> dict[str, np.ndarray]:
    """Quick OOD scores, higher = more OOD: ``bpd``, and ``max_softmax`` and ``energy`` when the
    model has classes. :func:`hybridflow.reports.ood_run` computes the full set."""
    scores = {"bpd": bpd_score(pred["log_prob"], pred["dim"])}
    if pred["logits"].shape[1] > 0:
        scores["max_softmax"] = max_softmax_score(pred["logits"])
        scores["energy"] = energy_score(pred["logits"])
    return scores


def ood_table(in_pred: Mapping, out_pred: Mapping) -> dict[str, dict[str, float]]:
    """Every score's OOD metrics (AUROC, AUPR-in/out, FPR@95 both conventions)."""
    s_in, s_out = ood_scores(in_pred), ood_scores(out_pred)
    return {name: ood_metrics(s_in[name], s_out[name]) for name in s_in}
