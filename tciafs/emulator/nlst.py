"""NLST's shape, drawn patient by patient from a seed (the `nlst` profile).

The real collection (docs/emulator.md, "nlst") has 26,410 patients, about 73,000
studies, 203,000 series and 21 million images. Here each patient is drawn on its own,
from a byte stream hashed from the seed and its position, so any one patient costs
microseconds and the collection is never held whole: see `PatientwiseArchive`.

What is drawn, and why:
- patient IDs: six-digit numbers, rising, with gaps (the collection holds the CT arm of
  a trial that randomised about twice as many people);
- one to three screening rounds (T0, T1, T2) a patient, most have all three;
- one to six series a study: CT reconstructions of a few hundred slices dominate,
  localizers have one to three images, and a few thin reconstructions pass 500;
- tiny images (32 x 32 pixels): the profile is for walking metadata; a read still gets
  a valid DICOM file whose size and MD5 match the listings.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

from tciafs.emulator.model import CollectionFacts
from tciafs.emulator.specs import Kind, PatientSpec, SeriesSpec, StudySpec
from tciafs.emulator.uids import UID_ROOT, make_uid

PATIENTS = 26_410
FIRST_ID = 100_001
#: The three screening rounds, dated as the NLST-Demo collection of the demo profile.
ROUNDS = (("T0", dt.date(1999, 1, 2)), ("T1", dt.date(2000, 1, 2)),
          ("T2", dt.date(2001, 1, 2)))
MATRIX = 32
_HASH_DIGITS = 20  # of a located UID: ROOT + 20 + ".pid.s.k.i" stays within 64


class _Draws:
    """Uniform draws from a patient's own hashed byte stream: stable on every Python
    and machine (random.Random's algorithms may change between versions)."""

    SIZE = 512  # 170 draws; a patient takes at most about 100

    def __init__(self, *key: object) -> None:
        self._bytes = hashlib.shake_256(repr(key).encode()).digest(self.SIZE)
        self._at = 0

    def below(self, n: int) -> int:
        if self._at + 3 > self.SIZE:
            raise AssertionError("a patient drew more than its stream holds")
        chunk = self._bytes[self._at:self._at + 3]
        self._at += 3
        return int.from_bytes(chunk, "big") % n

    def between(self, low: int, high: int) -> int:
        return low + self.below(high - low + 1)

    def weighted(self, weights: Sequence[int]) -> int:
        """An index into `weights`, drawn in proportion to them."""
        x = self.below(sum(weights))
        for index, w in enumerate(weights):
            if x < w:
                return index
            x -= w
        raise AssertionError("unreachable")


@dataclass(frozen=True)
class Scanner:
    manufacturer: str
    model: str
    software: str
    short: str  # as the series descriptions name it: "GE,HSQX"
    kernels: tuple[str, ...]


SCANNERS = (
    Scanner("GE MEDICAL SYSTEMS", "LightSpeed QX/i", "LightSpeedApps2.4.2_H2.4M5",
            "GE,LSQX", ("STANDARD", "BONE", "LUNG")),
    Scanner("GE MEDICAL SYSTEMS", "HiSpeed QX/i", "LightSpeedApps2.4.2_H2.4M5",
            "GE,HSQX", ("STANDARD", "BONE")),
    Scanner("SIEMENS", "Sensation 16", "syngo CT 2004A", "SIE,S16", ("B30f", "B50f")),
    Scanner("SIEMENS", "Volume Zoom", "VA40C", "SIE,VZ", ("B30f", "B50f")),
    Scanner("Philips", "MX8000", "2.5", "PHI,MX8", ("C", "D")),
    Scanner("TOSHIBA", "Aquilion", "V1.50", "TOS,AQ", ("FC01", "FC10")),
)
_SCANNER_WEIGHTS = (30, 15, 20, 10, 12, 13)


@dataclass(frozen=True)
class Reconstruction:
    """A kind of series: how many images it holds and how thick they are."""

    low: int
    high: int
    thickness_mm: float
    weight: int


LOCALIZER = Reconstruction(1, 3, 2.5, 22)
RECONSTRUCTIONS = (
    LOCALIZER,
    Reconstruction(40, 90, 5.0, 28),  # thick
    Reconstruction(90, 160, 2.5, 37),  # standard
    Reconstruction(165, 320, 1.25, 11),  # thin
    Reconstruction(450, 700, 0.625, 2),  # very thin: the few past 500
)
_RECON_WEIGHTS = tuple(r.weight for r in RECONSTRUCTIONS)
# Studies a patient: mostly all three rounds. Series a study: one to six.
_STUDY_WEIGHTS = (4, 16, 80)
_SERIES_WEIGHTS = (12, 31, 33, 17, 5, 2)


def _series(draws: _Draws, scanner: Scanner, k: int) -> SeriesSpec:
    recon = RECONSTRUCTIONS[draws.weighted(_RECON_WEIGHTS)]
    count = draws.between(recon.low, recon.high)
    kernel = scanner.kernels[draws.below(len(scanner.kernels))]
    milliamps = (20, 40, 60, 80)[draws.below(4)]
    if recon is LOCALIZER:
        description = f"{k},OPA,{scanner.short},TOPO,{kernel},500,{recon.thickness_mm}"
    else:
        description = (f"{k},OPA,{scanner.short},{kernel},{300 + 20 * draws.below(6)},"
                       f"{recon.thickness_mm},120,{milliamps},0.1,1.5")
    return SeriesSpec(Kind.CT, count, description, body_part="CHEST",
                      manufacturer=scanner.manufacturer, model=scanner.model,
                      software=scanner.software, number=k + 1, matrix=MATRIX,
                      thickness_mm=recon.thickness_mm, distinct_planes=2)


def _studies(draws: _Draws, network: str) -> tuple[StudySpec, ...]:
    rounds = ROUNDS[:1 + draws.weighted(_STUDY_WEIGHTS)]
    out = []
    for study_id, date in rounds:
        scanner = SCANNERS[draws.weighted(_SCANNER_WEIGHTS)]
        n = 1 + draws.weighted(_SERIES_WEIGHTS)
        out.append(StudySpec(date, f"NLST-{network}", study_id,
                             tuple(_series(draws, scanner, k) for k in range(n))))
    return tuple(out)


class NlstCollection:
    """The NLST collection of a seed: a `tciafs.emulator.profiles.DrawnCollection`."""

    def __init__(self, facts: CollectionFacts, seed: int, size: int = PATIENTS) -> None:
        self.facts, self.seed, self.size = facts, seed, size

    @cached_property
    def _ids(self) -> list[int]:
        # One byte a patient sets the gap to the next ID: 1 to 8, 4.5 on average.
        gaps = hashlib.shake_256(repr((self.seed, "nlst-ids")).encode()).digest(self.size)
        ids, current = [], FIRST_ID
        for gap in gaps:
            ids.append(current)
            current += 1 + gap % 8
        return ids

    def patient_id(self, index: int) -> str:
        return str(self._ids[index])

    def index_of(self, patient_id: str) -> int | None:
        if not (patient_id.isdigit() and len(patient_id) == 6):
            return None
        number = int(patient_id)
        i = bisect_left(self._ids, number)
        return i if i < self.size and self._ids[i] == number else None

    def _draws(self, index: int) -> _Draws:
        return _Draws(self.seed, self.facts.name, index)

    def _person(self, draws: _Draws, index: int) -> PatientSpec:
        sex = "M" if draws.below(100) < 59 else "F"  # NLST enrolled 59% men
        # Aged 55 to 74 at the first round.
        birth = dt.date(1999 - draws.between(55, 74), draws.between(1, 12),
                        draws.between(1, 28))
        return PatientSpec(self.patient_id(index), sex, birth, studies=())

    def person(self, index: int) -> PatientSpec:
        return self._person(self._draws(index), index)

    def patient(self, index: int) -> PatientSpec:
        draws = self._draws(index)
        person = self._person(draws, index)  # the same first draws as `person`
        network = "LSS" if draws.below(100) < 62 else "ACRIN"  # the two trial networks
        return PatientSpec(person.patient_id, person.sex, person.birth_date,
                           _studies(draws, network))

    # -- UIDs that name their patient ---------------------------------------------------

    def uid(self, *parts: object, digits: int = 0) -> str:
        """Study, series and SOP prefix UIDs end in the patient's ID and positions, after
        a hash of the seed and those parts: "<root><hash>.<pid>.<study>[.<series>]".
        `digits` is make_uid's; a located UID has its own fixed width."""
        if parts[-1] == "sop":  # (series_uid, "sop"): the series' tail after another hash
            return self._located(parts, str(parts[0]).split(".")[-3:])
        # (seed, collection, patient_id, study_index, what, [series_index])
        position = [str(parts[2]), str(int(str(parts[3])) + 1)]
        if parts[4] == "study":
            return self._located(parts, position)
        if parts[4] == "series":
            return self._located(parts, [*position, str(int(str(parts[5])) + 1)])
        return make_uid(*parts)  # the frame of reference: nothing asks for it by UID

    def _located(self, parts: tuple[object, ...], tail: list[str]) -> str:
        head = make_uid(*parts, digits=_HASH_DIGITS)
        return ".".join([head, *tail])

    def owner(self, uid: str) -> int | None:
        if not uid.startswith(UID_ROOT):
            return None
        components = uid[len(UID_ROOT):].split(".")
        return self.index_of(components[1]) if len(components) >= 3 else None
