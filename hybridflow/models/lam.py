"""λ, the weight of the generative term: loss = CE + λ · NLL (Nalisnick et al. 2019, §3).

λ enters as a number ≥ 0 or as ``"1/D"`` (the per-dimension NLL, Chen et al. 2019 §5.4) from a
command line, a config or a results file; :meth:`Lambda.parse` reads it once, and the value
carries its spelling (cell names, tables), its folder-name form, its sort order and its weight
for a model of D dimensions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..naming import path_slug

__all__ = ["Lambda", "resolve_lambda"]


@dataclass(frozen=True, eq=False)
class Lambda:
    """A parsed λ: ``number`` ≥ 0, or ``None`` for 1/D; ``label`` is its spelling without spaces.

    Two λ are equal when they weigh the NLL alike (``"0.5"`` and ``0.5``; ``"1/D"`` and ``"1/d"``).

    >>> lam = Lambda.parse("1/D")
    >>> lam.value(784), lam.slug, str(lam)
    (0.0012755102040816326, '1overD', '1/D')
    """

    label: str
    number: float | None

    @classmethod
    def parse(cls, value: Lambda | str | float) -> Lambda:
        """λ from a number or a string (``"1/D"``, ``"0.5"``, ``"1e-3"``).

        Raises:
            ValueError: Not a number or ``"1/D"``; negative or not finite.
        """
        if isinstance(value, Lambda):
            return value
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ValueError(f"lambda must be a number or '1/D', got {value!r}")
        label = str(value).strip().replace(" ", "")
        if label.upper() == "1/D":
            return cls(label, None)
        try:
            number = float(label)
        except ValueError:
            raise ValueError(f"lambda must be a number or '1/D', got {value!r}") from None
        if not math.isfinite(number) or number < 0:
            raise ValueError(f"lambda must be finite and >= 0, got {number}")
        return cls(label, number)

    @property
    def per_dimension(self) -> bool:
        """Whether λ is 1/D."""
        return self.number is None

    @property
    def is_zero(self) -> bool:
        """λ = 0: a plain classifier on the flow's features."""
        return self.number == 0

    def value(self, dim: int) -> float:
        """The weight of the NLL for a model of ``dim`` dimensions."""
        return 1.0 / dim if self.number is None else self.number

    @property
    def slug(self) -> str:
        """The label as a folder-name part: ``"1overD"``, ``"0.5"``."""
        return path_slug(self.label)

    @property
    def sort_key(self) -> tuple[int, float]:
        """Order of tables and figures: 0, then 1/D (tiny but above 0), then numbers ascending."""
        if self.number is None:
            return (1, 0.0)
        return (0 if self.number == 0 else 2, self.number)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Lambda) and self.number == other.number

    def __hash__(self) -> int:
        return hash(self.number)

    def __str__(self) -> str:
        return self.label


def resolve_lambda(lam: Lambda | float | str, dim: int) -> float:
    """Turn λ given as a number or as ``"1/D"`` into a float (see :meth:`Lambda.parse`)."""
    return Lambda.parse(lam).value(dim)
