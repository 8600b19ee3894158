"""The package's layers (docs/ARCHITECTURE.md): every module imports only from layers below its own.

Read from the source with ``ast`` (imports inside functions included), so a lazy import that
goes upwards is caught as well.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hybridflow"

#: Rank of every top-level module or package: a module may import from lower ranks only.
#: Equal ranks are independent of each other (models and data import neither).
LAYERS = {
    "naming": 0,
    "nets": 1,
    "transforms": 2,
    "models": 3,
    "data": 3,
    "evaluation": 4,
    "runs": 5,
    "training": 6,
    "reports": 7,
    "pretrained": 7,
    "experiments": 8,
    "cli": 9,
    "__init__": 10,
    "__main__": 10,
}

#: Deprecated re-exports of names that moved up a layer (issue 30), for one release.
ALLOWED_UPWARD = {
    ("reports/__init__.py", "experiments"),
    ("reports/study/__init__.py", "experiments"),
    ("reports/grid.py", "experiments"),
    ("reports/sweep.py", "experiments"),
}


def _imported_packages(path: Path) -> set[str]:
    """Top-level hybridflow modules that ``path`` imports (absolute or relative)."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    package = parts[:-1]  # the package a relative import starts from
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)]
            target = base + (node.module.split(".") if node.module else [])
            found |= {target[0]} if target else {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hybridflow"):
            names = node.module.split(".")
            found |= {names[1]} if len(names) > 1 else {alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("hybridflow.")}
    return found


def test_every_module_imports_only_from_lower_layers() -> None:
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        own = rel.parts[0].removesuffix(".py")
        assert own in LAYERS, f"{rel}: place the new top-level module {own!r} in LAYERS"
        for target in _imported_packages(path) - {own}:
            assert target in LAYERS, f"{rel} imports unknown hybridflow.{target}"
            if LAYERS[target] >= LAYERS[own] and (rel.as_posix(), target) not in ALLOWED_UPWARD:
                upward.append(f"{rel} ({own}) imports {target}")
    assert not upward, "imports that go up a layer:\n" + "\n".join(upward)


def test_the_check_sees_relative_and_lazy_imports() -> None:
    """The scanner itself: a lazy relative import two levels up is found."""
    module = PACKAGE / "reports" / "study" / "__init__.py"
    assert "experiments" in _imported_packages(module)  # `from ... import experiments`, lazily
    assert "models" in _imported_packages(PACKAGE / "runs" / "folder.py")
