"""The one switch for cadscope's compiled modules (``setup.py``): ``CADSCOPE_COMPILED=0`` leaves them out.

``cadscope.tracing._wirec`` and ``cadscope.metrics._valuesc`` are optional: where they were not built,
or this says not to use them, the Python code that gives the same results does their work.
"""

from __future__ import annotations

import os

__all__ = ["compiled_wanted"]


def compiled_wanted() -> bool:
    """Whether the compiled modules may be used, where they were built (``CADSCOPE_COMPILED``, not ``0``)."""
    return os.environ.get("CADSCOPE_COMPILED", "1") != "0"
