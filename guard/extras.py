"""Optional packages, and the install extra that brings each.

The plain install (``pip install inference-guard``, or ``'.[fast]'`` from a checkout)
serves, runs the demo, attacks, certifies and tunes. A few offline extras need more;
a command that would use one checks first with :func:`installed` and names the extra
with :func:`hint` instead of failing with a traceback.
"""

from __future__ import annotations

import importlib.util

EXTRAS = {
    "PIL": "images",  # --data FOLDER of images (guard attack, tune, certify ...)
    "matplotlib": "plot",  # PNG plots of guard attack, guard certify, guard tune
    "sklearn": "attacks",  # guard attack's shadow-model membership attack
    "uvloop": "fast",  # guard serve --loop uvloop
}


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # refused by an import hook, or a broken install
        return False


def hint(module: str) -> str:
    """``(pip install 'inference-guard[EXTRA]')`` for a module in :data:`EXTRAS`."""
    return f"(pip install 'inference-guard[{EXTRAS[module]}]')"
