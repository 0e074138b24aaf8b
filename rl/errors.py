"""User-facing errors.

Why a base class: every problem a user can fix (bad payload, missing weights, corrupt image,
bad run name) raises a ``QRRLError`` with an actionable message. The CLI prints it as one
line (exit status 2) and ComfyUI shows it on the node, instead of a traceback.
"""


class QRRLError(ValueError):
    """An input problem the user can fix; the message says how."""
