"""A small client for ComfyUI's HTTP/WebSocket API, for headless collection (docs/design.md §6).

Why our own: the loop needs exactly five things from a ComfyUI server (``/object_info``,
``/prompt``, ``/ws`` progress, ``/history`` results, ``/view`` downloads) with clear errors, and
must survive servers that restart or die. Everything here is the standard library plus
``websocket-client`` (optional: without it, or when the socket fails, we poll ``/history``).

Errors are plain words, never JSON dumps: :class:`ComfyNodeError` names the node (id, class
type, title) and ComfyUI's message; :class:`ComfyUnavailable` says the URL and how to start
ComfyUI. Connection errors are retried with exponential backoff; node errors never are.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import queue
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import QRRLError
from .files import atomic_write_bytes

RECORDER_CLASS = "QRTrajectoryRecorder"
START_HINT = "start it with `python main.py --listen 127.0.0.1 --port 8188` in your ComfyUI folder"

ProgressCallback = Callable[[dict[str, Any]], None]


class ComfyError(QRRLError):
    """Something went wrong talking to ComfyUI (base class)."""


class ComfyUnavailable(ComfyError):
    """The server cannot be reached (not started, crashed, wrong URL)."""


class ComfyTimeout(ComfyError):
    """A prompt did not finish in time."""


class ComfyInterrupted(ComfyError):
    """A prompt was interrupted or cancelled."""


class ComfyNodeError(ComfyError):
    """ComfyUI rejected the workflow or a node failed while running; names the node."""

    def __init__(self, message: str, node_id: str | None = None, class_type: str | None = None,
                 title: str | None = None, details: list[str] | None = None):
        super().__init__(message)
        self.node_id = node_id
        self.class_type = class_type
        self.title = title
        self.details = details or []


# --------------------------------------------------------------------------------------------
# workflow editing (pure functions)


def node_titles(api_prompt: Mapping[str, Any]) -> dict[str, str]:
    """``node id -> title`` (``_meta.title``, or the class type when untitled)."""
    return {nid: str((node.get("_meta") or {}).get("title") or node.get("class_type", "?"))
            for nid, node in api_prompt.items() if isinstance(node, Mapping)}


def _available(api_prompt: Mapping[str, Any]) -> str:
    return ", ".join(f"{t!r} (node {nid}, {api_prompt[nid].get('class_type')})"
                     for nid, t in node_titles(api_prompt).items())


def find_node(api_prompt: Mapping[str, Any], ref: str) -> str:
    """Node id for ``ref``: a node id, or a unique title (``_meta.title``)."""
    if ref in api_prompt and isinstance(api_prompt[ref], Mapping):
        return ref
    hits = [nid for nid, title in node_titles(api_prompt).items() if title == ref]
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:
        raise QRRLError(f"workflow has {len(hits)} nodes titled {ref!r} (nodes {', '.join(hits)}); "
                        f"address one by its node id, e.g. '{hits[0]}.<input>', or give the nodes unique titles")
    raise QRRLError(f"workflow has no node titled or numbered {ref!r}; nodes available: {_available(api_prompt)}")


def apply_overrides(api_prompt: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``api_prompt`` with inputs replaced: keys ``"Title.input"`` or ``"node_id.input"``.

    The title may itself contain dots (the input name is after the last dot). An override
    naming no node, or an input the node does not have, raises ``QRRLError`` listing what
    exists. Overriding a linked input (``["2", 0]``) with a literal value is allowed.
    """
    out = copy.deepcopy(dict(api_prompt))
    for key, value in overrides.items():
        if "." not in key:
            raise QRRLError(f"override {key!r} must be 'Title.input' or 'node_id.input', e.g. 'RL Sampler.seed'")
        ref, name = key.rsplit(".", 1)
        nid = find_node(out, ref)
        inputs = out[nid].setdefault("inputs", {})
        if name not in inputs:
            raise QRRLError(
                f"override {key!r}: node {nid} {node_titles(out)[nid]!r} ({out[nid].get('class_type')}) has no input "
                f"{name!r}; its inputs are: {', '.join(sorted(inputs)) or '(none)'}"
            )
        inputs[name] = copy.deepcopy(value)
    return out


