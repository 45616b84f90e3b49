"""Progress bars for safeft's long loops: tqdm, silenced by ``safeft --quiet`` or ``TQDM_DISABLE=1``."""

from __future__ import annotations

import os
from collections.abc import Iterable

from tqdm.auto import tqdm


class Quiet:
    """``safeft --quiet`` sets ``Quiet.on``; every bar made by :func:`progress` is then silent."""

    on = False


def progress(iterable: Iterable, *, desc: str, show: bool = True, **kwargs) -> tqdm:
    """Return ``tqdm(iterable)`` that shows unless ``show`` is False, ``--quiet`` was given, or the environment
    sets ``TQDM_DISABLE`` (read at each call, so setting it later in the process works too)."""
    silent = not show or Quiet.on or os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes")
    return tqdm(iterable, desc=desc, disable=silent, **kwargs)
