"""Walk targets in the emulator's nlst profile: the first patients holding N files.

    python scripts/benchlib/nlst_subset.py [FILES ...]     (default 10^6 and 10^7)

A walk of "10^6 files" walks the first patients of the NLST collection, in the order
getPatient lists them (rising IDs, as a directory listing sorts them), until they hold
that many instances. The counts come from the generator's own per-patient function, the
one the emulator serves from, so no server is needed:

    10^6 files: the first 1,248 patients (1,000,603 files)
    10^7 files: the first 12,726 patients (10,000,764 files)
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from tciafs.emulator.nlst import NlstCollection
from tciafs.emulator.profiles import nlst


@dataclass(frozen=True)
class WalkTarget:
    """The first patients of the collection holding at least `files` instances."""

    collection: str
    patients: tuple[str, ...]  # their IDs, in listing order
    studies: int
    series: int
    files: int

    @property
    def directories(self) -> int:
        """The patient, study and series directories under the collection."""
        return len(self.patients) + self.studies + self.series


def walk_target(files: int) -> WalkTarget:
    drawn = nlst().drawn[0]
    assert isinstance(drawn, NlstCollection)
    ids: list[str] = []
    studies = series = found = 0
    for index in range(drawn.size):
        if found >= files:
            break
        patient = drawn.patient(index)
        ids.append(patient.patient_id)
        studies += len(patient.studies)
        series += sum(len(s.series) for s in patient.studies)
        found += sum(spec.count for s in patient.studies for spec in s.series)
    return WalkTarget(drawn.facts.name, tuple(ids), studies, series, found)


def main(argv: list[str]) -> int:
    for files in [int(float(a)) for a in argv] or [10**6, 10**7]:
        t = walk_target(files)
        print(f"{files:,} files: the first {len(t.patients):,} patients of {t.collection} "
              f"({t.patients[0]} to {t.patients[-1]}): {t.studies:,} studies, "
              f"{t.series:,} series, {t.files:,} files, {t.directories:,} directories")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