def check_workflow(api_prompt: Mapping[str, Any], object_info: Mapping[str, Any] | None = None,
                   require_recorder: bool = True) -> list[str]:
    """Validate an API-format workflow before submitting it; return the recorder node ids.

    Raises ``QRRLError`` for: a UI-format file (``nodes``/``links``), nodes without
    ``class_type``, node types the server does not have (listed by id, class and title), and
    (``require_recorder``) a workflow without a Trajectory Recorder node.
    """
    if not isinstance(api_prompt, Mapping) or not api_prompt:
        raise QRRLError("the workflow is empty or not a JSON object; export it with 'Save (API)' in ComfyUI")
    if "nodes" in api_prompt and "links" in api_prompt:
        raise QRRLError("this is a UI-format workflow; headless runs need the API format "
                        "(ComfyUI: Workflow menu → Export (API)), e.g. workflows/api/qr_rl_collect.json")
    titles = node_titles(api_prompt)
    bad = [nid for nid, n in api_prompt.items() if not isinstance(n, Mapping) or "class_type" not in n]
    if bad:
        raise QRRLError(f"workflow nodes {', '.join(map(str, bad))} have no class_type; is this an API-format workflow?")
    if object_info is not None:
        missing = [(nid, n["class_type"]) for nid, n in api_prompt.items() if n["class_type"] not in object_info]
        if missing:
            listed = "; ".join(f"node {nid} {titles[nid]!r} needs {ct}" for nid, ct in missing)
            ours = any(ct.startswith("QR") for _, ct in missing)
            raise QRRLError(
                f"the ComfyUI server lacks {len(missing)} node type(s): {listed}. "
                + ("Install this pack into ComfyUI/custom_nodes (comfyui-qr-rl) and restart ComfyUI; "
                   "check its log for import errors" if ours else "install the custom nodes that provide them")
            )
    recorders = [nid for nid, n in api_prompt.items() if n["class_type"] == RECORDER_CLASS]
    if require_recorder and not recorders:
        raise QRRLError(
            f"the workflow has no Trajectory Recorder ({RECORDER_CLASS}) node, so it would write no shards; "
            "start from workflows/api/qr_rl_collect.json or add the recorder after the RL sampler"
        )
    return recorders


# --------------------------------------------------------------------------------------------
# results


@dataclass
class PromptResult:
    """A finished prompt: its id, the server, and the history entry's ``outputs``."""

    prompt_id: str
    server: str
    outputs: dict[str, Any] = field(default_factory=dict)
    status: dict[str, Any] = field(default_factory=dict)

    def files(self, key: str | None = None, node_id: str | None = None) -> list[dict[str, str]]:
        """File references ``{filename, subfolder, type}`` from the UI outputs (e.g. ``key="shards"``)."""
        found = []
        for nid, node_out in self.outputs.items():
            if node_id is not None and nid != node_id:
                continue
            for k, items in (node_out or {}).items():
                if key is not None and k != key:
                    continue
                if isinstance(items, list):
                    found.extend(i for i in items if isinstance(i, dict) and "filename" in i)
        return found

    def texts(self) -> list[str]:
        return [t for node_out in self.outputs.values() for t in (node_out or {}).get("text", []) if isinstance(t, str)]


def _id_key(nid: str) -> tuple[int, int | str]:
    """Numeric node ids in numeric order, then any other ids by name."""
    return (0, int(nid)) if str(nid).isdigit() else (1, str(nid))


def _format_node_errors(body: Mapping[str, Any], api_prompt: Mapping[str, Any] | None, url: str) -> ComfyNodeError:
    titles = node_titles(api_prompt or {})
    lines: list[str] = []
    first: tuple[str | None, str | None, str | None] = (None, None, None)
    # ComfyUI's order of node_errors follows its output traversal, which varies run to run;
    # sort by node id so the first error reported (and raised with) is stable.
    for nid, info in sorted((body.get("node_errors") or {}).items(), key=lambda kv: _id_key(kv[0])):
        ct = info.get("class_type") or (api_prompt or {}).get(nid, {}).get("class_type")
        title = titles.get(nid, ct)
        if first[0] is None:
            first = (nid, ct, title)
        for err in info.get("errors") or []:
            extra = err.get("extra_info") or {}
            name = extra.get("input_name")
            what = f"input {name!r}: " if name else ""
            detail = err.get("details") or ""
            lines.append(f"node {nid} {title!r} ({ct}): {what}{err.get('message', 'error')}"
                         + (f" — {detail}" if detail and detail not in err.get("message", "") else ""))
    err = body.get("error") or {}
    if not lines:
        msg = err.get("message") or "the workflow was rejected"
        details = err.get("details") or ""
        nid = None
        if details.startswith("Node ID '#"):
            nid = details[len("Node ID '#"):].rstrip("'")
            ct = (api_prompt or {}).get(nid, {}).get("class_type")
            first = (nid, ct, titles.get(nid, ct))
            lines.append(f"node {nid} {first[2]!r} ({ct}): {msg}")
        else:
            lines.append(msg + (f": {details}" if details else ""))
    text = f"ComfyUI at {url} rejected the workflow: " + "; ".join(lines)
    return ComfyNodeError(text, *first, details=lines)


