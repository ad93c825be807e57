"""Downloads: whether they are allowed, where they go, and the error when one is needed but cannot be made.

:class:`NetworkRequired` is raised when a data set or a model is not on this machine and getting it
needs the network, which is either absent or switched off (``FLAGCORE_OFFLINE=1`` or
``HF_HUB_OFFLINE=1``). Its message names what is missing and how to get it offline. The book's
standalone check (tools/standalone_check.py) counts a notebook that stops with it as "needs the
network", not as a failure. It subclasses ``ConnectionError`` (an ``OSError``), so ``except OSError``
still catches it.

:func:`cache_dir` is the one folder flagcore writes downloads and derived files to (data sets,
de-quantised weights), shared by :mod:`flagcore.data` and :mod:`flagcore.weights`.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["NetworkRequired", "cache_dir", "network_disabled"]

_TRUE = {"1", "true", "yes", "on"}


class NetworkRequired(ConnectionError):
    """What was asked for needs the network (it is not on this machine), and none is available."""


def network_disabled() -> bool:
    """True when downloads are switched off: ``FLAGCORE_OFFLINE`` or ``HF_HUB_OFFLINE`` is set to 1/true."""
    return any(os.environ.get(var, "").strip().lower() in _TRUE for var in ("FLAGCORE_OFFLINE", "HF_HUB_OFFLINE"))


def cache_dir() -> Path:
    """Where flagcore caches what it downloads or derives: ``$FLAGCORE_CACHE``, else
    ``$XDG_CACHE_HOME/flagcore``, else ``~/.cache/flagcore``."""
    if os.environ.get("FLAGCORE_CACHE"):
        return Path(os.environ["FLAGCORE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "flagcore"
