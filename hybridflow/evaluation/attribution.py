"""Input attributions for hybrid flow models with captum.

Explains three per-example quantities of a :class:`~hybridflow.models.HybridModel`: a class
logit, the flow's log-density and the energy OOD score, with

* Integrated Gradients (Sundararajan et al. 2017, "Axiomatic Attribution for Deep Networks"),
* saliency, the absolute input gradient (Simonyan et al. 2014, "Deep Inside Convolutional
  Networks"),
* SmoothGrad through captum's ``NoiseTunnel`` (Smilkov et al. 2017, "SmoothGrad: removing noise
  by adding noise"): saliency averaged over noisy copies of the input.

Discrete-data models read integer levels and dequantize them with random noise, which is
neither deterministic nor differentiable in the levels. Attributions are therefore taken on the
continuous level scale: the explained input is ``x + 0.5`` (bin centres) and the explained
function is the flow density at that point, ``log p(x / K) - D log K``
(:func:`continuous_log_prob`), which skips the dequantizer. Residual blocks estimate their
log-determinants with random probes and a random series length; :func:`deterministic_logdets`
freezes both while attributions are computed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from captum.attr import IntegratedGradients, NoiseTunnel, Saliency
from torch import Tensor, nn
from torchvision.transforms import functional as TF

from ..models import FlowModel, HybridModel
from ..transforms import ResidualBlock
from ..transforms.residual import _Draw

__all__ = [
    "ATTRIBUTION_METHODS",
    "EXPLAIN_TARGETS",
    "attribute",
    "blurred_baseline",
    "continuous_log_prob",
    "continuous_logits",
    "deterministic_logdets",
    "mean_baseline",
    "save_attribution_overlays",
]

#: Built-in quantities :func:`attribute` can explain (a callable is accepted as well).
EXPLAIN_TARGETS = ("logit", "log_prob", "energy")
#: Attribution methods of :func:`attribute`.
ATTRIBUTION_METHODS = ("integrated_gradients", "saliency", "noise_tunnel")
#: Named Integrated Gradients baselines of :func:`attribute` (a tensor is accepted as well).
BASELINES = ("blur", "mean", "zero")

TargetFn = Callable[[nn.Module, Tensor], Tensor]

# ResidualBlock attributes switched by `deterministic_logdets` and restored afterwards.
_BLOCK_ATTRIBUTES = ("logdet_estimator", "n_terms", "eval_n_terms", "grad_mode", "memory_efficient")
_MISSING = object()


# ---- deterministic log-determinants ---------------------------------------------------------


class _FixedProbeDraw:
    """A replacement for :meth:`ResidualBlock._draw`: ``n_terms`` unit weights and one fixed
    Gaussian probe per example position, broadcast over the batch."""

    def __init__(self, n_terms: int, seed: int) -> None:
        self.n_terms = n_terms
        self.seed = seed
        # One probe per example shape, drawn on first use; kept in float64 on the CPU so that
        # the same probe serves every dtype and device.
        self._probes: dict[tuple[int, ...], Tensor] = {}

    def __call__(self, x: Tensor) -> _Draw:
        shape = tuple(x.shape[1:])
        if shape not in self._probes:
            generator = torch.Generator().manual_seed(self.seed)
            self._probes[shape] = torch.randn(shape, generator=generator, dtype=torch.float64)
        probe = self._probes[shape].to(device=x.device, dtype=x.dtype)
        # The same probe for every row: an example's estimate does not depend on where it sits
        # in the batch, nor on the batch size (captum batches interpolation steps freely).
        return _Draw([1.0] * self.n_terms, [probe.expand_as(x).contiguous()])


@contextmanager
def deterministic_logdets(model: nn.Module, n_terms: int = 10, seed: int = 0) -> Iterator[None]:
    """Make every :class:`~hybridflow.transforms.ResidualBlock` of ``model`` deterministic.

    Inside the context each block estimates ``log|det(I + J_g)|`` by the power series truncated
    after ``n_terms`` terms (in train and eval mode alike) with fixed Hutchinson probes, and
    differentiates through every term (``grad="backprop"``, no memory-efficient mode).

    Why: captum's methods treat the model as a deterministic, differentiable function of the
    input. The Russian-roulette estimator (Chen et al. 2019) draws a random series length and
    fresh probes on every call, so Integrated Gradients would integrate noise and its
    completeness check would fail; the Neumann gradient estimator and the memory-efficient mode
    only give unbiased *parameter* gradients, not the input gradient of the value itself.

    The probe of block ``i`` (in ``model.modules()`` order) is one Gaussian vector of the
    per-example shape drawn from ``torch.Generator().manual_seed(seed + i)`` and shared by all
    rows, so an example's value does not depend on its batch position or the batch size.
    Blocks with the ``"exact"`` estimator are left unchanged. Everything is restored on exit,
    also after an exception.

    Args:
        model: Any module containing residual blocks.
        n_terms: Terms of the truncated series.
        seed: Seed of the probes.
    """
    if n_terms < 1:
        raise ValueError(f"n_terms must be >= 1, got {n_terms}")
    saved: list[tuple[ResidualBlock, dict[str, Any], Any]] = []
    try:
        blocks = [m for m in model.modules() if isinstance(m, ResidualBlock)]
        for i, block in enumerate(blocks):
            if block.logdet_estimator == "exact":
                continue
            attributes = {name: getattr(block, name) for name in _BLOCK_ATTRIBUTES}
            # `_draw` is normally the class method; remember an instance override (e.g. from an
            # enclosing context) so that nesting restores it.
            own_draw = block.__dict__.get("_draw", _MISSING)
            saved.append((block, attributes, own_draw))
            block.logdet_estimator = "series"
            block.n_terms = block.eval_n_terms = int(n_terms)
            block.grad_mode = "backprop"
            block.memory_efficient = False
            block._draw = _FixedProbeDraw(int(n_terms), seed + i)
        yield
    finally:
        for block, attributes, own_draw in reversed(saved):
            for name, value in attributes.items():
                setattr(block, name, value)
            if own_draw is _MISSING:
                del block._draw
            else:
                block._draw = own_draw


# ---- the explained functions ----------------------------------------------------------------


def _flow_of(model: nn.Module) -> FlowModel:
    if isinstance(model, HybridModel):
        return model.flow
    if isinstance(model, FlowModel):
        return model
    raise TypeError(f"expected a HybridModel or FlowModel, got {type(model).__name__}")


def _continuous_features(model: nn.Module, x: Tensor) -> tuple[list[Tensor], Tensor]:
    """Per-scale features and log-density of continuous level-scale inputs (no dequantizer)."""
    return _flow_of(model).level_scale_features(x)


def continuous_log_prob(model: HybridModel | FlowModel, x: Tensor) -> Tensor:
    """Log-density in nats of continuous level-scale inputs, differentiable in ``x``.

    For a flow on ``K`` levels, ``x`` holds floats in ``[0, K]`` (bin centres are
    ``levels + 0.5``) and the result is ``log p(x / K) - D log K``: the flow's density on the
    level scale. The dequantizer is skipped, so uniformly and variationally dequantized models
    are explained the same way; at bin centres this equals
    ``flow.log_prob(levels, dequant_noise=0.5)`` for uniform dequantization. For continuous-data
    flows (``num_levels=None``) it is ``flow.log_prob(x)``.

    Args:
        model: A hybrid model or a bare flow.
        x: Inputs of shape ``[N, *input_shape]``.

    Returns:
        The per-example log-density, shape ``[N]``.
    """
    return _continuous_features(model, x)[1]


def continuous_logits(model: HybridModel, x: Tensor) -> Tensor:
    """Class logits ``[N, C]`` of the head on the path of :func:`continuous_log_prob`."""
    if not isinstance(model, HybridModel):
        raise TypeError(f"logits need a HybridModel, got {type(model).__name__}")
    features, _ = _continuous_features(model, x)
    return model.forward_head(features)


def _energy(model: nn.Module, x: Tensor) -> Tensor:
    # Energy OOD score (Liu et al. 2020, "Energy-based Out-of-distribution Detection") at T = 1:
    # -logsumexp(logits), higher = more OOD.
    return -torch.logsumexp(continuous_logits(model, x), dim=1)


# ---- baselines ------------------------------------------------------------------------------


def blurred_baseline(x: Tensor, kernel_size: int = 5, sigma: float = 2.0) -> Tensor:
    """A Gaussian-blurred copy of every image in ``x`` (``[N, C, H, W]`` or ``[N, H, W]``).

    Integrated Gradients (Sundararajan et al. 2017) attributes ``f(x) - f(baseline)``, so a
    baseline should carry "no signal" without itself being a high-likelihood input. A black
    (all-zero) image is the *most* likely input of many flows, which makes it a poor reference
    for explaining log-densities; a blurred copy keeps the overall intensity and removes the
    edges that the explanation should point at. The kernel is clipped to the largest odd size
    that fits the image.

    Args:
        x: Images (any float scale).
        kernel_size: Side of the Gaussian kernel.
        sigma: Standard deviation of the kernel in pixels.
    """
    if x.dim() < 3:
        raise ValueError(
            f"blurred_baseline expects images [N, C, H, W] or [N, H, W], got {tuple(x.shape)}"
        )
    if kernel_size < 1 or sigma <= 0:
        raise ValueError("need kernel_size >= 1 and sigma > 0")
    sizes = []
    for side in x.shape[-2:]:
        k = min(int(kernel_size), int(side))
        sizes.append(k if k % 2 == 1 else k - 1)  # torchvision needs odd kernels
    if x.dim() == 3:  # gaussian_blur wants a channel axis
        return TF.gaussian_blur(x.unsqueeze(1), sizes, [sigma, sigma]).squeeze(1)
    return TF.gaussian_blur(x, sizes, [sigma, sigma])


def mean_baseline(x: Tensor, data_mean: Tensor) -> Tensor:
    """The data mean (one example's shape, or broadcastable to it) for every row of ``x``.

    The mean is a smooth, "average" input; like :func:`blurred_baseline` it avoids the black
    image, which many flows rate as their most likely input.
    """
    mean = data_mean.to(device=x.device, dtype=x.dtype)
    try:
        return mean.expand_as(x).clone()
    except RuntimeError:
        raise ValueError(
            f"data_mean of shape {tuple(mean.shape)} does not broadcast to {tuple(x.shape)}"
        ) from None


def _resolve_baseline(baseline: str | Tensor, x: Tensor, data_mean: Tensor | None) -> Tensor:
    if isinstance(baseline, Tensor):
        return mean_baseline(x, baseline)
    if baseline == "blur":
        return blurred_baseline(x)
    if baseline == "mean":
        if data_mean is None:
            raise ValueError("baseline='mean' needs data_mean= (on the level scale)")
        return mean_baseline(x, data_mean)
    if baseline == "zero":
        return torch.zeros_like(x)
    raise ValueError(f"baseline must be a tensor or one of {BASELINES}, got {baseline!r}")


# ---- attribution ----------------------------------------------------------------------------


def _clamp_straight_through(x: Tensor, low: float, high: float) -> Tensor:
    # Evaluate at the clamped point but pass the gradient straight through, so every noisy
    # sample still contributes a gradient for every pixel.
    return x + (x.clamp(low, high) - x).detach()


def attribute(
    model: HybridModel | FlowModel,
    x_levels: Tensor,
    target: str | TargetFn = "logit",
    method: str = "integrated_gradients",
    baseline: str | Tensor = "blur",
    class_index: int | Tensor | None = None,
    n_steps: int = 32,
    nt_samples: int = 8,
    nt_stdev: float | None = None,
    internal_batch_size: int | None = None,
    *,
    data_mean: Tensor | None = None,
    seed: int = 0,
) -> Tensor:
    """Attribute a per-example quantity of ``model`` to the input pixels.

    The explained input is ``x_levels + 0.5`` (bin centres on the level scale; continuous-data
    models use ``x_levels`` as is), and the quantity is computed by :func:`continuous_log_prob`
    / :func:`continuous_logits` with the model in eval mode and inside
    :func:`deterministic_logdets`.

    Args:
        model: A hybrid model (a bare flow supports ``target="log_prob"`` and callables).
        x_levels: Integer levels (any dtype), shape ``[N, *input_shape]``.
        target: ``"logit"`` (the logit of ``class_index``), ``"log_prob"`` (nats),
            ``"energy"`` (``-logsumexp(logits)``, Liu et al. 2020; higher = more OOD), or a
            callable ``f(model, x_cont) -> Tensor[N]``.
        method: ``"integrated_gradients"`` (Sundararajan et al. 2017), ``"saliency"``
            (``|∂f/∂x|``, Simonyan et al. 2014) or ``"noise_tunnel"`` (SmoothGrad over
            saliency, Smilkov et al. 2017).
        baseline: Integrated Gradients baseline: ``"blur"`` (default, see
            :func:`blurred_baseline`), ``"mean"`` (needs ``data_mean``), ``"zero"`` or a tensor
            on the level scale.
        class_index: Class explained by ``target="logit"``: an int or one per example;
            default: the predicted class.
        n_steps: Integration steps of Integrated Gradients.
        nt_samples: Noisy samples of the noise tunnel.
        nt_stdev: Noise standard deviation on the level scale; default ``0.1·K`` (10 % of
            the range, Smilkov et al. 2017).
        internal_batch_size: Rows per forward pass of Integrated Gradients (memory cap).
        data_mean: The data mean on the level scale, for ``baseline="mean"``.
        seed: Seed of the fixed log-det probes and of the noise tunnel's noise.

    Returns:
        Attributions with the input's shape (detached, on the CPU).
    """
    if not (callable(target) or target in EXPLAIN_TARGETS):
        raise ValueError(f"target must be a callable or one of {EXPLAIN_TARGETS}, got {target!r}")
    if method not in ATTRIBUTION_METHODS:
        raise ValueError(f"method must be one of {ATTRIBUTION_METHODS}, got {method!r}")
    flow = _flow_of(model)
    if target in ("logit", "energy") and not isinstance(model, HybridModel):
        raise ValueError(f"target={target!r} needs a HybridModel with a classifier head")
    if tuple(x_levels.shape[1:]) != flow.input_shape or x_levels.dim() < 2:
        raise ValueError(
            f"expected x_levels of shape [N, {', '.join(map(str, flow.input_shape))}], got "
            f"{tuple(x_levels.shape)}"
        )
    param = next(model.parameters())
    x = x_levels.detach().to(device=param.device, dtype=param.dtype)
    k = flow.num_levels
    if k is not None:
        if bool((x < 0).any()) or bool((x > k - 1).any()):
            raise ValueError(f"x_levels must lie in [0, {k - 1}]")
        x = x + 0.5

    def explained(inputs: Tensor) -> Tensor:
        if method == "noise_tunnel" and k is not None:
            # Noisy copies (SmoothGrad) can leave [0, K], where the logit preprocessing is
            # undefined, and near its edges the log-det gradient grows like 1/alpha and would
            # swamp the average: keep them within the bin centres [0.5, K - 0.5].
            inputs = _clamp_straight_through(inputs, 0.5, k - 0.5)
        if target == "logit":
            return continuous_logits(model, inputs)  # captum selects the class column
        if target == "log_prob":
            return continuous_log_prob(model, inputs)
        if target == "energy":
            return _energy(model, inputs)
        return target(model, inputs)

    # Remember every module's own flag: model.train(flag) alone would flatten mixed modes.
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with deterministic_logdets(model, seed=seed):
            captum_target = None
            if target == "logit":
                captum_target = _class_targets(model, x, class_index)
            if method == "integrated_gradients":
                base = _resolve_baseline(baseline, x, data_mean)
                attr = IntegratedGradients(explained).attribute(
                    x,
                    baselines=base,
                    target=captum_target,
                    n_steps=n_steps,
                    internal_batch_size=internal_batch_size,
                )
            elif method == "saliency":
                x.requires_grad_(True)  # captum would set it too, with a warning
                attr = Saliency(explained).attribute(x, target=captum_target, abs=True)
            else:
                if nt_stdev is None:
                    span = float(k) if k is not None else float(x.max() - x.min())
                    nt_stdev = 0.1 * span
                devices = [param.device] if param.device.type == "cuda" else []
                # captum draws the noise from the global generator: fork it for reproducibility.
                x.requires_grad_(True)
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(seed)
                    attr = NoiseTunnel(Saliency(explained)).attribute(
                        x,
                        nt_type="smoothgrad",
                        nt_samples=nt_samples,
                        stdevs=float(nt_stdev),
                        target=captum_target,
                        abs=True,
                    )
    finally:
        for module, mode in modes.items():
            module.training = mode
    return attr.detach().cpu()


def _class_targets(model: nn.Module, x: Tensor, class_index: int | Tensor | None) -> Tensor:
    """One class per example: given, or the prediction on the explained input."""
    n = x.shape[0]
    num_classes = model.num_classes
    if class_index is None:
        with torch.no_grad():
            return continuous_logits(model, x).argmax(dim=1)
    if isinstance(class_index, Tensor):
        targets = class_index.to(device=x.device, dtype=torch.long).reshape(-1)
        if targets.numel() == 1:
            targets = targets.expand(n)
        if targets.numel() != n:
            raise ValueError(f"class_index has {targets.numel()} entries for {n} examples")
    else:
        targets = torch.full((n,), int(class_index), dtype=torch.long, device=x.device)
    if bool((targets < 0).any()) or bool((targets >= num_classes).any()):
        raise ValueError(f"class_index must lie in [0, {num_classes - 1}]")
    return targets.contiguous()


# ---- figures --------------------------------------------------------------------------------


def _as_maps(t: Tensor, name: str) -> Tensor:
    """``[N, H, W]`` from ``[N, H, W]`` or ``[N, C, H, W]`` (summed over channels)."""
    t = t.detach().cpu().double()
    if t.dim() == 4:
        return t.sum(dim=1)
    if t.dim() == 3:
        return t
    raise ValueError(f"{name} must be [N, H, W] or [N, C, H, W], got {tuple(t.shape)}")


def save_attribution_overlays(
    images: Tensor,
    attributions: Tensor,
    path: str | Path,
    titles: list[str] | None = None,
    num_levels: int | None = None,
) -> Path:
    """Save a PNG with one row per example: image, attribution heatmap and their overlay.

    Multi-channel images are shown as their channel mean and attributions are summed over
    channels. The heatmap uses a diverging colormap symmetric around 0 (per row), so positive
    and negative evidence are told apart at a glance.

    Args:
        images: ``[N, H, W]`` or ``[N, C, H, W]`` images (levels or any float scale).
        attributions: The same shape as ``images``.
        path: Output file; parent directories are created.
        titles: One title per row.
        num_levels: Pixel alphabet, fixing the gray scale to ``[0, K-1]``.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    from matplotlib.figure import Figure  # deferred: only figures need matplotlib

    if tuple(images.shape) != tuple(attributions.shape):
        raise ValueError(
            f"images {tuple(images.shape)} and attributions {tuple(attributions.shape)} differ"
        )
    pixels = images.detach().cpu().double()
    pixels = pixels.mean(dim=1) if pixels.dim() == 4 else pixels
    heat = _as_maps(attributions, "attributions")
    n = heat.shape[0]
    if titles is not None and len(titles) != n:
        raise ValueError(f"got {len(titles)} titles for {n} examples")
    gray = {"cmap": "gray"}
    if num_levels is not None:
        gray.update(vmin=0, vmax=num_levels - 1)

    fig = Figure(figsize=(7.5, 2.4 * n))
    axes = fig.subplots(n, 3, squeeze=False)
    for i in range(n):
        scale = float(heat[i].abs().max()) or 1.0
        diverging = {"cmap": "RdBu_r", "vmin": -scale, "vmax": scale}
        ax_img, ax_heat, ax_over = axes[i]
        ax_img.imshow(pixels[i].numpy(), **gray)
        shown = ax_heat.imshow(heat[i].numpy(), **diverging)
        fig.colorbar(shown, ax=ax_heat, fraction=0.046, pad=0.04)
        ax_over.imshow(pixels[i].numpy(), **gray)
        ax_over.imshow(heat[i].numpy(), alpha=0.6, **diverging)
        ax_img.set_title(titles[i] if titles is not None else "image", fontsize=9)
        ax_heat.set_title("attribution", fontsize=9)
        ax_over.set_title("overlay", fontsize=9)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path
