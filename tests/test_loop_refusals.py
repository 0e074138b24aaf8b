"""``qr-rl loop`` never takes a prompt that ComfyUI only partly accepted for a success (issue 23,
defect 3), in any round and on any server. No ComfyUI needed: two fake servers answer ``/prompt``
the way ComfyUI 0.8.0 does when the CLIP weights of ``workflows/api/qr_rl_collect.json`` are
missing: HTTP 200, a prompt id, and ``node_errors`` for node 12 (its recorder output dropped).
The real-ComfyUI version of this is in ``tests/test_comfy_day_one.py``."""

from __future__ import annotations

import http.server
import json
import threading
from pathlib import Path

import pytest

from rl.comfy_client import ComfyNodeError
from rl.loop import LoopConfig, RunState, _frozen, run_loop

NODE_ERRORS = {"12": {"class_type": "QRClipScorerLoader", "dependent_outputs": ["15"], "errors": [
    {"type": "value_not_in_list", "message": "Value not in list",
     "details": "weights: 'open_clip_vit_b_32.safetensors' not in []",
     "extra_info": {"input_name": "weights"}}]}}


class FakeComfy:
    """Answers like ComfyUI with the CLIP weights missing; records what it was asked."""

    def __init__(self) -> None:
        self.prompts: list[str] = []
        self.dropped: list[str] = []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _json(self, body, status: int = 200) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # noqa: N802 - http.server's naming
                if self.path.startswith("/object_info"):
                    from rl.comfy_backend import DEFAULT_WORKFLOW

                    wf = json.loads(DEFAULT_WORKFLOW.read_text())
                    self._json({n["class_type"]: {} for n in wf.values()})
                elif self.path.startswith("/history"):
                    self._json({})
                elif self.path.startswith("/queue"):
                    self._json({"queue_running": [], "queue_pending": []})
                elif self.path.startswith("/system_stats"):
                    self._json({})
                else:
                    self._json({}, 404)

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if self.path == "/prompt":
                    pid = body.get("prompt_id", "p")
                    fake.prompts.append(pid)
                    self._json({"prompt_id": pid, "number": len(fake.prompts), "node_errors": NODE_ERRORS})
                elif self.path == "/queue":
                    fake.dropped.extend(body.get("delete", []))
                    self._json({})
                else:
                    self._json({})

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def fakes():
    servers = [FakeComfy(), FakeComfy()]
    yield servers
    for s in servers:
        s.close()


def _cfg(tmp_path: Path, urls: list[str]) -> LoopConfig:
    cn_dir = tmp_path / "controlnet"
    cn_dir.mkdir(parents=True, exist_ok=True)
    (cn_dir / "base-cn.safetensors").write_bytes(b"not used: the loop stops before training")
    return LoopConfig(backend="comfy", servers=urls, per_server_concurrency=2, run_dir=str(tmp_path / "run"),
                      rounds=2, prompts=["a lighthouse"], payloads=["QR-RL"], seeds=4, batch=1,
                      controlnet="base-cn.safetensors", checkpoint="sd15.safetensors", controlnet_dir=str(cn_dir),
                      progress=False)


def _finished_round_0(cfg: LoopConfig) -> None:
    """A run folder whose round 0 is done, as the loop leaves it."""
    run = Path(cfg.run_dir)
    run.mkdir(parents=True)
    exported = Path(cfg.controlnet_dir) / "qr-rl-r0.safetensors"
    exported.write_bytes(b"r0")
    state = RunState(run)
    state.data = {"version": 1, "name": cfg.name, "round": 0, "settings": _frozen(cfg, cfg.prompts, cfg.payloads),
                  "rounds": [{"round": 0, "phase": "done", "strength": cfg.start_strength,
                              "controlnet": cfg.controlnet, "controlnet_path": str(exported),
                              "exported": str(exported), "exported_name": exported.name,
                              "metrics": {"decode_rate": 0.5}}]}
    state.save()


@pytest.mark.parametrize("round_index", [0, 1])
def test_loop_refuses_dropped_outputs_in_every_round_on_every_server(tmp_path, fakes, round_index):
    cfg = _cfg(tmp_path, [f.url for f in fakes])
    if round_index:
        _finished_round_0(cfg)
    with pytest.raises(ComfyNodeError) as e:
        run_loop(cfg, log=lambda m: None)
    assert "node 12 'CLIP Scorer' (QRClipScorerLoader)" in str(e.value) and "weights" in str(e.value)
    state = json.loads((Path(cfg.run_dir) / "state.json").read_text())
    assert len(state["rounds"]) == round_index + 1 and state["rounds"][-1]["phase"] == "collect"
    manifest = Path(cfg.run_dir) / "rounds" / f"r{round_index:03d}" / "manifest.json"
    assert json.loads(manifest.read_text())["entries"] == []  # nothing counted as collected
    asked = [p for f in fakes for p in f.prompts]
    assert asked and all(p in f.dropped for f in fakes for p in f.prompts)  # every remnant taken off the queue


def test_loop_refuses_on_whichever_server_answers(tmp_path, fakes):
    """One server alone: the refusal does not depend on which server a job lands on."""
    for fake in fakes:
        cfg = _cfg(tmp_path / fake.url.rsplit(":", 1)[1], [fake.url])
        with pytest.raises(ComfyNodeError, match="node 12 'CLIP Scorer'"):
            run_loop(cfg, log=lambda m: None)
        assert fake.prompts and set(fake.prompts) <= set(fake.dropped)
