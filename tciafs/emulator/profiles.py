"""The emulator's named archives: what each one holds.

Only the collection facts (license, DOI, release date, access, host) and the generator's
inputs are typed here. Every value the API serves about patients, studies, series and
instances is read back from the DICOM headers the generator writes from these inputs.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, TypedDict

from tciafs.emulator.model import CollectionFacts
from tciafs.emulator.nlst import PATIENTS as NLST_PATIENTS
from tciafs.emulator.nlst import NlstCollection
from tciafs.emulator.specs import Kind, PatientSpec, SeriesSpec, StudySpec


@dataclass(frozen=True)
class CollectionSpec:
    facts: CollectionFacts
    patients: tuple[PatientSpec, ...]


class DrawnCollection(Protocol):
    """A collection too large to list whole: each patient is drawn from the seed by its
    position, and every UID it holds names that patient (`owner`), so any one patient,
    series or image is found without planning the others."""

    facts: CollectionFacts
    size: int  # patients

    def patient_id(self, index: int) -> str: ...

    def index_of(self, patient_id: str) -> int | None: ...

    def person(self, index: int) -> PatientSpec:
        """The patient's own facts, without studies: cheap enough to list them all."""
        ...

    def patient(self, index: int) -> PatientSpec:
        """The patient with every study and series."""
        ...

    def uid(self, *parts: object, digits: int = ...) -> str:
        """The UID scheme its plans use (`tciafs.emulator.dicomgen.UidMaker`)."""
        ...

    def owner(self, uid: str) -> int | None:
        """The index of the patient a study, series or SOP Instance UID could belong
        to; the caller still compares the UID with the patient's own."""
        ...


@dataclass(frozen=True)
class Profile:
    name: str
    seed: int
    collections: tuple[CollectionSpec, ...]
    # True: written once into the data dir and served from the files (demo). False: made
    # on demand from the seed and never written (scale, bench).
    on_disk: bool
    # What the emulator's S3 buckets hold (IDC's side); None: the default rule of
    # IdcSpec. Left out of repr: the fingerprint of the files on disk does not change
    # with it, as nothing of it is written there.
    idc: IdcSpec | None = field(default=None, repr=False, compare=False)
    # Collections drawn patient by patient when asked for, never planned whole (nlst).
    drawn: tuple[DrawnCollection, ...] = field(default=(), repr=False, compare=False)


class Licence(TypedDict):
    """The licence fields of CollectionFacts, shared by the collections that use them."""

    license_name: str
    license_short: str
    license_uri: str


CC_BY_4 = Licence(license_name="Creative Commons Attribution 4.0 International License",
                  license_short="CC BY 4.0",
                  license_uri="https://creativecommons.org/licenses/by/4.0/")
CC_BY_3 = Licence(license_name="Creative Commons Attribution 3.0 Unported License",
                  license_short="CC BY 3.0",
                  license_uri="http://creativecommons.org/licenses/by/3.0/")
RESTRICTED = Licence(license_name="TCIA Restricted License Agreement",
                     license_short="TCIA Restricted",
                     license_uri="https://www.cancerimagingarchive.net/"
                                 "data-usage-policies-and-restrictions/")

_GE = "GE MEDICAL SYSTEMS"


# ---------------------------------------------------------------------------------------
# demo: small, realistic, awkward names; written to disk once


_LUNG_FACTS = CollectionFacts(
    name="Demo-Lung CT_2024", **CC_BY_4,
    doi="https://doi.org/10.7937/TCIAFS.DEMO.LUNGCT2024",
    date_released=dt.date(2024, 3, 15), site="Demo Site A",
    description="Synthetic chest CT of a lung phantom with a nodule and its contours.")


def _lung_001(*more: SeriesSpec) -> PatientSpec:
    """LUNG-001; `more` series after the two NBIA has (the IDC side adds one)."""
    return PatientSpec("LUNG-001", "M", dt.date(1956, 4, 12), ethnic_group="White", studies=(
        StudySpec(dt.date(2019, 6, 3), "CT CHEST W/O CONTRAST", "1", series=(
            SeriesSpec(Kind.CT, 40, "Axial 2.5mm STD", protocol="Chest Routine",
                       body_part="CHEST", manufacturer=_GE, model="LightSpeed VCT",
                       software="LightSpeedverrel", number=2),
            SeriesSpec(Kind.RTSTRUCT, 1, "Nodule contours", manufacturer="tciafs",
                       model="Contour Demo", software="1.0", number=1000, references=0),
            *more,
        )),
    ))


