"""Speed options of a training or evaluation step: bf16 autocast, channels-last, torch.compile.

The trainer reads three config keys and calls only the two functions here:

* ``amp``: ``"none"`` (float32) or ``"bf16"``: :func:`autocast_context` wraps the forward pass;
* ``channels_last`` and ``compile``: :func:`prepare_model` applies them to a built model.

Under bf16 autocast the conditioner networks and the classifier head run in bfloat16 while the
flow arithmetic (log-determinants, dequantization, the logit transform, couplings' affine or
mixture maps, invertible 1×1 convolutions) stays float32: bf16 keeps 8 bits of mantissa, and a
log-likelihood summed over hundreds of dimensions would lose whole nats. How:

* every conditioner's output is cast to the dtype of the flow tensor it acts on where it enters
  the flow (couplings, MAF/IAF/NAF, the residual branch ``g`` of a residual block; the head's
  logits likewise), so all elementwise flow maps and every log-det sum see float32;
* the flow's own matrix products run with autocast switched off: invertible 1×1 convolutions,
  spectral-norm power iterations and weight normalization, and the fixed-point inverse of
  residual blocks (:func:`hybridflow.nets.amp.autocast_disabled`);
* in residual blocks ``g`` and its vector–Jacobian products run in bf16, while probes and every
  term of the Neumann / Russian-roulette series are accumulated in float32.

Without autocast every one of these casts and switches is a no-op, so float32 (and float64)
results are bit-identical to a build without them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["AMP_MODES", "CompiledModel", "autocast_context", "prepare_model"]

#: Values of the ``amp`` config key.
AMP_MODES = ("none", "bf16")


def _check_amp(amp: str) -> None:
    if amp not in AMP_MODES:
        raise ValueError(f"amp must be one of {AMP_MODES}, got {amp!r}")


@contextlib.contextmanager
def autocast_context(amp: str, device: torch.device | str) -> Iterator[None]:
    """bf16 autocast on ``device`` (CPU or CUDA) when ``amp == "bf16"``, else nothing."""
    _check_amp(amp)
    if amp == "none":
        yield
        return
    with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
        yield


class CompiledModel:
    """``model`` whose ``loss`` and ``__call__`` (forward) run through ``torch.compile``.

    ``torch.compile(model)`` compiles only ``forward``: a loop that calls ``model.loss`` (as
    the hybridflow trainer does) would run eagerly. This wrapper compiles the methods the loop
    calls and forwards every other attribute (``train``, ``parameters``, ``state_dict``,
    ``flow``, ...) to ``model`` itself, so parameters, state_dict keys and checkpoints stay
    those of ``model``. It is deliberately not an ``nn.Module``: copies (EMA) and checkpoints
    should be taken of :attr:`module`, never of the compiled wrapper.

    Data-dependent checks split the compiled graph ("graph breaks") rather than failing: the
    input validation of :class:`~hybridflow.models.FlowModel`, the dequantizer and the logit
    transform (host reads of ``any()``) run eagerly before the compiled body. Residual blocks
    run eagerly as a whole (:class:`~hybridflow.transforms.ResidualBlock` is excluded from
    compilation: aot_autograd cannot compile the double backward of its log-det estimators,
    and the roulette's term count is read with ``.item()``), so compiling does not speed up
    residual flows; it still compiles what surrounds them.

    Args:
        model: The model (e.g. :class:`~hybridflow.models.HybridModel`).
        **compile_kwargs: Passed to ``torch.compile`` (``mode``, ``dynamic``, ``backend``, ...).
    """

    def __init__(self, model: nn.Module, **compile_kwargs: Any) -> None:
        self.module = model
        self._forward = torch.compile(model, **compile_kwargs)
        loss = getattr(model, "loss", None)
        if callable(loss):  # e.g. HybridModel.loss; a module whose forward is the loss has none
            self.loss = torch.compile(loss, **compile_kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._forward(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes this wrapper does not define itself.
        module = self.__dict__.get("module")
        if module is None:  # during copying or unpickling, before __init__'s attributes exist
            raise AttributeError(name)
        return getattr(module, name)

    def __repr__(self) -> str:
        return f"CompiledModel({self.module!r})"


def prepare_model(
    model: nn.Module, *, channels_last: bool = False, compile: bool = False
) -> nn.Module | CompiledModel:
    """Return ``model`` in channels-last memory format and/or with its step compiled.

    ``channels_last`` converts 4-D parameters and buffers of ``model`` in place (values and
    state_dict keys unchanged); feed images in the same format
    (``x.to(memory_format=torch.channels_last)``). ``compile`` returns a
    :class:`CompiledModel`, whose ``loss(x, y, lam)`` and ``__call__`` are compiled and whose
    other attributes are ``model``'s. The returned object is what the loop calls; parameters,
    state_dict and checkpoints stay those of ``model``.
    """
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile:
        return CompiledModel(model)
    return model