def _execution_error(data: Mapping[str, Any], api_prompt: Mapping[str, Any] | None, url: str) -> ComfyNodeError:
    nid = str(data.get("node_id")) if data.get("node_id") is not None else None
    ct = data.get("node_type") or (api_prompt or {}).get(nid or "", {}).get("class_type")
    title = node_titles(api_prompt or {}).get(nid or "", ct)
    msg = str(data.get("exception_message") or "unknown error").strip()
    etype = str(data.get("exception_type") or "").rsplit(".", 1)[-1]
    text = f"ComfyUI at {url}: node {nid} {title!r} ({ct}) failed: {msg}" + (f" [{etype}]" if etype else "")
    return ComfyNodeError(text, nid, ct, title, details=[msg])


# --------------------------------------------------------------------------------------------
# the client


class ComfyClient:
    """One ComfyUI server. Thread-safe (no shared mutable state besides settings).

    ``timeout``: seconds per HTTP request; ``retries``: extra attempts on connection errors
    (refused, reset, timed out), waiting ``backoff · 2^attempt`` seconds in between.
    """

    def __init__(self, url: str = "http://127.0.0.1:8188", timeout: float = 30.0, retries: int = 3,
                 backoff: float = 0.5, use_websocket: bool = True):
        url = url.strip().rstrip("/")
        if "://" not in url:
            url = "http://" + url
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise QRRLError(f"server URL {url!r} must look like http://127.0.0.1:8188")
        self.url = url
        self.timeout = float(timeout)
        self.retries = max(0, int(retries))
        self.backoff = max(0.0, float(backoff))
        self.use_websocket = use_websocket

    def __repr__(self) -> str:
        return f"ComfyClient({self.url!r})"

    # ---- HTTP
    def _unavailable(self, cause: object) -> ComfyUnavailable:
        return ComfyUnavailable(f"cannot reach ComfyUI at {self.url} ({cause}); is it running? {START_HINT}, "
                                "and pass its address with --server")

    def _request(self, method: str, path: str, body: Any = None, raw: bool = False,
                 ok_statuses: Iterable[int] = (200,)) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        last: object = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    payload = resp.read()
                    status = resp.status
            except urllib.error.HTTPError as e:
                payload, status = e.read(), e.code
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
                last = getattr(e, "reason", e)
                continue
            if raw:
                return status, payload
            try:
                parsed = json.loads(payload) if payload else None
            except json.JSONDecodeError:
                parsed = payload.decode(errors="replace")
            if status not in ok_statuses and status >= 500:
                last = f"HTTP {status}"
                continue
            return status, parsed
        raise self._unavailable(last)

    def ping(self) -> bool:
        """True when the server answers (one attempt, no retries)."""
        try:
            with urllib.request.urlopen(self.url + "/system_stats", timeout=min(self.timeout, 5.0)) as r:
                return r.status == 200
        except Exception:
            return False

    def object_info(self, node: str | None = None) -> dict[str, Any]:
        """``/object_info`` (all node types, or one)."""
        status, body = self._request("GET", "/object_info" + (f"/{urllib.parse.quote(node)}" if node else ""))
        if status != 200 or not isinstance(body, dict):
            raise ComfyError(f"ComfyUI at {self.url} answered /object_info with HTTP {status}")
        return body

    def submit(self, api_prompt: Mapping[str, Any], client_id: str | None = None,
               prompt_id: str | None = None) -> str:
        """Queue an API-format prompt; return its id. Rejections raise :class:`ComfyNodeError`."""
        body: dict[str, Any] = {"prompt": api_prompt, "client_id": client_id or uuid.uuid4().hex}
        if prompt_id:
            body["prompt_id"] = prompt_id
        status, resp = self._request("POST", "/prompt", body, ok_statuses=(200, 400))
        if status == 200 and isinstance(resp, dict) and "prompt_id" in resp:
            if resp.get("node_errors"):
                # HTTP 200 with node_errors: ComfyUI dropped the outputs that failed validation (the
                # recorder may be one) and queued the rest. Never a success: take the remnant back
                # off the queue, so it spends no server time on outputs nobody collects.
                error = _format_node_errors(resp, api_prompt, self.url)
                try:
                    self.interrupt(str(resp["prompt_id"]))
                except ComfyError:
                    pass
                raise error
            return str(resp["prompt_id"])
        if isinstance(resp, dict):
            raise _format_node_errors(resp, api_prompt, self.url)
        raise ComfyError(f"ComfyUI at {self.url} answered /prompt with HTTP {status}: {str(resp)[:300]}")

    def history(self, prompt_id: str) -> dict[str, Any] | None:
        """The ``/history`` entry of a prompt, or None while it is queued/running/unknown."""
        status, body = self._request("GET", f"/history/{urllib.parse.quote(prompt_id)}")
        if status != 200 or not isinstance(body, dict):
            return None
        return body.get(prompt_id)

    def queue_state(self) -> dict[str, list[str]]:
        """Prompt ids running and pending."""
        _, body = self._request("GET", "/queue")
        body = body if isinstance(body, dict) else {}
        return {k: [str(item[1]) for item in body.get(k, []) if len(item) > 1]
                for k in ("queue_running", "queue_pending")}

    def interrupt(self, prompt_id: str | None = None) -> None:
        """Stop a prompt: drop it from the queue and interrupt it if it runs (all, if no id)."""
        if prompt_id:
            self._request("POST", "/queue", {"delete": [prompt_id]})
        self._request("POST", "/interrupt", {"prompt_id": prompt_id} if prompt_id else {})

    def download(self, ref: Mapping[str, str], dest: str | os.PathLike[str]) -> tuple[Path, str]:
        """Fetch an output file (``{filename, subfolder, type}``) via ``/view`` into ``dest``.

        Atomic (temp file + fsync + rename); returns ``(path, sha256)``.
        """
        query = urllib.parse.urlencode({"filename": ref["filename"], "subfolder": ref.get("subfolder", ""),
                                        "type": ref.get("type", "output")})
        status, payload = self._request("GET", f"/view?{query}", raw=True)
        if status != 200:
            raise ComfyError(f"ComfyUI at {self.url} could not serve {ref.get('subfolder', '')}/{ref['filename']} "
                             f"(HTTP {status}); was the output folder cleaned?")
        return atomic_write_bytes(dest, payload), hashlib.sha256(payload).hexdigest()

    # ---- following a prompt
    def _result(self, prompt_id: str, entry: Mapping[str, Any], api_prompt: Mapping[str, Any] | None) -> PromptResult:
        status = dict(entry.get("status") or {})
        messages = status.get("messages") or []
        for kind, data in messages:
            if kind == "execution_error":
                raise _execution_error(data, api_prompt, self.url)
            if kind == "execution_interrupted":
                raise ComfyInterrupted(f"prompt {prompt_id} was interrupted on {self.url}")
        if status.get("status_str") == "error":
            raise ComfyNodeError(f"ComfyUI at {self.url}: prompt {prompt_id} failed ({json.dumps(status)[:300]})")
        return PromptResult(prompt_id, self.url, dict(entry.get("outputs") or {}), status)

    def wait(self, prompt_id: str, timeout: float | None = None, api_prompt: Mapping[str, Any] | None = None,
             cancel: threading.Event | None = None, poll: float = 0.25) -> PromptResult:
        """Poll ``/history`` until the prompt finishes (the fallback when no WebSocket)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            entry = self.history(prompt_id)
            if entry and (entry.get("status") or {}).get("completed") is not None:
                if (entry.get("status") or {}).get("completed") or (entry.get("status") or {}).get("status_str"):
                    return self._result(prompt_id, entry, api_prompt)
            self._check_stop(prompt_id, deadline, cancel, timeout)
            time.sleep(poll)

    def _check_stop(self, prompt_id: str, deadline: float | None, cancel: threading.Event | None,
                    timeout: float | None) -> None:
        if cancel is not None and cancel.is_set():
            try:
                self.interrupt(prompt_id)
            except ComfyError:
                pass
            raise ComfyInterrupted(f"prompt {prompt_id} on {self.url} was cancelled")
        if deadline is not None and time.monotonic() > deadline:
            try:
                self.interrupt(prompt_id)
            except ComfyError:
                pass
            raise ComfyTimeout(f"prompt {prompt_id} did not finish within {timeout:.0f} s on {self.url}; it was "
                               "interrupted. Raise --job-timeout for bigger images or more steps")

    def _open_ws(self, client_id: str):
        if not self.use_websocket:
            return None
        try:
            import websocket  # websocket-client
        except ImportError:
            return None
        ws_url = self.url.replace("https://", "wss://").replace("http://", "ws://") + f"/ws?clientId={client_id}"
        try:
            ws = websocket.create_connection(ws_url, timeout=min(self.timeout, 10.0))
            ws.settimeout(1.0)
            return ws
        except Exception:
            return None

    def follow(self, prompt_id: str, ws=None, callback: ProgressCallback | None = None,
               timeout: float | None = None, api_prompt: Mapping[str, Any] | None = None,
               cancel: threading.Event | None = None) -> PromptResult:
        """Follow a prompt over an open ``/ws`` (``progress``, ``executing``, errors) until it ends.

        ``callback`` gets dicts ``{"type": "progress", "value", "max", "node"}`` and
        ``{"type": "executing", "node"}``. Without a socket (or when it drops) this polls
        ``/history``; a server that stops answering raises :class:`ComfyUnavailable`.
        """
        if ws is None:
            return self.wait(prompt_id, timeout, api_prompt, cancel)
        import websocket

        deadline = None if timeout is None else time.monotonic() + timeout
        # the prompt may have finished before the socket saw anything
        entry = self.history(prompt_id)
        if entry and (entry.get("status") or {}).get("completed") is not None:
            return self._result(prompt_id, entry, api_prompt)
        last_check = time.monotonic()
        try:
            while True:
                self._check_stop(prompt_id, deadline, cancel, timeout)
                try:
                    raw = ws.recv()
                except websocket.WebSocketTimeoutException:
                    if time.monotonic() - last_check > 5.0:  # a missed message must not hang us
                        last_check = time.monotonic()
                        entry = self.history(prompt_id)
                        if entry and (entry.get("status") or {}).get("completed") is not None:
                            return self._result(prompt_id, entry, api_prompt)
                    continue
                except (websocket.WebSocketException, OSError):
                    if not self.ping():
                        raise self._unavailable("the connection closed while the prompt was running") from None
                    return self.wait(prompt_id, None if deadline is None else max(0.0, deadline - time.monotonic()),
                                     api_prompt, cancel)
                if not isinstance(raw, str):
                    continue  # binary previews
                try:
                    msg = json.loads(raw)
                except json.JSONDecodeError:
                    continue
                kind, data = msg.get("type"), msg.get("data") or {}
                if data.get("prompt_id") not in (None, prompt_id):
                    continue
                if kind == "progress" and callback:
                    callback({"type": "progress", "value": data.get("value"), "max": data.get("max"),
                              "node": data.get("node"), "prompt_id": prompt_id})
                elif kind == "executing" and data.get("prompt_id") == prompt_id:
                    if data.get("node") is None:
                        break
                    if callback:
                        callback({"type": "executing", "node": data.get("node"), "prompt_id": prompt_id})
                elif kind == "execution_success" and data.get("prompt_id") == prompt_id:
                    break
                elif kind == "execution_error" and data.get("prompt_id") == prompt_id:
                    raise _execution_error(data, api_prompt, self.url)
                elif kind == "execution_interrupted" and data.get("prompt_id") == prompt_id:
                    raise ComfyInterrupted(f"prompt {prompt_id} was interrupted on {self.url}")
        finally:
            try:
                ws.close()
            except Exception:
                pass
        # the history entry is written just after the final message: poll briefly
        return self.wait(prompt_id, 60.0, api_prompt, cancel, poll=0.05)

    def run(self, api_prompt: Mapping[str, Any], timeout: float | None = None,
            callback: ProgressCallback | None = None, cancel: threading.Event | None = None,
            prompt_id: str | None = None) -> PromptResult:
        """Submit and follow one prompt (socket opened first so no message is missed)."""
        client_id = uuid.uuid4().hex
        ws = self._open_ws(client_id)
        try:
            pid = self.submit(api_prompt, client_id=client_id, prompt_id=prompt_id)
        except BaseException:
            if ws is not None:
                ws.close()
            raise
        return self.follow(pid, ws, callback, timeout, api_prompt, cancel)

    def run_or_resume(self, api_prompt: Mapping[str, Any], prompt_id: str, timeout: float | None = None,
                      callback: ProgressCallback | None = None, cancel: threading.Event | None = None) -> PromptResult:
        """Like :meth:`run` with a fixed ``prompt_id``, reusing a finished or queued prompt of that id.

        Why: after the loop is killed, the server may still run (or have finished) the prompt
        it was given; resuming then costs nothing and writes no second shard.
        """
        entry = self.history(prompt_id)
        if entry and (entry.get("status") or {}).get("completed"):
            try:
                return self._result(prompt_id, entry, api_prompt)
            except (ComfyNodeError, ComfyInterrupted):
                pass  # failed earlier: run it again
        else:
            q = self.queue_state()
            if prompt_id in q["queue_running"] or prompt_id in q["queue_pending"]:
                return self.wait(prompt_id, timeout, api_prompt, cancel)
        return self.run(api_prompt, timeout, callback, cancel, prompt_id=prompt_id)


# --------------------------------------------------------------------------------------------
# several servers


class ServerPool:
    """Distribute jobs over several ComfyUI servers, ``per_server_concurrency`` at a time each.

    Why threads: each job mostly waits on a server. ComfyUI runs one prompt at a time, so a
    concurrency of 2 keeps its queue fed while we download results. A server that becomes
    unreachable is dropped and its job goes back to the queue for the others; when every
    server is gone, :meth:`map` raises :class:`ComfyUnavailable`. Any other error stops the
    pool (queued jobs are not started) and is raised after running jobs finish.
    """

    def __init__(self, urls: Sequence[str] | Sequence[ComfyClient], per_server_concurrency: int = 1, **client_kwargs):
        if not urls:
            raise QRRLError("give at least one ComfyUI server (--server http://127.0.0.1:8188)")
        if per_server_concurrency < 1:
            raise QRRLError(f"per-server concurrency must be >= 1, got {per_server_concurrency}")
        self.clients = [u if isinstance(u, ComfyClient) else ComfyClient(u, **client_kwargs) for u in urls]
        self.concurrency = int(per_server_concurrency)
        self.cancel = threading.Event()

    def check(self, api_prompt: Mapping[str, Any], require_recorder: bool = True) -> None:
        """Every server answers and has every node type of the workflow."""
        for c in self.clients:
            check_workflow(api_prompt, c.object_info(), require_recorder)

    def map(self, jobs: Sequence[Any], fn: Callable[[ComfyClient, Any], Any],
            on_result: Callable[[Any, Any], None] | None = None) -> list[Any]:
        """Run ``fn(client, job)`` for every job; ``on_result(job, result)`` is serialised."""
        todo: queue.Queue = queue.Queue()
        for i, job in enumerate(jobs):
            todo.put((i, job))
        results: list[Any] = [None] * len(jobs)
        done = [False] * len(jobs)
        lock = threading.Lock()
        errors: list[BaseException] = []
        dead: dict[str, BaseException] = {}
        alive = {c.url: self.concurrency for c in self.clients}

        def worker(client: ComfyClient) -> None:
            while not self.cancel.is_set():
                if client.url in dead:
                    return
                with lock:
                    if all(done):
                        return
                try:  # keep waiting while jobs run elsewhere: a dying server puts its job back
                    i, job = todo.get(timeout=0.2)
                except queue.Empty:
                    with lock:
                        if not any(alive.values()):
                            return
                    continue
                try:
                    res = fn(client, job)
                except ComfyUnavailable as e:
                    with lock:
                        dead[client.url] = e
                        alive[client.url] = 0
                    todo.put((i, job))
                    return
                except BaseException as e:  # noqa: BLE001 - reported after join
                    with lock:
                        errors.append(e)
                    self.cancel.set()
                    return
                with lock:
                    results[i] = res
                    done[i] = True
                    if on_result is not None:
                        try:
                            on_result(job, res)
                        except BaseException as e:  # noqa: BLE001
                            errors.append(e)
                            self.cancel.set()

        threads = [threading.Thread(target=worker, args=(c,), daemon=True, name=f"comfy-{c.url}-{k}")
                   for c in self.clients for k in range(self.concurrency)]
        for t in threads:
            t.start()
        try:
            for t in threads:
                while t.is_alive():
                    t.join(0.2)
        except KeyboardInterrupt:
            self.cancel.set()
            for t in threads:
                t.join(30)
            raise
        if errors:
            raise errors[0]
        if not all(done):
            missing = done.count(False)
            if dead:
                causes = "; ".join(str(e) for e in dead.values())
                raise ComfyUnavailable(f"{missing} of {len(jobs)} jobs not done: every server became unreachable. "
                                       f"{causes}. Finished jobs are kept; run the same command again to resume")
            raise ComfyInterrupted(f"{missing} of {len(jobs)} jobs not done: cancelled")
        return results
