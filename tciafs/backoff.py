"""The one rule for waiting before trying again: exponential back-off, capped, with jitter.

The wait before retry n (0 for the first) is `base * factor**n`, at most `cap`; with
jitter j, a random share of up to j of it is taken off, so that many clients failing
together do not come back together. j=1 is "full jitter" (anywhere from 0 to the
wait), j=0.5 keeps at least half of it, j=0 waits exactly that long.

Who uses it: the HTTP transport between attempts of one request (full jitter), the cache
between fetches of a file or series whose bytes came cut short or damaged (half), and
prefetch jobs between rounds of series that failed while the service or the network was
down (none: one job, minutes apart).
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    base: float  # seconds: the first wait, before jitter
    cap: float  # seconds: no wait is longer
    factor: float = 2.0
    jitter: float = 0.0  # the share of each wait that may be taken off at random

    def delay(self, retry: int) -> float:
        """The wait before retry `retry`, counted from 0."""
        try:
            ceiling = min(self.cap, self.base * self.factor ** retry)
        except OverflowError:  # long past the cap
            ceiling = self.cap
        if not self.jitter:
            return ceiling
        return ceiling * random.uniform(1.0 - self.jitter, 1.0)
