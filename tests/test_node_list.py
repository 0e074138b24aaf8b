"""The pack's node list: explicit in ``nodes/__init__.py``, and complete.

Why: ComfyUI registers what ``QRRLExtension.get_node_list`` returns. A list keeps what the pack
registers in one place; this test keeps it honest against every node class in ``nodes/``.
(``tests/test_comfyui_pack.py`` checks the same ids against a running ComfyUI.)
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _node_classes(tree: ast.AST) -> set[str]:
    """Classes deriving from ``io.ComfyNode`` (or ``ComfyNode``) in a parsed module."""
    def is_node(base: ast.expr) -> bool:
        return (isinstance(base, ast.Attribute) and base.attr == "ComfyNode") or (
            isinstance(base, ast.Name) and base.id == "ComfyNode")

    return {n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and any(map(is_node, n.bases))}


def test_the_extension_lists_every_node_class_once():
    init = ast.parse((REPO / "nodes" / "__init__.py").read_text(encoding="utf-8"))
    fn = next(n for n in init.body if isinstance(n, ast.FunctionDef) and n.name == "all_nodes")
    ret = next(n for n in ast.walk(fn) if isinstance(n, ast.Return))
    assert isinstance(ret.value, ast.List), "all_nodes() returns an explicit list"
    listed = [e.id for e in ret.value.elts if isinstance(e, ast.Name)]
    assert len(listed) == len(ret.value.elts) == len(set(listed))
    defined: set[str] = set()
    for path in sorted((REPO / "nodes").glob("*.py")):
        defined |= _node_classes(ast.parse(path.read_text(encoding="utf-8")))
    assert set(listed) == defined
    imported = {a.name for n in ast.walk(fn) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert imported == defined
