"""Kept for imports that predate :mod:`rl.testing.tiny_sd` (the tiny SD1.5 builders for tests).

``rl.tiny_sd`` is the very same module object, so attributes and monkeypatches agree.
"""

import sys

from .testing import tiny_sd as _tiny_sd

sys.modules[__name__] = _tiny_sd
