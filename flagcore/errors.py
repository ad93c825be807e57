"""Errors that a notebook or a user script may want to tell apart from a bug.

:class:`NetworkRequired` is raised when a data set or a model is not on this machine and getting it
needs the network, which is either absent or switched off (``FLAGCORE_OFFLINE=1`` or
``HF_HUB_OFFLINE=1``). Its message names what is missing and how to get it offline. The book's
standalone check (tools/standalone_check.py) counts a notebook that stops with it as "needs the
network", not as a failure. It subclasses ``ConnectionError`` (an ``OSError``), so ``except OSError``
still catches it.
"""

from __future__ import annotations

import os

__all__ = ["NetworkRequired", "network_disabled"]

_TRUE = {"1", "true", "yes", "on"}


class NetworkRequired(ConnectionError):
    """What was asked for needs the network (it is not on this machine), and none is available."""


def network_disabled() -> bool:
    """True when downloads are switched off: ``FLAGCORE_OFFLINE`` or ``HF_HUB_OFFLINE`` is set to 1/true."""
    return any(os.environ.get(var, "").strip().lower() in _TRUE for var in ("FLAGCORE_OFFLINE", "HF_HUB_OFFLINE"))
