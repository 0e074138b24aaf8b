"""Sub-commands of ``qr-rl``. Each module defines ``register(subparsers)`` and sets ``func``."""
