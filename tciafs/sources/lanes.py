"""Which lane a request rides: a reader's own, or a guess fetched ahead of one.

A cache that fetches ahead of a reader (the headers of the next files of a header scan)
marks those requests as guesses by running them under `ahead()`. A source whose service
takes many requests at once (IDC's buckets) gives guesses their own connections, so a
reader's request never waits behind them; any other source ignores the mark. A context
variable carries it: trio's tasks each start with a copy of their parent's context, so
the mark stays with the task that set it and the tasks it starts.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager

_AHEAD: contextvars.ContextVar[bool] = contextvars.ContextVar("tciafs_ahead", default=False)


@contextmanager
def ahead() -> Iterator[None]:
    """Requests made inside are guesses ahead of a reader."""
    token = _AHEAD.set(True)
    try:
        yield
    finally:
        _AHEAD.reset(token)


def guessing() -> bool:
    """Whether the running task's requests are guesses."""
    return _AHEAD.get()
