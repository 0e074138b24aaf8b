"""The house rules of the import graph: the product never reaches the toy wing or the test builders.

Why: the CPU demonstration (the toy world, its model and backend, the demo) and the tiny SD1.5
weight builders are for showing and testing the product; a ComfyUI user's loop, trainer,
export and nodes must not load them. Two checks: a static one over every ``import`` statement
(function-level ones included, since most heavy imports here are lazy), and a run-time one in
a fresh interpreter (``sys.modules`` after importing the product modules and building a
ComfyUI loop backend).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: The CPU demonstration and the test-weight builders.
WING = ("rl.toy", "rl.commands.demo", "rl.commands.toy", "rl.testing")
#: The command line offers both wings (``--backend local``, ``qr-rl demo``), by design.
SHELL = ("rl.cli", "rl.commands")


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _modules() -> dict[str, Path]:
    out = {}
    for path in [*(REPO / "rl").rglob("*.py"), *(REPO / "nodes").rglob("*.py")]:
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of this repository that ``name`` imports anywhere in its body."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # ``..rl.x`` from nodes/ climbs to the repository root
                base = package[: len(package) - (node.level - 1)]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{a.name}" for a in node.names)
    return {m for m in found if m in known}


def _closure(root: str, graph: dict[str, set[str]]) -> dict[str, str | None]:
    """Every module ``root`` reaches (parent packages included) → the module that imported it."""
    seen: dict[str, str | None] = {}
    stack: list[tuple[str, str | None]] = [(root, None)]
    while stack:
        mod, via = stack.pop()
        if mod in seen:
            continue
        seen[mod] = via
        parts = mod.split(".")
        stack.extend((".".join(parts[:i]), mod) for i in range(1, len(parts)))
        stack.extend((dep, mod) for dep in graph.get(mod, ()))
    return seen


def test_no_product_module_imports_the_toy_wing_or_the_test_builders():
    mods = _modules()
    graph = {name: _imports(name, path, set(mods)) for name, path in mods.items()}
    product = [m for m in mods if not _within(m, WING + SHELL)]
    assert {"rl.collect", "rl.loop", "rl.train", "rl.weights", "rl.comfy_backend", "nodes.rl_sampler"} <= set(product)
    leaks = []
    for root in product:
        seen = _closure(root, graph)
        for bad in sorted(m for m in seen if _within(m, WING)):
            chain = [bad]
            while seen[chain[-1]] is not None:
                chain.append(seen[chain[-1]])
            leaks.append(" ← ".join(chain))
    assert not leaks, "product modules reach the toy wing / test builders:\n" + "\n".join(sorted(set(leaks)))


def test_importing_the_product_loads_no_toy_module():
    code = (
        "import json, sys\n"
        "import rl.collect, rl.comfy_backend, rl.comfy_client, rl.files, rl.weights, rl.loop, rl.policy, rl.train\n"
        "from rl.loop import LoopConfig, loop_backend\n"
        "cfg = LoopConfig(backend='comfy', controlnet='cn.safetensors', checkpoint='m.safetensors', comfyui_dir='.')\n"
        "cfg.validate()\n"
        "assert type(loop_backend(cfg)).__name__ == 'ComfyLoopBackend'\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert "rl.train" in loaded and "rl.comfy_backend" in loaded
    assert [m for m in loaded if _within(m, WING)] == []


def test_the_local_backend_is_found_by_name_and_is_a_loop_backend():
    from rl.loop import BACKENDS, LoopConfig, loop_backend

    backend = loop_backend(LoopConfig(backend="local"))
    assert set(BACKENDS) == {"comfy", "local"} and backend.name == "local"
    assert backend.default_prompts and list(backend.default_payloads) == ["QR-RL"]
    for method in ("validate", "initial_controlnet", "trainer_models", "collector"):
        assert callable(getattr(backend, method))
