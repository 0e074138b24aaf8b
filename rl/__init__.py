"""QR-RL core: QR encoding, rewards, sampling math, trajectories and the DDPO trainer.

This package never imports ComfyUI, so everything here runs (and is tested) standalone.
Imports stay relative so it also works as a subpackage of the ComfyUI node pack.
"""

__version__ = "0.1.0"
