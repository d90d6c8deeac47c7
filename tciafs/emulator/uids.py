"""How the emulator's archives name things: UIDs and seeds hashed from their parts.

Kept apart from the DICOM writer (tciafs.emulator.dicomgen) so that what needs only a
UID, as the IDC side does, loads neither pydicom nor numpy.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

# The TCIA root with a private arc ("99") for synthetic data, so generated UIDs never
# collide with real TCIA ones.
UID_ROOT = "1.3.6.1.4.1.9328.50.99."
_UID_DIGITS = 38  # fixed width: 23 + 38 = 61 characters, within the 64 limit


def make_uid(*parts: object, digits: int = _UID_DIGITS) -> str:
    """A valid UID derived from `parts`: the root plus a fixed number of hashed digits.

    Fixed width matters: every UID of a kind has the same length, so header sizes do not
    depend on hash luck. The leading digit is never 0 (UID components forbid it).
    """
    digest = hashlib.sha256(repr(parts).encode("utf-8")).digest()
    low = 10 ** (digits - 1)
    number = low + int.from_bytes(digest, "big") % (9 * low)
    uid = f"{UID_ROOT}{number}"
    assert len(uid) <= 64
    return uid


#: How a plan names its study, series, frame of reference and SOP prefix: `make_uid`, or a
#: scheme of a profile's own with the same parts (the nlst profile's UIDs can be located).
UidMaker = Callable[..., str]


def seed_of(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode("utf-8")).digest()[:8], "big")