def _lung_collection() -> CollectionSpec:
    facts = _LUNG_FACTS
    lung_001 = _lung_001()
    lung_002 = PatientSpec("LUNG 002", "F", dt.date(1962, 11, 30), studies=(
        StudySpec(dt.date(2020, 1, 14), "CHEST^LDCT", "5512", series=(
            SeriesSpec(Kind.CT, 32, "CHEST 2.5 B30f", protocol="LungCARE", body_part="CHEST",
                       manufacturer="SIEMENS", model="SOMATOM Definition AS",
                       software="syngo CT VA48A", number=3),
        )),
    ))
    # Literal quotes in Manufacturer exist in the real NBIA database; body part is null.
    lung_003 = PatientSpec("LUNG/003", "M", dt.date(1949, 7, 8), ethnic_group="Asian", studies=(
        StudySpec(dt.date(2021, 9, 2), "CT GUIDED BIOPSY", None, series=(
            SeriesSpec(Kind.CT, 16, "Biopsy guidance", manufacturer='"GE Healthcare"',
                       model="Revolution CT", software="rev_ct 1.2", number=1),
        )),
    ))
    return CollectionSpec(facts, (lung_001, lung_002, lung_003))


def _petct_collection() -> CollectionSpec:
    facts = CollectionFacts(
        name="Demo_PET-CT Lymphoma", **CC_BY_3,
        doi="https://doi.org/10.7937/TCIAFS.DEMO.PETCT",
        date_released=dt.date(2021, 11, 2), site="Demo Site B",
        description="Synthetic FDG PET/CT with attenuation-correction CT.")
    # Mixed-case "Siemens" next to the lung collection's "SIEMENS", as in real v1 lists.
    petra = PatientSpec("Pétra-005", "F", dt.date(1971, 2, 27), ethnic_group="White", studies=(
        StudySpec(dt.date(2018, 11, 20), "PET/CT WHOLE BODY & NECK", "PETCT1", series=(
            SeriesSpec(Kind.CT, 20, "CT Atten Cor Head & Neck", protocol="PET-CT WB",
                       body_part="WHOLEBODY", manufacturer="Siemens", model="Biograph 64",
                       software="VG60A", number=2, thickness_mm=3.75),
            SeriesSpec(Kind.PT, 20, "PET AC 3D", protocol="PET-CT WB", body_part="WHOLEBODY",
                       manufacturer="Siemens", model="Biograph 64", software="VG60A",
                       number=4),
        )),
    ))
    return CollectionSpec(facts, (petra,))


def _mr_collection() -> CollectionSpec:
    facts = CollectionFacts(
        name="Demo MR-Brain_2023", **CC_BY_4,
        doi="https://doi.org/10.7937/TCIAFS.DEMO.MRBRAIN",
        date_released=dt.date(2023, 6, 30), site="Demo Site C",
        description="Synthetic brain MR with a multi-frame secondary capture.")
    hidden = PatientSpec(".MRB-006", "M", dt.date(1980, 5, 5), studies=(
        StudySpec(dt.date(2022, 7, 19), "MRI BRAIN W/WO CONTRAST", "A1", series=(
            SeriesSpec(Kind.MR, 16, "Ax T1 SE", protocol="BRAIN T1", body_part="BRAIN",
                       manufacturer="Philips Medical Systems", model="Ingenia",
                       software="5.4.1", number=3),
            # A screen capture: no manufacturer recorded (null), no body part.
            SeriesSpec(Kind.SC_MF, 16, "Screen Save", number=99),
        )),
    ))
    normal = PatientSpec("MRB-007", "F", dt.date(1990, 12, 1), ethnic_group="Hispanic", studies=(
        StudySpec(dt.date(2023, 1, 9), "MRI BRAIN", "A2", series=(
            SeriesSpec(Kind.MR, 16, "Ax T1 post", protocol="BRAIN T1", body_part="BRAIN",
                       manufacturer=_GE, model="SIGNA Premier", software="29.1", number=5),
        )),
    ))
    return CollectionSpec(facts, (hidden, normal))


