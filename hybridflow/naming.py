"""One way to say that a name is unknown: the closest valid one first, then the full list.

Typos in backbone, dataset, score, config and pretrained-model names all end here, so every
refusal reads the same: ``unknown backbone 'resflw'; did you mean 'resflow'? (valid: ...)``.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterable

__all__ = ["accepted_keywords", "closest_name", "path_slug", "unknown_name_message"]


def closest_name(name: str, choices: Iterable[str]) -> str | None:
    """The valid name closest to ``name`` (difflib ratio ≥ 0.6, case-insensitive), or ``None``."""
    options = list(choices)
    by_lower = {c.lower(): c for c in options}
    match = difflib.get_close_matches(str(name).lower(), list(by_lower), n=1, cutoff=0.6)
    return by_lower[match[0]] if match else None


def unknown_name_message(kind: str, name: str, choices: Iterable[str], max_listed: int = 40) -> str:
    """``unknown KIND 'NAME'; did you mean 'X'? (valid: a, b, ...)`` for an error message."""
    options = sorted(set(choices))
    best = closest_name(name, options)
    hint = f"; did you mean {best!r}?" if best is not None else ""
    listed = ", ".join(options[:max_listed]) + (", ..." if len(options) > max_listed else "")
    return f"unknown {kind} {name!r}{hint} (valid: {listed})"


def accepted_keywords(fn: Callable, skip: int = 0) -> frozenset[str] | None:
    """The keyword names ``fn`` accepts after its first ``skip`` parameters, or ``None`` when it
    takes ``**kwargs`` (any name might be valid)."""
    params = list(inspect.signature(fn).parameters.values())[skip:]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def path_slug(text: str) -> str:
    """``text`` as part of a file or folder name: ``/`` reads ``over``, other characters outside
    letters, digits and ``.+-_`` become ``_`` (``"1/D"`` → ``"1overD"``)."""
    keep = "".join(c if c.isalnum() or c in ".+-_" else "_" for c in text.replace("/", "over"))
    return keep.strip("_") or "_"
