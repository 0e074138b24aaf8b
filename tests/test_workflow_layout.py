"""The shipped UI workflows are laid out so every node is visible: no node's box overlaps
another's (issue 23, defect 6: the Latent node hid behind the RL Sampler).

A node's box is ``pos``/``size`` from the workflow JSON plus the title bar above ``pos`` (LiteGraph
draws it there). The front end grows a node to fit its sockets and widgets, so a stored size must
be at least the estimate below, or a node drawn bigger than stored could still cover its neighbour.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UI_WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
TITLE_H = 30  # LiteGraph.NODE_TITLE_HEIGHT
SLOT_H = 20  # LiteGraph.NODE_SLOT_HEIGHT
WIDGET_H = 24  # a widget row (20) plus its spacing
#: Node types whose content is taller than their widget rows (multiline text, image/text previews).
MIN_CONTENT_H = {"CLIPTextEncode": 160, "PrimitiveStringMultiline": 160, "SaveImage": 320, "PreviewImage": 320,
                 "PreviewAny": 160}


def min_height(node: dict) -> int:
    """A lower bound on the drawn height below the title: socket rows, then widget rows."""
    sockets = sum(1 for i in node.get("inputs", []) if "widget" not in i)
    rows = max(sockets, len(node.get("outputs", [])))
    estimate = rows * SLOT_H + len(node.get("widgets_values") or []) * WIDGET_H + 16
    return max(estimate, MIN_CONTENT_H.get(node["type"], 0))


def _xy(value) -> tuple[float, float]:
    return (value[0], value[1]) if isinstance(value, list) else (value["0"], value["1"])


def boxes(wf: dict) -> list[tuple[str, float, float, float, float]]:
    out = []
    for node in wf["nodes"]:
        (x, y), (w, h) = _xy(node["pos"]), _xy(node["size"])
        out.append((node.get("title") or node["type"], x, y - TITLE_H, x + w, y + h))
    return out


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=lambda p: p.name)
def test_no_node_overlaps_another(path):
    wf = json.loads(path.read_text())
    for node in wf["nodes"]:
        assert _xy(node["size"])[1] >= min_height(node), (
            f"{path.name}: {node.get('title')} is stored {_xy(node['size'])[1]} high but draws at least "
            f"{min_height(node)}")
    found = boxes(wf)
    overlaps = [(a[0], b[0]) for i, a in enumerate(found) for b in found[i + 1:]
                if a[1] < b[3] and b[1] < a[3] and a[2] < b[4] and b[2] < a[4]]
    assert not overlaps, f"{path.name}: overlapping nodes {overlaps}"


def test_the_overlap_check_sees_an_overlap():
    wf = json.loads((ROOT / "workflows" / "qr_art_feedback.json").read_text())
    sampler = next(n for n in wf["nodes"] if n.get("title") == "RL Sampler")
    latent = next(n for n in wf["nodes"] if n.get("title") == "Latent")
    latent["pos"] = [_xy(sampler["pos"])[0] - 20, _xy(sampler["pos"])[1] + 300]  # where it used to hide
    found = boxes(wf)
    a, b = (next(x for x in found if x[0] == t) for t in ("Latent", "RL Sampler"))
    assert a[1] < b[3] and b[1] < a[3] and a[2] < b[4] and b[2] < a[4]
