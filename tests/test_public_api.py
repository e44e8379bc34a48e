"""The public surface: a curated, sorted ``__all__`` that imports, and a sidecar that uses only it."""

from __future__ import annotations

import ast
from pathlib import Path

import mcpguard

REPO = Path(__file__).resolve().parents[1]


def test_all_is_sorted_unique_and_importable() -> None:
    """Every name in ``mcpguard.__all__`` exists, and the list is sorted without repeats."""
    names = mcpguard.__all__
    assert names == sorted(set(names))
    missing = [name for name in names if not hasattr(mcpguard, name)]
    assert missing == []


def test_all_matches_the_public_names_defined() -> None:
    """No public name is imported into the package without being listed in ``__all__``."""
    tree = ast.parse((REPO / "mcpguard" / "__init__.py").read_text())
    imported = {
        alias.asname or alias.name
        for node in tree.body
        if isinstance(node, ast.ImportFrom) and node.module != "__future__"
        for alias in node.names
    }
    assert imported == set(mcpguard.__all__)


def test_sidecar_uses_only_the_public_api() -> None:
    """``sidecar/`` imports mcpguard names only from the package itself, never from its modules."""
    offenders = []
    for path in sorted((REPO / "sidecar").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mcpguard."):
                offenders.append(f"{path.name}: from {node.module}")
            if isinstance(node, ast.Import):
                offenders += [f"{path.name}: import {a.name}" for a in node.names if a.name.startswith("mcpguard.")]
    assert offenders == []
