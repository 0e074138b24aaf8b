#!/usr/bin/env bash
# One-shot set-up on a fresh Linux machine (CPU is fine): system libzbar, a virtual
# environment in .venv, CPU torch, and this project with its test extras.
# Re-running is cheap: everything already installed is kept.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${QR_RL_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

# 1. libzbar0 for pyzbar (no recommends: keeps imagemagick & co. out).
if ! ldconfig -p 2>/dev/null | grep -q 'libzbar\.so\.0'; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO="sudo"
  $SUDO apt-get install -y --no-install-recommends libzbar0 >/dev/null 2>&1 \
    || { $SUDO apt-get update >/dev/null && $SUDO apt-get install -y --no-install-recommends libzbar0; }
fi

# 2. venv + torch first, so nothing later can pull a CUDA build.
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"${PIP[@]}" torch==2.13.0
# torchvision only for open_clip's transforms; the pin keeps torch at 2.13 (see README).
"${PIP[@]}" -c constraints.txt torchvision==0.28.0
"${PIP[@]}" -c constraints.txt -e ".[test]"

# 3. A real ComfyUI for the integration tests, when one is found (scripts/find-comfyui.sh:
#    COMFYUI_PATH, $HOME/ComfyUI, ../shared/comfyui). Its requirements come from its own folder,
#    under the same constraints (torch stays the CPU build); the folder itself is only read.
#    `requests` is imported by ComfyUI but missing from its requirements.
if COMFY="$(bash scripts/find-comfyui.sh)"; then
  echo "install.sh: installing the requirements of the ComfyUI at $COMFY (integration tests)"
  "${PIP[@]}" -c constraints.txt -r "$COMFY/requirements.txt" requests
else
  [ $? -eq 2 ] && exit 2  # COMFYUI_PATH set to something that is not a ComfyUI
  echo "install.sh: no ComfyUI found (COMFYUI_PATH, ~/ComfyUI, ../shared/comfyui): the real-ComfyUI tests will skip"
fi
echo "install.sh: ready ($VENV)"
