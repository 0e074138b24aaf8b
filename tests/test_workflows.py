"""The shipped workflows: well-formed JSON always; against a real ComfyUI's /object_info when
``COMFYUI_PATH`` is set (every node type exists, widget counts and link types match: the front
end would load them with no missing nodes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from comfy_helpers import load_api

ROOT = Path(__file__).resolve().parents[1]
UI_WORKFLOWS = [ROOT / "workflows" / name for name in ("qr_art_scheduled.json", "qr_art_feedback.json", "qr_art_luma.json",
                                                         "qr_art_guided.json", "qr_rl_collect.json")]
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
API_TITLES = ["Prompt", "Negative", "QR Payload", "Latent", "RL Sampler", "ControlNet", "Checkpoint", "Recorder"]


def _ui(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=lambda p: p.name)
def test_ui_workflow_links_are_consistent(path):
    wf = _ui(path)
    assert wf["version"] == 0.4
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"]) and wf["last_node_id"] >= max(nodes)
    assert wf["last_link_id"] >= max(link[0] for link in wf["links"])
    for link_id, src, src_slot, dst, dst_slot, typ in wf["links"]:
        out = nodes[src]["outputs"][src_slot]
        inp = nodes[dst]["inputs"][dst_slot]
        assert link_id in out["links"] and inp["link"] == link_id
        assert out["type"] == typ and inp["type"] in (typ, "*"), (path.name, link_id)
    titles = [n.get("title") for n in wf["nodes"]]
    assert len(titles) == len(set(titles)), "titles are override names: keep them unique"


def test_api_workflow_shape():
    wf = load_api()
    titles = [n["_meta"]["title"] for n in wf.values()]
    for title in API_TITLES:
        assert titles.count(title) == 1, title
    for node in wf.values():
        for value in node["inputs"].values():
            if isinstance(value, list):
                assert value[0] in wf, f"link to missing node {value}"


def _widget_inputs(info: dict) -> list[tuple[str, dict, bool]]:
    out = []
    order = info.get("input_order") or {k: list(v) for k, v in info["input"].items()}
    for section in ("required", "optional"):
        for name in order.get(section, []):
            spec = info["input"][section][name]
            typ = spec[0]
            if isinstance(typ, list) or typ in WIDGET_TYPES:
                out.append((name, spec[1] if len(spec) > 1 else {}, section == "optional"))
    return out


@pytest.mark.comfyui
@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=lambda p: p.name)
def test_ui_workflow_matches_object_info(comfy_server, path):
    info = comfy_server.object_info()
    wf = _ui(path)
    missing = sorted({n["type"] for n in wf["nodes"] if n["type"] not in info})
    assert not missing, f"{path.name}: node types missing from /object_info: {missing}"
    for node in wf["nodes"]:
        spec = info[node["type"]]
        widgets = _widget_inputs(spec)
        widget_names = {i["widget"]["name"] for i in node["inputs"] if "widget" in i}
        expected = 0
        for name, opts, optional in widgets:
            if optional and name not in widget_names:
                continue
            expected += 2 if opts.get("control_after_generate") else 1
        assert len(node["widgets_values"]) == expected, (path.name, node["type"], node["widgets_values"], widgets)
        for out, name, typ in zip(node["outputs"], spec["output_name"], spec["output"]):
            assert out["type"] == typ and out["name"] == name, (node["type"], out)
        socket_names = {k for section in spec["input"].values() for k in section}
        for inp in node["inputs"]:
            assert inp["name"] in socket_names, (node["type"], inp["name"])


@pytest.mark.comfyui
def test_api_workflow_matches_object_info(comfy_server):
    info = comfy_server.object_info()
    for key, node in load_api().items():
        spec = info.get(node["class_type"])
        assert spec is not None, f"node {key}: {node['class_type']} missing from /object_info"
        required = set(spec["input"].get("required", {}))
        known = required | set(spec["input"].get("optional", {}))
        assert required <= set(node["inputs"]), (key, sorted(required - set(node["inputs"])))
        assert set(node["inputs"]) <= known, (key, sorted(set(node["inputs"]) - known))


def test_luma_workflow_turns_luma_control_on():
    """qr_art_luma.json: the feedback workflow with luma-only control on (the last two sampler widgets)."""
    node = next(n for n in _ui(ROOT / "workflows" / "qr_art_luma.json")["nodes"] if n["type"] == "QRControlNetSamplerRL")
    names = [i["widget"]["name"] for i in node["inputs"] if "widget" in i]
    assert names[-2:] == ["luma_control", "keyframes_per_sample"]
    assert node["widgets_values"][-2:] == [True, ""]
    assert any(i["name"] == "qr_code" and i["link"] is not None for i in node["inputs"])  # module feedback too


def test_guided_workflow_turns_scan_guidance_on():
    """qr_art_guided.json: the luma workflow with scan guidance on the last steps (the last three widgets)."""
    node = next(n for n in _ui(ROOT / "workflows" / "qr_art_guided.json")["nodes"] if n["type"] == "QRControlNetSamplerRL")
    names = [i["widget"]["name"] for i in node["inputs"] if "widget" in i]
    assert names[-5:] == ["luma_control", "keyframes_per_sample", "scan_guidance", "guidance_margin", "guidance_start"]
    assert node["widgets_values"][-5:] == [True, "", 1.0, 0.05, 0.9]
    assert any(i["name"] == "qr_code" and i["link"] is not None for i in node["inputs"])  # guidance needs the code