def _restricted_collection() -> CollectionSpec:
    facts = CollectionFacts(
        name="Demo-Restricted Prostate_MR", **RESTRICTED,
        doi="https://doi.org/10.7937/TCIAFS.DEMO.PROSTATE",
        date_released=dt.date(2022, 2, 8), site="Demo Site D",
        description="Synthetic prostate MR, visible only to granted users.", restricted=True)
    patient = PatientSpec("PROST-010", "M", dt.date(1955, 3, 3), studies=(
        StudySpec(dt.date(2021, 5, 5), "MR PROSTATE MULTIPARAMETRIC", "P1", series=(
            SeriesSpec(Kind.MR, 16, "t2_tse_tra", protocol="t2_tse_tra", body_part="PROSTATE",
                       number=4),
        )),
    ))
    return CollectionSpec(facts, (patient,))


def _nlst_collection() -> CollectionSpec:
    facts = CollectionFacts(
        name="NLST-Demo", **CC_BY_4,
        doi="https://doi.org/10.7937/TCIAFS.DEMO.NLST",
        date_released=dt.date(2020, 6, 1), site="Demo NLST",
        description="Synthetic low-dose screening CT, kept on the NLST server.", host="nlst")
    ct = SeriesSpec(Kind.CT, 12, "0,OPA,GE,HSQX,STANDARD,300,2.5,120,40,0.1,1.5",
                    body_part="CHEST", manufacturer=_GE, model="HiSpeed QX/i",
                    software="LightSpeedApps2.4.2_H2.4M5", number=2)
    patient = PatientSpec("100012", "M", dt.date(1941, 8, 20), ethnic_group="White", studies=(
        StudySpec(dt.date(1999, 1, 2), "NLST-LSS", "T0", series=(ct,)),
        StudySpec(dt.date(2000, 1, 2), "NLST-LSS", "T1", series=(ct,)),
    ))
    return CollectionSpec(facts, (patient,))


# ---------------------------------------------------------------------------------------
# The IDC side of a profile: what the emulator's S3 buckets hold (tciafs/emulator/idc.py)

IDC_OPEN_DATA = "idc-open-data"
IDC_OPEN_DATA_TWO = "idc-open-data-two"
IDC_OPEN_DATA_CR = "idc-open-data-cr"
BUCKETS = (IDC_OPEN_DATA, IDC_OPEN_DATA_TWO, IDC_OPEN_DATA_CR)

CC_BY_NC_4 = Licence(license_name="Creative Commons Attribution-NonCommercial 4.0 "
                                  "International License",
                     license_short="CC BY-NC 4.0",
                     license_uri="https://creativecommons.org/licenses/by-nc/4.0/")


@dataclass(frozen=True)
class SeriesRef:
    """One series of a profile, named as a person finds it in the tree."""

    collection: str
    patient_id: str
    description: str


@dataclass(frozen=True)
class AnalysisResult:
    """A data set derived from a collection (contours, segmentations) that IDC holds
    beside it: its series share the collection, and it has a DOI and licence of its own."""

    analysis_result_id: str
    title: str
    doi: str
    licence: Licence
    series: tuple[SeriesRef, ...]


@dataclass(frozen=True)
class IdcSpec:
    """What IDC holds of a profile. The rule:

    - every series of every public collection, on either NBIA server, is in a bucket,
      except those in `nbia_only`; restricted collections never are;
    - the series of `idc_only` are in a bucket too, and NBIA never lists them: they are
      made on demand from the profile's seed, never written with the archive. A series
      there that NBIA already has (the same patient, study and position give the same
      UIDs) is that same series, so `idc_only` can add a series to an NBIA study;
    - a collection's series are in the bucket `buckets` names for it, else in
      idc-open-data.
    """

    nbia_only: tuple[SeriesRef, ...] = ()
    idc_only: tuple[CollectionSpec, ...] = ()
    buckets: tuple[tuple[str, str], ...] = ()  # (collection, bucket)
    analysis_results: tuple[AnalysisResult, ...] = ()

    def bucket_of(self, collection: str) -> str:
        return dict(self.buckets).get(collection, IDC_OPEN_DATA)

    def analysis_result_of(self, ref: SeriesRef) -> AnalysisResult | None:
        return next((a for a in self.analysis_results if ref in a.series), None)


