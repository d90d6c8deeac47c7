"""Fault injection and request statistics, shared by the main and the NLST server.

Fault configuration (``--faults JSON`` at start, ``POST /_emulator/faults`` at run time,
``GET /_emulator/faults`` to read it back).  A POST *replaces* the configuration: keys
it leaves out take their defaults, so ``{}`` clears every fault (and the latency and
bandwidth given on the command line).  With ``"merge": true`` the given keys are merged
into the current configuration instead::

    {
      "latency_ms": 0,            # added to every request (not filtered by "endpoints")
      "bandwidth": 0,             # bytes/s cap on each response body, 0 = unlimited
      "p429": 0.0, "retry_after": 1,           # 429 Too Many Requests + Retry-After: N
      "p500": 0.0, "p502": 0.0, "p503": 0.0, "p504": 0.0,
      "p404": 0.0,                # 404; on the S3 server NoSuchKey, as for an object
                                  # deleted between its listing and its read
      "preset": 0.0,              # reset the connection (RST) part-way through the body
      "ptruncate": 0.0,           # status 200, then end the body early (no final chunk,
                                  # so a ZIP has no central directory) and close
      "pshort": 0.0,              # a series ZIP (getImage, getImageWithMD5Hash, legacy
                                  # getImage) ends early but whole: fewer images, no
                                  # MD5 list, a valid central directory, status 200 and
                                  # a complete body, as NBIA closes the ZIP when writing
                                  # an image fails mid-stream; on the S3 server, a 206
                                  # whose Content-Range ends before the range asked for
      "pcorrupt": 0.0,            # each image served (in a series ZIP or by
                                  # getSingleImage) has its last byte changed, as if
                                  # read from damaged storage: the ZIP's CRC covers the
                                  # change, the MD5 list still gives the stored hash
      "first_byte_delay_ms": 0,   # sleep before the status line,
      "last_byte_delay_ms": 0,    # and before the body's last byte (a server slow to
                                  # finish: a ZIP's reader waits at its very end) ...
      "pslow": 1.0,               # ... on this fraction of requests
      "endpoints": null,          # list of names the faults above apply to, e.g.
                                  # ["getImage", "v4/getSingleImage"]; null = every one
      "seed": null                # re-seeds the random generator when given
    }

Each eligible request rolls once for a status fault (p429 + p404 + p5xx must not
exceed 1),
once for a body fault (preset + ptruncate + pshort must not exceed 1) and once for the
slow first and last byte; with ``pcorrupt``, once more for each image it sends.  A cut
happens at a random point of the body; it always falls before the last body byte, and for
an empty body it closes the connection before the status line.  A short ZIP keeps a random
share (10 to 90 %, rounded down) of the series' images, after the LICENSE where there is
one; other bodies are left whole.  A damaged image and a short ZIP are the faults that no
transport check can see: only the MD5 list, or the series' image count, tells them.

Statistics (``GET /_emulator/stats``; ``POST /_emulator/reset`` clears them)::

    {
      "since": 1735000000.0,      # Unix time of the last reset
      "requests_total": 7,
      "requests": {"getImage": 2, "getSeries": 1, "token": 1, ...},
      "endpoints": {"v4/getImage": 1, "v1/getImage": 1, "v2/getSeries": 1,
                    "oauth/token": 1, ...},
      "status": {"200": 6, "429": 1},
      "bytes_sent": 123456,       # response body bytes actually written
      "faults": {"429": 1, "404": 0, "500": 0, "502": 0, "503": 0, "504": 0,
                 "reset": 0, "truncate": 0, "slow_first_byte": 0, "slow_last_byte": 0,
                 "corrupt": 0, "short": 0},
      "servers": {"main": {same keys but "since"}, "nlst": {...}}
    }

``requests`` counts by bare endpoint name ("getImage"), ``endpoints`` by the name under
its API ("v1/…", "v2/…", "v4/…", "root/…" for /nbia-api/services/<name>,
"legacy-v3/…", "legacy-v4/…"), so each sums to ``requests_total``.  The token endpoint
is "token" / "oauth/token", logout "logout" / "oauth/logout", any other path "unknown" /
"unknown/unknown".  The ``endpoints`` fault filter accepts either form.  The /_emulator
paths are neither counted nor faulted.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, fields, replace

STATUS_FAULTS = (429, 404, 500, 502, 503, 504)
FAULT_KINDS = ("429", "404", "500", "502", "503", "504", "reset", "truncate", "slow_first_byte",
               "slow_last_byte", "corrupt", "short")


@dataclass(frozen=True)
class FaultConfig:
    latency_ms: float = 0.0
    bandwidth: int = 0
    p429: float = 0.0
    retry_after: int = 1
    p404: float = 0.0
    p500: float = 0.0
    p502: float = 0.0
    p503: float = 0.0
    p504: float = 0.0
    preset: float = 0.0
    ptruncate: float = 0.0
    pshort: float = 0.0
    pcorrupt: float = 0.0
    first_byte_delay_ms: float = 0.0
    last_byte_delay_ms: float = 0.0
    pslow: float = 1.0
    endpoints: tuple[str, ...] | None = None
    seed: int | None = None

    def to_json(self) -> dict[str, object]:
        data = asdict(self)
        data["endpoints"] = None if self.endpoints is None else list(self.endpoints)
        return data


_PROBABILITIES = ("p429", "p404", "p500", "p502", "p503", "p504", "preset", "ptruncate",
                  "pshort", "pcorrupt", "pslow")
_NON_NEGATIVE = ("latency_ms", "bandwidth", "retry_after", "first_byte_delay_ms",
                 "last_byte_delay_ms")


def parse_config(patch: dict[str, object], base: FaultConfig) -> FaultConfig:
    """Validate ``patch`` and merge it into ``base`` (raises ValueError on bad input)."""
    if not isinstance(patch, dict):
        raise ValueError("fault configuration must be a JSON object")
    patch = dict(patch)
    if not patch.pop("merge", False):
        base = FaultConfig()
    known = {f.name for f in fields(FaultConfig)}
    unknown = sorted(set(patch) - known)
    if unknown:
        raise ValueError(f"unknown fault keys: {unknown}; known: {sorted(known)}")
    values: dict[str, object] = {}
    for key, value in patch.items():
        values[key] = _coerce(key, value)
    config = replace(base, **values)  # type: ignore[arg-type]
    if sum(getattr(config, f"p{s}") for s in STATUS_FAULTS) > 1.0 + 1e-9:
        raise ValueError("p429 + p404 + p500 + p502 + p503 + p504 must not exceed 1")
    if config.preset + config.ptruncate + config.pshort > 1.0 + 1e-9:
        raise ValueError("preset + ptruncate + pshort must not exceed 1")
    return config


def _coerce(key: str, value: object) -> object:
    if key == "endpoints":
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError("endpoints must be a list of endpoint names or null")
        return tuple(value)
    if key == "seed":
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError("seed must be an integer or null")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key} must be a number")
    if key in _PROBABILITIES and not 0.0 <= value <= 1.0:
        raise ValueError(f"{key} must be between 0 and 1")
    if key in _NON_NEGATIVE and value < 0:
        raise ValueError(f"{key} must not be negative")
    return int(value) if key in ("bandwidth", "retry_after") else float(value)


@dataclass(frozen=True)
class FaultPlan:
    """What to do to one request, decided when it arrives."""

    latency: float = 0.0  # seconds
    bandwidth: int = 0
    status: int | None = None
    retry_after: int = 1
    cut: str | None = None  # "reset" | "truncate"
    short: bool = False  # a series ZIP ends early, but whole
    cut_fraction: float = 0.5  # where a cut falls, or the share of images a short ZIP keeps
    first_byte_delay: float = 0.0  # seconds
    last_byte_delay: float = 0.0  # seconds
    corrupt: float = 0.0  # the chance that each image sent is damaged
    corrupt_seed: int = 0  # seeds the per-image rolls, so a plan decides them alone


class Faults:
    def __init__(self, config: FaultConfig | None = None) -> None:
        self._lock = threading.Lock()
        self._config = config or FaultConfig()
        self._rng = random.Random(self._config.seed)

    @property
    def config(self) -> FaultConfig:
        with self._lock:
            return self._config

    def update(self, patch: dict[str, object]) -> FaultConfig:
        with self._lock:
            self._config = parse_config(patch, self._config)
            if "seed" in patch:
                self._rng = random.Random(self._config.seed)
            return self._config

    def plan(self, names: list[str]) -> FaultPlan:
        with self._lock:
            config = self._config
            rolls = [self._rng.random() for _ in range(4)]
            # Drawn only when needed, so that a seed gives the same other faults as before.
            corrupt_seed = self._rng.getrandbits(64) if config.pcorrupt else 0
        base = FaultPlan(latency=config.latency_ms / 1000, bandwidth=config.bandwidth,
                         retry_after=config.retry_after)
        if config.endpoints is not None and not set(names) & set(config.endpoints):
            return base
        status = _pick_status(config, rolls[0])
        # An injected error page is the fault; it is not cut as well.
        body = None if status is not None else _pick_body_fault(config, rolls[1])
        slow = rolls[2] < config.pslow
        return replace(base, status=status, cut=None if body == "short" else body,
                       short=body == "short", cut_fraction=0.1 + 0.8 * rolls[3],
                       corrupt=config.pcorrupt, corrupt_seed=corrupt_seed,
                       first_byte_delay=config.first_byte_delay_ms / 1000 if slow else 0.0,
                       last_byte_delay=config.last_byte_delay_ms / 1000 if slow else 0.0)


class ContentFaults:
    """What the faults of one reply do to what it holds, not to how it travels: images
    from "damaged storage" (pcorrupt) and a series ZIP closed early (pshort)."""

    def __init__(self, plan: FaultPlan) -> None:
        self._chance = plan.corrupt
        self._rng = random.Random(plan.corrupt_seed)
        self._kept_share = plan.cut_fraction if plan.short else None

    @property
    def possible(self) -> bool:
        """Whether this reply's content may differ from the archive's."""
        return self._chance > 0 or self._kept_share is not None

    def strikes(self) -> bool:
        """Whether the next image sent is damaged."""
        return self._chance > 0 and self._rng.random() < self._chance

    def images_kept(self, count: int) -> int | None:
        """How many of a series ZIP's `count` images to send, None for all of them."""
        return self.kept(count)

    def kept(self, count: int) -> int | None:
        """How many of `count` items a reply closed early sends (a series ZIP's images,
        an S3 range's bytes), None for all of them."""
        return None if self._kept_share is None else int(count * self._kept_share)


