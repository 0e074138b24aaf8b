#!/usr/bin/env bash
# Print the ComfyUI folder the real-ComfyUI tests use, the first of:
#   1. $COMFYUI_PATH (when set, it must be a ComfyUI: a typo fails loudly instead of skipping)
#   2. $HOME/ComfyUI
#   3. ../shared/comfyui next to the project root (a read-only copy; tests never write into it)
# Exit status 1 (nothing printed) when there is none. tests/conftest.py follows the same order.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
is_comfy() { [ -f "$1/main.py" ] && [ -d "$1/comfy" ]; }
if [ -n "${COMFYUI_PATH:-}" ]; then
  if is_comfy "$COMFYUI_PATH"; then (cd "$COMFYUI_PATH" && pwd -P); exit 0; fi
  echo "find-comfyui: COMFYUI_PATH=$COMFYUI_PATH has no main.py and comfy/; point it at a ComfyUI checkout or unset it" >&2
  exit 2
fi
for c in "$HOME/ComfyUI" "$root/../shared/comfyui"; do
  if is_comfy "$c"; then (cd "$c" && pwd -P); exit 0; fi
done
exit 1