def _demo_idc() -> IdcSpec:
    ai_contours = SeriesSpec(Kind.RTSTRUCT, 1, "AI nodule contours", manufacturer="tciafs",
                             model="Nodule AI", software="2.0", number=2000, references=0)
    colon = CollectionSpec(CollectionFacts(
        name="Demo-IDC Only_Colon CT", **CC_BY_NC_4,
        doi="https://doi.org/10.7937/TCIAFS.DEMO.COLONCT",
        date_released=dt.date(2025, 2, 20), site="Demo Site E",
        description="Synthetic CT colonography that only IDC holds."), (
        PatientSpec("COLON-101", "F", dt.date(1966, 9, 9), studies=(
            StudySpec(dt.date(2024, 10, 1), "CT COLONOGRAPHY", "C1", series=(
                SeriesSpec(Kind.CT, 24, "Supine 1.25mm", body_part="COLON",
                           manufacturer="SIEMENS", model="SOMATOM Force",
                           software="syngo CT VB10", number=2, matrix=256),
            )),
        )),
    ))
    return IdcSpec(
        nbia_only=(SeriesRef("Demo-Lung CT_2024", "LUNG/003", "Biopsy guidance"),
                   SeriesRef("Demo MR-Brain_2023", ".MRB-006", "Screen Save")),
        idc_only=(CollectionSpec(_LUNG_FACTS, (_lung_001(ai_contours),)), colon),
        # As in IDC: a few collections in -two, CC BY-NC ones in -cr.
        buckets=(("Demo MR-Brain_2023", IDC_OPEN_DATA_TWO),
                 ("Demo-IDC Only_Colon CT", IDC_OPEN_DATA_CR)),
        analysis_results=(AnalysisResult(
            "demo_lung_ai_nodules", "AI nodule contours for Demo-Lung CT_2024",
            "https://doi.org/10.5281/zenodo.TCIAFS.DEMO.AINODULES", CC_BY_4,
            (SeriesRef("Demo-Lung CT_2024", "LUNG-001", "AI nodule contours"),)),),
    )


def demo() -> Profile:
    return Profile("demo", seed=20240315, on_disk=True, collections=(
        _lung_collection(), _petct_collection(), _mr_collection(),
        _restricted_collection(), _nlst_collection(),
    ), idc=_demo_idc())


# ---------------------------------------------------------------------------------------
# scale: many small series, metadata only until a series is asked for

_SCALE_THEMES = ("Lung CT", "Brain-MR", "PET_CT", "Head-Neck CT", "Breast MR")
_SCALE_KINDS = (Kind.CT, Kind.MR, Kind.PT)


def _scale_patient(c: int, p: int, studies: int, series: int, images: int) -> PatientSpec:
    def one_series(s: int, k: int) -> SeriesSpec:
        kind = _SCALE_KINDS[(c + p + s + k) % len(_SCALE_KINDS)]
        return SeriesSpec(kind, images, f"{kind} series {k + 1}", body_part="CHEST",
                          manufacturer=_GE, model="Scale Model", software="1", number=k + 1,
                          matrix=64, distinct_planes=4)

    visits = tuple(StudySpec(dt.date(2010 + s, 1 + p % 12, 1 + c % 28), f"SCALE STUDY {s + 1}",
                             str(s + 1), series=tuple(one_series(s, k) for k in range(series)))
                   for s in range(studies))
    return PatientSpec(f"SC{c:02d}-{p:04d}", "FM"[p % 2], dt.date(1940 + p % 50, 1 + c % 12, 15),
                       visits)