def damaged(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The same bytes with the last one changed: the header still parses, the MD5 differs."""
    held = b""
    for chunk in chunks:
        if held:
            yield held
        held = chunk
    if held:
        yield held[:-1] + bytes([held[-1] ^ 0xFF])


def _pick_status(config: FaultConfig, roll: float) -> int | None:
    edge = 0.0
    for status in STATUS_FAULTS:
        edge += getattr(config, f"p{status}")
        if roll < edge:
            return status
    return None


def _pick_body_fault(config: FaultConfig, roll: float) -> str | None:
    if roll < config.preset:
        return "reset"
    if roll < config.preset + config.ptruncate:
        return "truncate"
    if roll < config.preset + config.ptruncate + config.pshort:
        return "short"
    return None


class _Counts:
    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()
        self.endpoints: Counter[str] = Counter()
        self.status: Counter[str] = Counter()
        self.faults: Counter[str] = Counter({kind: 0 for kind in FAULT_KINDS})
        self.total = 0
        self.bytes_sent = 0

    def to_json(self) -> dict[str, object]:
        return {"requests_total": self.total, "requests": dict(self.requests),
                "endpoints": dict(self.endpoints), "status": dict(self.status),
                "bytes_sent": self.bytes_sent, "faults": dict(self.faults)}


class Stats:
    """Thread-safe counters, kept per server ("main", "nlst") and summed on read."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._servers: dict[str, _Counts] = {}
        self._since = time.time()
        # Requests being answered now, over every server, and the most there ever were:
        # what a client's connection caps must keep low.
        self._active: Counter[str] = Counter()
        self._peak: Counter[str] = Counter()
        self._peak_total = 0

    def begin(self, name: str) -> None:
        """A request (by bare endpoint name) is being answered from now."""
        with self._lock:
            self._active[name] += 1
            self._peak[name] = max(self._peak[name], self._active[name])
            self._peak_total = max(self._peak_total, self._active.total())

    def end(self, name: str) -> None:
        with self._lock:
            self._active[name] -= 1

    def _counts(self, server: str) -> _Counts:
        return self._servers.setdefault(server, _Counts())

    def register(self, server: str) -> None:
        with self._lock:
            self._counts(server)

    def request(self, server: str, name: str, qualified: str) -> None:
        with self._lock:
            counts = self._counts(server)
            counts.total += 1
            counts.requests[name] += 1
            counts.endpoints[qualified] += 1

    def status(self, server: str, status: int) -> None:
        with self._lock:
            self._counts(server).status[str(status)] += 1

    def sent(self, server: str, nbytes: int) -> None:
        with self._lock:
            self._counts(server).bytes_sent += nbytes

    def fault(self, server: str, kind: str) -> None:
        with self._lock:
            self._counts(server).faults[kind] += 1

    def reset(self) -> None:
        with self._lock:
            self._servers = {name: _Counts() for name in self._servers}
            self._since = time.time()
            self._peak = Counter(+self._active)
            self._peak_total = self._active.total()

    def snapshot(self) -> dict[str, object]:
        with self._lock:
            total = _Counts()
            for counts in self._servers.values():
                total.total += counts.total
                total.bytes_sent += counts.bytes_sent
                total.requests.update(counts.requests)
                total.endpoints.update(counts.endpoints)
                total.status.update(counts.status)
                total.faults.update(counts.faults)
            return {"since": self._since, **total.to_json(),
                    "peak_concurrent": self._peak_total,
                    "peak_concurrent_requests": dict(self._peak),
                    "servers": {name: c.to_json() for name, c in self._servers.items()}}
