"""Progress bars that keep a redirected log readable.

On a terminal, tqdm's live bar. When stderr is a file or a pipe (a cluster job's log, ``2> err.log``)
the same bar is redrawn at most once a minute: a long stage still shows that it moves and how fast,
without a redraw per step. A bar's postfix is set with ``refresh=False`` so that it waits for the
next redraw rather than forcing one.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm

# seconds between redraws when stderr is no terminal
LOG_INTERVAL_S = 60.0


def progress(*args: Any, **kwargs: Any) -> tqdm:
    """``tqdm(*args, **kwargs)``, redrawn at most every ``LOG_INTERVAL_S`` off a terminal."""
    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
    return tqdm(*args, **kwargs)
