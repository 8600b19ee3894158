"""Named backbones, registered timm-style: ``@register_backbone def name(input_shape, **kw)``."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from ..naming import accepted_keywords, unknown_name_message
from ..transforms import MultiscaleFlow

__all__ = ["backbone_keywords", "create_backbone", "list_backbones", "register_backbone"]

BackboneFn = Callable[..., MultiscaleFlow]
_BACKBONES: dict[str, BackboneFn] = {}
_BASES: dict[str, BackboneFn] = {}  # named variants: the builder their **overrides go to
_FORWARDS: dict[Callable, Callable] = {}  # builder -> the callable its **kwargs go to


def register_backbone(
    fn: BackboneFn | None = None,
    *,
    name: str | None = None,
    base: BackboneFn | None = None,
    forwards: Callable | None = None,
):
    """Register a backbone builder under ``name`` (default: the function name, ``_`` → ``-``).

    So that a config's ``backbone_args`` can be checked before anything is built:

    * ``base``: for a named variant ``f(input_shape, **overrides)`` that calls another builder,
      that builder (its keywords are the variant's);
    * ``forwards``: for a builder with named keywords and ``**kwargs``, the class or function
      those go to (besides its first argument), e.g. every block's constructor.
    """

    def wrap(f: BackboneFn) -> BackboneFn:
        key = name or f.__name__.replace("_", "-")
        if key in _BACKBONES:
            raise ValueError(f"backbone {key!r} is already registered")
        _BACKBONES[key] = f
        if base is not None:
            _BASES[key] = base
        if forwards is not None:
            _FORWARDS[f] = forwards
        return f

    return wrap(fn) if fn is not None else wrap


def _keywords(fn: Callable) -> frozenset[str] | None:
    own = accepted_keywords(fn, skip=1)
    if own is not None or fn not in _FORWARDS:
        return own
    extra = accepted_keywords(_FORWARDS[fn], skip=1)
    params = list(inspect.signature(fn).parameters.values())[1:]
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return None if extra is None else frozenset(named) | extra


def backbone_keywords(name: str) -> frozenset[str] | None:
    """Keywords backbone ``name`` accepts besides ``input_shape`` (``None``: not declared)."""
    if name not in _BACKBONES:
        raise ValueError(unknown_name_message("backbone", name, _BACKBONES))
    return _keywords(_BASES.get(name, _BACKBONES[name]))


def list_backbones() -> list[str]:
    """Names accepted by :func:`create_backbone`."""
    return sorted(_BACKBONES)


def create_backbone(name: str, input_shape: tuple[int, ...], **kwargs) -> MultiscaleFlow:
    """Build the backbone ``name`` for inputs of ``input_shape`` (``(C, H, W)`` or ``(D,)``)."""
    if name not in _BACKBONES:
        raise ValueError(unknown_name_message("backbone", name, _BACKBONES))
    return _BACKBONES[name](tuple(input_shape), **kwargs)
