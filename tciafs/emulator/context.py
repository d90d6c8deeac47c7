"""What an endpoint sees of one request: the request, its server, and who is asking."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from tciafs.emulator import zipstream
from tciafs.emulator.auth import GUEST, Auth
from tciafs.emulator.faults import Faults, Stats
from tciafs.emulator.model import Archive, CollectionFacts, PatientRecord, SeriesRecord

#: Shared carts served by getContentsByName (v1/v2) and legacy ContentsByName.
CARTS: dict[str, str] = {
    "nbia-demo-cart": "the first series of every public collection of the server, "
                      "collections in name order",
    "nbia-first-patient-cart": "every series of the first patient of the first public "
                               "collection (name order) of the server",
}


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    form: dict[str, list[str]]
    headers: dict[str, str]  # lower-case names
    body: bytes = b""

    def q(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[0] if values else None

    def f(self, name: str) -> str | None:
        values = self.form.get(name)
        return values[0] if values else None

    def merged(self) -> dict[str, str]:
        """Query and form fields, first value of each (form wins)."""
        merged = {k: v[0] for k, v in self.query.items() if v}
        merged.update({k: v[0] for k, v in self.form.items() if v})
        return merged


@dataclass
class Context:
    """What one server (main or NLST) shares with every request it handles."""

    archive: Archive
    host: str  # "main" or "nlst": the CollectionFacts.host this server holds
    auth: Auth
    faults: Faults
    stats: Stats
    expired_mode: str = "swallow"
    verbose: bool = False
    bodies: zipstream.BodyCache = field(default_factory=zipstream.BodyCache)

    @cached_property
    def collections(self) -> dict[str, CollectionFacts]:
        return {f.name: f for f in self.archive.collections.values() if f.host == self.host}

    @cached_property
    def by_upper(self) -> dict[str, CollectionFacts]:
        return {name.upper(): f for name, f in self.collections.items()}

    @cached_property
    def public(self) -> frozenset[str]:
        return frozenset(n for n, f in self.collections.items() if not f.restricted)

    def visible_to(self, username: str | None) -> frozenset[str]:
        restricted = {n for n, f in self.collections.items() if f.restricted}
        return self.public | frozenset(self.auth.users.granted(username, restricted))

    def facts(self, collection: str) -> CollectionFacts | None:
        return self.collections.get(collection) or self.by_upper.get(collection.upper())

    def _series_of(self, patient: PatientRecord) -> list[SeriesRecord]:
        return self.archive.series(collection=patient.collection,
                                   patient_id=patient.patient_id)

    @cached_property
    def carts(self) -> dict[str, list[str]]:
        """Series UIDs of each cart in :data:`CARTS`, derived once from the archive."""
        # A collection's first series is its first patient's first: found without
        # listing every series of a collection of tens of thousands of patients.
        public = sorted(self.public)
        firsts: list[str] = []
        first_patient: list[str] = []
        for name in public:
            patients = self.archive.patients(name)
            if name == public[0] and patients:
                first_patient = [s.series_instance_uid for s in self._series_of(patients[0])]
            first = next((found[0] for found in map(self._series_of, patients) if found), None)
            firsts += [first.series_instance_uid] if first is not None else []
        return {"nbia-demo-cart": firsts, "nbia-first-patient-cart": first_patient}


@dataclass
class Call:
    """One request to one endpoint, by one user, under one API generation."""

    ctx: Context
    req: Request
    api: str  # v1 | v2 | v4 | root | legacy-v3 | legacy-v4
    username: str = GUEST

    @property
    def archive(self) -> Archive:
        return self.ctx.archive

    @property
    def v4(self) -> bool:
        return self.api in ("v4", "root")

    @cached_property
    def visible(self) -> frozenset[str]:
        return self.ctx.visible_to(self.username)

    def q(self, name: str) -> str | None:
        return self.req.q(name)
