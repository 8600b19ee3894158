"""Evaluate a hybrid model: bits/dim, classification and calibration, OOD detection."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from ..data import dataset_tensors
from ..models import HybridModel
from .metrics import classification_metrics, ood_metrics
from .ood import bpd_score, energy_score, max_softmax_score

__all__ = ["Predictions", "evaluate_predictions", "ood_scores", "ood_table", "predict"]


class Predictions(dict):
    """Per-example arrays from :func:`predict`: ``logits``, ``log_prob`` (nats), ``labels``."""


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
    """
    if iw_samples < 0 or dequant_samples < 1:
        raise ValueError("need iw_samples >= 0 and dequant_samples >= 1")
    model.eval()
    device = device or next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    inputs, labels = dataset_tensors(dataset)
    discrete = model.flow.num_levels is not None
    gen = torch.Generator(device="cpu").manual_seed(seed)
    logits, log_probs, latents, pre_logits = [], [], [], []
    for start in range(0, len(inputs), batch_size):
        x = inputs[start : start + batch_size].to(device=device, dtype=dtype)
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
        logits=torch.cat(logits).double().cpu().numpy(),
        log_prob=torch.cat(log_probs).numpy(),
        labels=labels.numpy().astype(np.int64),
        dim=model.dim,
    )
    if features:
        pred.update(latent=torch.cat(latents).numpy(), pre_logits=torch.cat(pre_logits).numpy())
    return pred


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