def scale(collections: int = 10, patients: int = 10, studies: int = 2, series: int = 5,
          images: int = 100) -> Profile:
    specs = []
    for c in range(collections):
        facts = CollectionFacts(
            name=f"Scale-{_SCALE_THEMES[c % len(_SCALE_THEMES)]}_{c:02d}", **CC_BY_4,
            doi=f"https://doi.org/10.7937/TCIAFS.SCALE.{c:02d}",
            date_released=dt.date(2015, 1, 1) + dt.timedelta(days=97 * c),
            site=f"Scale Site {c % 3}", description="Synthetic archive for listing at scale.")
        people = tuple(_scale_patient(c, p, studies, series, images) for p in range(patients))
        specs.append(CollectionSpec(facts, people))
    return Profile("scale", seed=1000, on_disk=False, collections=tuple(specs))


# ---------------------------------------------------------------------------------------
# bench: full-size CT for throughput measurements, made on demand


def bench() -> Profile:
    facts = CollectionFacts(
        name="Bench-CT_Throughput", **CC_BY_4,
        doi="https://doi.org/10.7937/TCIAFS.BENCH",
        date_released=dt.date(2025, 1, 6), site="Bench Site",
        description="Synthetic full-size series for benchmarks.")

    def ct(count: int, description: str, number: int, thickness: float = 1.25) -> SeriesSpec:
        # Eight distinct planes per series: drawing noise for every slice would cap the
        # generation rate far below what a benchmark of the filesystem needs.
        return SeriesSpec(Kind.CT, count, description, body_part="CHEST", manufacturer=_GE,
                          model="Revolution CT", software="rev_ct 1.2", number=number,
                          thickness_mm=thickness, distinct_planes=8)

    patients = (
        PatientSpec("BENCH-001", "F", dt.date(1960, 1, 1), studies=(
            StudySpec(dt.date(2024, 2, 1), "CT CHEST 200", "B1",
                      series=(ct(200, "Axial 1.25mm", 2),)),
            StudySpec(dt.date(2024, 3, 1), "CT CHEST 4x50", "B2",
                      series=tuple(ct(50, f"Axial part {k + 1}", k + 2, 5.0) for k in range(4))),
        )),
        # ~100 MB in 800 small files: the many-files case next to the big-files one.
        PatientSpec("BENCH-002", "M", dt.date(1970, 1, 1), studies=(
            StudySpec(dt.date(2024, 4, 1), "MR 100MB", "B3", series=(
                SeriesSpec(Kind.MR, 800, "Ax T1 thin", body_part="BRAIN", manufacturer=_GE,
                           model="SIGNA Premier", software="29.1", number=2,
                           thickness_mm=1.0, distinct_planes=8),
            )),
        )),
        PatientSpec("BENCH-003", "F", dt.date(1980, 1, 1), studies=(
            StudySpec(dt.date(2024, 5, 1), "CT 1GB", "B4",
                      series=(ct(2000, "Axial 0.5mm", 2, 0.5),)),
        )),
    )
    # Every series in a bucket as well, for the IDC figure's copies (scripts/bench).
    return Profile("bench", seed=50, on_disk=False,
                   collections=(CollectionSpec(facts, patients),), idc=IdcSpec())


# ---------------------------------------------------------------------------------------
# nlst: NLST's shape, drawn patient by patient from the seed, never planned whole


def nlst(patients: int = NLST_PATIENTS) -> Profile:
    facts = CollectionFacts(
        name="NLST", **CC_BY_4, doi="https://doi.org/10.7937/TCIAFS.NLST",
        date_released=dt.date(2013, 6, 1), site="NLST",
        description="Synthetic low-dose screening CT in the shape of the National Lung "
                    "Screening Trial's collection, kept on the NLST server.", host="nlst")
    seed = 2002
    return Profile("nlst", seed=seed, collections=(), on_disk=False,
                   drawn=(NlstCollection(facts, seed, patients),))


PROFILES: dict[str, Callable[[], Profile]] = {"demo": demo, "scale": scale, "bench": bench,
                                              "nlst": nlst}


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]()
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; choose from {sorted(PROFILES)}") from None
