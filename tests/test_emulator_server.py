"""The emulator's metadata endpoints over real HTTP, checked against docs/nbia-wire.md.

Column lists and texts below are written from those facts, not from the emulator, so
a drift in either shows up here.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections.abc import Iterator

import httpx
import pytest
from test_emulator_support import (
    API_KEY,
    CT_LUNG,
    MR_BRAIN,
    NLST,
    RESTRICTED,
    USERS,
    serve_tiny,
    uid,
)

from tciafs.emulator.server import EmulatorServers

V1 = "/nbia-api/services/v1/"
V2 = "/nbia-api/services/v2/"
V4 = "/nbia-api/services/v4/"
ROOT = "/nbia-api/services/"
GUEST_HEADER = {"Authorization": "Bearer undefined"}
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.0$")
V4_DATE = re.compile(r"^\d\d-\d\d-\d{4}$")

SERIES_V1 = ["SeriesInstanceUID", "StudyInstanceUID", "Modality", "ProtocolName", "SeriesDate",
             "SeriesDescription", "BodyPartExamined", "SeriesNumber", "AnnotationsFlag",
             "Collection", "PatientID", "Manufacturer", "ManufacturerModelName",
             "SoftwareVersions", "ImageCount", "TimeStamp", "LicenseName", "LicenseURI",
             "CollectionURI", "FileSize", "DateReleased", "StudyDesc", "StudyDate",
             "ThirdPartyAnalysis"]
SERIES_V4 = ["SeriesInstanceUID", "StudyInstanceUID", "Modality", "ProtocolName", "SeriesDate",
             "SeriesDescription", "BodyPartExamined", "SeriesNumber", "AnnotationsFlag",
             "Collection", "Site", "PatientID", "PatientSex", "PatientAge",
             "AdmittingDiagnosisDescription", "Manufacturer", "ManufacturerModelName",
             "SoftwareVersions", "ImageCount", "MaxSubmissionTimestamp", "LicenseName",
             "LicenseURI", "DataDescriptionURI", "FileSize", "ReleasedStatus", "DateReleased",
             "StudyDesc", "StudyDate", "ThirdPartyAnalysis", "Authorized"]
METADATA_V4 = ["PatientID", "PatientName", "PatientSex", "EthnicGroup", "Phantom",
               "SpeciesCode", "SpeciesDescription", "StudyInstanceUID", "StudyDate",
               "StudyDesc", "AdmittingDiagnosisDescription", "StudyID", "PatientAge",
               "LongitudinalTemporalEventType", "LongitudinalTemporalOffsetFromEvent",
               "SeriesInstanceUID", "Collection", "Site", "Modality", "ProtocolName",
               "SeriesDate", "SeriesDescription", "BodyPartExamined", "SeriesNumber",
               "AnnotationsFlag", "Manufacturer", "ManufacturerModelName",
               "PixelSpacing(mm)-Row", "SliceThickness(mm)", "SoftwareVersions", "ImageCount",
               "MaxSubmissionTimestamp", "LicenseName", "LicenseURI", "DataDescriptionURI",
               "FileSize", "ReleasedStatus", "DateReleased", "ThirdPartyAnalysis",
               "Authorized"]


@pytest.fixture(scope="module")
def servers() -> Iterator[EmulatorServers]:
    with serve_tiny() as running:
        yield running


@pytest.fixture(scope="module")
def client(servers: EmulatorServers) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=servers.url, timeout=10) as c:
        yield c


@pytest.fixture(scope="module")
def nlst(servers: EmulatorServers) -> Iterator[httpx.Client]:
    assert servers.nlst_url
    with httpx.Client(base_url=servers.nlst_url, timeout=10) as c:
        yield c


def keys_in_order(response: httpx.Response) -> list[list[str]]:
    rows = json.loads(response.text, object_pairs_hook=lambda pairs: [k for k, _ in pairs])
    return rows


def assert_empty(response: httpx.Response) -> None:
    assert response.status_code == 200
    assert response.content == b""
    assert "content-type" not in response.headers
    assert response.headers["content-length"] == "0"


def assert_text(response: httpx.Response, status: int, body: str, ctype: str) -> None:
    assert (response.status_code, response.text) == (status, body)
    assert response.headers["content-type"].startswith(ctype)


# --- value lists -----------------------------------------------------------------------

def test_collection_values_are_objects_per_server(client: httpx.Client,
                                                  nlst: httpx.Client) -> None:
    for version in (V1, V4):
        r = client.get(version + "getCollectionValues")
        assert r.headers["content-type"] == "application/json"
        assert r.json() == [{"Collection": MR_BRAIN}, {"Collection": CT_LUNG}]
    assert nlst.get(V4 + "getCollectionValues").json() == [{"Collection": NLST}]


def test_value_lists_keep_null_rows_and_v1_case(client: httpx.Client) -> None:
    v1 = client.get(V1 + "getManufacturerValues").json()
    assert v1 == [{}, {"Manufacturer": "GE MEDICAL SYSTEMS"}, {"Manufacturer": "SIEMENS"},
                  {"Manufacturer": "Siemens"}]
    v4 = client.get(V4 + "getManufacturerValues").json()
    assert v4 == [{}, {"Manufacturer": "GE MEDICAL SYSTEMS"}, {"Manufacturer": "SIEMENS"}]
    parts = client.get(V4 + "getBodyPartValues", params={"Collection": CT_LUNG.lower()}).json()
    assert parts == [{}, {"BodyPartExamined": "CHEST"}, {"BodyPartExamined": "LUNG"}]
    modalities = client.get(V1 + "getModalityValues", params={"BodyPartExamined": "chest"})
    assert modalities.json() == [{"Modality": "CT"}]


def test_empty_results_are_empty_200(client: httpx.Client) -> None:
    assert_empty(client.get(V1 + "getPatient", params={"Collection": "No-Such"}))
    assert_empty(client.get(V4 + "getPatient", params={"Collection": ""}))
    assert_empty(client.get(V4 + "getSeries", params={"SeriesInstanceUID": "1.2.3"}))
    assert_empty(client.get(V1 + "getSOPInstanceUIDs", params={"SeriesInstanceUID": "1.2.3"}))


# --- patients and studies ----------------------------------------------------------------

def test_patient_shapes_per_version(client: httpx.Client) -> None:
    v1 = {p["PatientId"]: p for p in client.get(V1 + "getPatient").json()}
    assert set(v1) == {"TCL-001", "TCL 002/b", ".hidden-pt", "Zoë-1"}
    assert v1["TCL-001"] == {"PatientId": "TCL-001", "PatientName": "TCL-001",
                             "PatientBirthDate": "1950-01-02 00:00:00.0", "PatientSex": "F",
                             "Collection": CT_LUNG, "Phantom": "NO",
                             "SpeciesCode": "337915000", "SpeciesDescription": "Homo sapiens"}
    assert "PatientSex" not in v1["TCL 002/b"]  # NULL columns are dropped
    v4 = client.get(V4 + "getPatient", params={"PatientId": "zoë-1"})
    assert keys_in_order(v4) == [["PatientId", "PatientName", "PatientSex", "Collection",
                                  "Phantom", "SpeciesCode", "SpeciesDescription",
                                  "Authorized"]]
    assert v4.json()[0]["Authorized"] == 1


def test_v4_rejects_unknown_params_v1_ignores_them(client: httpx.Client) -> None:
    r = client.get(V4 + "getPatient", params={"PatientID": "TCL-001"})
    assert r.status_code == 400
    assert r.text.startswith("Invalid query parameter: 'PatientID'. Allowed parameters are: [")
    assert set(r.text.split("[")[1].rstrip("]").split(", ")) == {"Collection", "PatientId",
                                                                   "format"}
    everything = client.get(V1 + "getSeries").json()
    assert client.get(V1 + "getSeries", params={"collection": "x"}).json() == everything
    assert client.get(V4 + "getModalityValuesAndCounts", params={"format": "json"}
                      ).status_code == 400


def test_patient_by_collection_and_modality(client: httpx.Client) -> None:
    assert_text(client.get(V1 + "getPatientByCollectionAndModality", params={"Modality": "CT"}),
                400, "A parameter, Collection and Modality, are required for this API call.",
                "application/json")
    params = {"Collection": CT_LUNG, "Modality": "SEG"}
    assert client.get(V1 + "getPatientByCollectionAndModality", params=params
                      ).json() == [{"PatientId": "TCL-001"}]
    assert client.get(V4 + "getPatientByCollectionAndModality", params=params
                      ).json() == [{"PatientId": "TCL-001", "Authorized": 1}]


def test_patient_study_shapes(client: httpx.Client) -> None:
    params = {"Collection": CT_LUNG, "PatientID": "TCL-001"}
    v1 = client.get(V1 + "getPatientStudy", params=params).json()
    assert len(v1) == 1 and TIMESTAMP.match(v1[0]["StudyDate"])
    assert v1[0]["SeriesCount"] == 3 and v1[0]["PatientBirthDate"] == "1950-01-02 00:00:00.0"
    assert v1[0]["StudyInstanceUID"] == uid("s1") and v1[0]["PatientAge"] == "061Y"
    v4 = client.get(V4 + "getPatientStudy", params=params)
    row = v4.json()[0]
    assert V4_DATE.match(row["StudyDate"]) and row["Authorized"] == 1
    assert "PatientBirthDate" not in row
    assert keys_in_order(v4)[0][:4] == ["StudyInstanceUID", "StudyDate", "StudyDescription",
                                        "StudyID"]


def test_new_patients_date_rules(client: httpx.Client) -> None:
    def ids(version: str, **params: str) -> list[str]:
        r = client.get(version + "NewPatientsInCollection", params=params)
        return [p["PatientId"] for p in r.json()] if r.content else []

    # MR_BRAIN was released 2022-06-01: v1/v2 strictly after Date, v4 on or after fromDate.
    assert ids(V1, Collection=MR_BRAIN, Date="2022/05/31") == [".hidden-pt", "Zoë-1"]
    assert ids(V1, Collection=MR_BRAIN, Date="2022/06/01") == []
    assert ids(V1, Collection=MR_BRAIN, Date="2022/05/32") == []  # lenient: June 1st
    assert ids(V4, Collection=MR_BRAIN, fromDate="06-01-2022") == [".hidden-pt", "Zoë-1"]
    assert ids(V4, Collection=MR_BRAIN, fromDate="06-02-2022") == []
    assert_empty(client.get(V4 + "NewPatientsInCollection",
                            params={"Collection": MR_BRAIN, "fromDate": "2022/05/01"}))
    assert_text(client.get(V4 + "NewPatientsInCollection", params={"Collection": MR_BRAIN}),
                400, "A parameter, Collection and Date are required for this API call.",
                "application/json")


def test_new_studies(client: httpx.Client) -> None:
    r = client.get(V1 + "NewStudiesInPatientCollection",
                   params={"Collection": MR_BRAIN, "Date": "2020/01/01", "PatientID": "Zoë-1"})
    assert [s["StudyInstanceUID"] for s in r.json()] == [uid("s4")]
    assert_empty(client.get(V4 + "NewStudiesInPatientCollection",
                            params={"Collection": MR_BRAIN, "fromDate": "01-01-2023"}))


# --- series ------------------------------------------------------------------------------

def test_series_v1_columns_and_types(client: httpx.Client) -> None:
    r = client.get(V1 + "getSeries", params={"PatientID": "tcl-001", "Modality": "CT"})
    assert len(r.json()) == 2
    for keys, row in zip(keys_in_order(r), r.json(), strict=True):
        assert keys == [k for k in SERIES_V1 if k in row]  # column order minus NULLs
        assert TIMESTAMP.match(row["TimeStamp"]) and TIMESTAMP.match(row["DateReleased"])
        assert isinstance(row["ImageCount"], int) and isinstance(row["FileSize"], int)
        assert isinstance(row["SeriesNumber"], int)
        assert row["CollectionURI"].startswith("https://doi.org/")


def test_series_v4_columns_and_types(client: httpx.Client) -> None:
    r = client.get(V4 + "getSeries", params={"SeriesInstanceUID": uid("ct-a")})
    (keys,), (row,) = keys_in_order(r), r.json()
    assert keys == [k for k in SERIES_V4 if k in row]
    assert "TimeStamp" not in row and "CollectionURI" not in row
    assert V4_DATE.match(row["MaxSubmissionTimestamp"]) and V4_DATE.match(row["DateReleased"])
    assert (row["ImageCount"], row["Authorized"], row["ReleasedStatus"]) == (12, 1, "Yes")
    assert row["Site"] == f"Site of {CT_LUNG}" and row["PatientSex"] == "F"


def test_updated_series_uses_each_versions_date_format(client: httpx.Client) -> None:
    v1 = client.get(V1 + "getUpdatedSeries", params={"fromDate": "31/05/2022"}).json()
    assert {s["Collection"] for s in v1} == {MR_BRAIN}
    assert list(v1[0])[-1] == "DateReleased" and TIMESTAMP.match(v1[0]["DateReleased"])
    assert_empty(client.get(V1 + "getUpdatedSeries", params={"fromDate": "01/06/2022"}))
    v4 = client.get(V4 + "getUpdatedSeries", params={"fromDate": "05-31-2022"}).json()
    assert {s["Collection"] for s in v4} == {MR_BRAIN} and v4[0]["Authorized"] == 1
    everything = client.get(V4 + "getUpdatedSeries").json()
    assert RESTRICTED not in {s["Collection"] for s in everything}


def test_series_size(client: httpx.Client) -> None:
    series = client.get(V4 + "getSeries", params={"SeriesInstanceUID": uid("ct-a")}).json()[0]
    for version in (V1, V4):
        size = client.get(version + "getSeriesSize", params={"SeriesInstanceUID": uid("ct-a")})
        assert size.json() == [{"TotalSizeInBytes": series["FileSize"], "ObjectCount": 12}]
    assert client.get(V1 + "getSeriesSize", params={"SeriesInstanceUID": "9.9"}).json() == [{}]
    assert_empty(client.get(V4 + "getSeriesSize", params={"SeriesInstanceUID": "9.9"}))
    assert_text(client.get(V4 + "getSeriesSize"), 400,
                "A parameter, SeriesInstanceUID is required for this API call.",
                "application/json")


def test_sop_instance_uids(client: httpx.Client) -> None:
    r = client.get(V1 + "getSOPInstanceUIDs", params={"SeriesInstanceUID": uid("ct-a")})
    assert sorted(row["SOPInstanceUID"] for row in r.json()) == sorted(
        uid("ct-a", n) for n in range(1, 13))
    csv_text = client.get(V4 + "getSOPInstanceUIDs",
                          params={"SeriesInstanceUID": uid("ct-c"), "format": "csv"}).text
    assert csv_text.split("\n")[0] == "SOPInstanceUID" and len(csv_text.split("\n")) == 7
    assert client.get(V4 + "getSOPInstanceUIDs").status_code == 400


def test_series_metadata_v1_all_strings(client: httpx.Client) -> None:
    r = client.get(V1 + "getSeriesMetaData", params={"SeriesInstanceUID": uid("ct-a")})
    (row,) = r.json()
    assert all(isinstance(v, str) for v in row.values())
    assert row["Series UID"] == uid("ct-a") and row["Number of Images"] == "12"
    assert row["Series Number"] == "3.000000" and int(row["File Size"]) > 0
    assert row["Series Description"] == "Series ct-a test"  # [^a-zA-Z0-9 .-] stripped
    assert row["Manufacturer Model Name"] == "Model, X" and row["Subject ID"] == "TCL-001"
    unknown = client.get(V2 + "getSeriesMetaData", params={"SeriesInstanceUID": "9.9"},
                         headers=GUEST_HEADER)
    assert (unknown.status_code, unknown.content) == (204, b"")


def test_series_metadata_v4_csv_and_json(client: httpx.Client) -> None:
    form = {"list": f"{uid('ct-a')},{uid('mr-d')}"}
    r = client.post(V4 + "getSeriesMetadata", data=form)
    assert r.headers["content-type"] == "text/csv"
    assert r.headers["content-disposition"] == 'attachment; filename="SeriesMetaData.csv"'
    lines = r.text.splitlines()
    assert lines[0] == ",".join(f'"{c}"' for c in METADATA_V4)
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert [row["SeriesInstanceUID"] for row in rows] == [uid("ct-a"), uid("mr-d")]
    assert rows[0]["ImageCount"] == "12" and rows[0]["PixelSpacing(mm)-Row"] == "0.703125"
    js = client.post(V4 + "getSeriesMetadata", data={**form, "format": "json"}).json()
    assert all(isinstance(v, str) for row in js for v in row.values())
    assert_text(client.post(V4 + "getSeriesMetadata", data={"list": ""}), 400,
                "A form parameter, list, containing at least one SeriesInstanceUID is required.",
                "application/json")
    assert client.get(V4 + "getSeriesMetadata").status_code == 500  # POST only


def test_contents_by_name(client: httpx.Client) -> None:
    r = client.get(V1 + "getContentsByName", params={"name": "nbia-demo-cart", "format": "xml"})
    assert r.headers["content-type"] == "application/json"  # format is ignored
    rows = r.json()
    assert {s["Collection"] for s in rows} == {CT_LUNG, MR_BRAIN}
    assert all("Date Released" in s and "TimeStamp" not in s for s in rows)
    patient = client.get(V2 + "getContentsByName", params={"name": "nbia-first-patient-cart"},
                         headers=GUEST_HEADER).json()
    assert {s["PatientID"] for s in patient} == {".hidden-pt"}
    assert_empty(client.get(V1 + "getContentsByName", params={"name": "no-such-cart"}))
    assert_text(client.get(V1 + "getContentsByName"), 400,
                "A parameter, name is required for this API call.", "application/json")


# --- output formats ----------------------------------------------------------------------

def test_formats(client: httpx.Client) -> None:
    params = {"Collection": MR_BRAIN}
    quoted = client.get(V1 + "getPatient", params={**params, "format": "csv"})
    assert quoted.headers["content-type"] == "text/csv"
    assert quoted.text.startswith('"PatientId","PatientName","PatientBirthDate",')
    assert '"Zoë-1","Zoë-1","","O",' in quoted.text  # NULL birth date: ""
    xml = client.get(V4 + "getPatient", params={**params, "format": "xml"})
    assert xml.headers["content-type"] == "application/xml"
    assert xml.text.startswith('<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
                               "<Results><Row><PatientId type='java.lang.String'>.hidden-pt")
    assert "<Authorized type='java.lang.Integer'>1</Authorized>" in xml.text
    page = client.get(V1 + "getPatient", params={**params, "format": "HTML"})
    assert page.headers["content-type"] == "text/html" and "<TH>PatientId</TH>" in page.text
    download = client.get(V1 + "getPatient", params={**params, "format": "csv-download"})
    assert download.headers["content-disposition"] == 'attachment; filename="SeriesMetaData.csv"'
    single = client.get(V1 + "getBodyPartValues", params={"format": "csv"})
    assert single.text == "BodyPartExamined\n\n\nBRAIN\nCHEST\nHEAD\nLUNG\n"  # NULL: blank
    assert client.get(V1 + "getBodyPartValues", params={"format": "csvquoted"}).status_code == 500
    bogus = client.get(V1 + "getPatient", params={**params, "format": "yaml"})
    assert_text(bogus, 500, "Server was not able to process your request", "text/plain")
    assert_empty(client.get(V1 + "getPatient", params={"Collection": "none", "format": "yaml"}))


# --- Advanced endpoints ------------------------------------------------------------------

def test_values_and_counts(client: httpx.Client) -> None:
    v4 = client.get(V4 + "getCollectionValuesAndCounts").json()
    assert v4 == [{"Collection": MR_BRAIN, "Count": 2, "Authorized": 1},
                  {"Collection": CT_LUNG, "Count": 2, "Authorized": 1}]
    body_parts = client.get(V4 + "getBodyPartValuesAndCounts", params={"Modality": "MR"}).json()
    assert body_parts == [{"BodyPart": "BRAIN", "Count": 1, "Authorized": 1},
                          {"BodyPart": "HEAD", "Count": 1, "Authorized": 1}]
    species = client.get(V4 + "getSpeciesValuesAndCounts").json()
    assert species == [{"Species": "337915000", "Count": 4, "Authorized": 1}]
    root = client.get(ROOT + "getModalityValuesAndCounts", params={"format": "json"},
                      headers=GUEST_HEADER)
    assert root.json() == [{"criteria": "CT", "count": "2"}, {"criteria": "MR", "count": "2"},
                           {"criteria": "SEG", "count": "1"}]
    no_token = client.get(ROOT + "getModalityValuesAndCounts")
    assert no_token.status_code == 500 and no_token.text.startswith(
        "Server was not able to process your request")


def test_dicom_tags(client: httpx.Client) -> None:
    r = client.get(V4 + "getDicomTags", params={"SeriesUID": uid("seg-b")})
    tags = r.json()
    assert list(tags[0]) == ["element", "name", "data"]
    assert tags[0]["element"].startswith("(0002,")
    elements = [t["element"] for t in tags]
    assert "(7FE0,0010)" not in elements
    start = elements.index("(0008,1115)")
    assert tags[start]["data"] is None
    nested = [(t["element"], t["name"]) for t in tags[start:]]
    assert (">>(0008,1155)", "Referenced SOP Instance UID") in nested
    assert (">(0008,114A)", "End Referenced Instance Sequence") in nested
    assert (">(0020,000E)", "Series Instance UID") in nested
    assert ("(0008,1115)", "End Referenced Series Sequence") in nested
    ref = next(t for t in tags if t["element"] == ">(0020,000E)")
    assert ref["data"] == uid("ct-a")
    position = next(t for t in tags if t["element"] == "(0020,0032)")
    assert position["data"] == "0.0\\0.0\\1.0"  # multi-values joined with a backslash
    overlay = client.get(ROOT + "getDicomTags", params={"SeriesUID": uid("ct-a")},
                         headers=GUEST_HEADER).json()
    assert {t["element"]: t["data"] for t in overlay}["(6000,3000)"] == "..."
    assert_text(client.get(V4 + "getDicomTags", params={"SeriesUID": "9.9"}), 400,
                "The user has not been granted the access to image with given "
                "SeriesInstanceUID,9.9. Please contact System Admin to resolve this issue.",
                "application/json")


def test_collection_descriptions(client: httpx.Client) -> None:
    v4 = client.get(V4 + "getCollectionDescriptions", params={"collectionName": MR_BRAIN})
    (row,) = v4.json()
    assert list(row) == ["description", "id", "collectionName", "descriptionURI"]
    root = client.get(ROOT + "getCollectionDescriptions", headers=GUEST_HEADER).json()
    assert list(root[0]) == ["description", "id", "collectionDescTimestamp", "collectionName",
                             "userName", "licenseId", "descriptionURI"]
    assert all(isinstance(r["collectionDescTimestamp"], int) for r in root)
    assert client.get(V4 + "getCollectionDescriptions", params={"collectionName": "x"}
                      ).json() == []


# --- paths, servers, legacy API ----------------------------------------------------------

# --- one image's MD5 -------------------------------------------------------------------

def _image(client: httpx.Client, series: str, sop: str, **headers: str) -> bytes:
    r = client.get(V4 + "getSingleImage", headers=headers,
                   params={"SeriesInstanceUID": series, "SOPInstanceUID": sop})
    assert r.status_code == 200, r.text
    return r.content


def test_v1_gives_a_public_image_s_md5_to_the_guest(client: httpx.Client,
                                                    nlst: httpx.Client) -> None:
    sop = uid("ct-a", 4)
    want = hashlib.md5(_image(client, uid("ct-a"), sop)).hexdigest()
    assert_text(client.get(V1 + "getM5HashForImage", params={"SOPInstanceUid": sop}),
                200, want, "text/plain")
    on_nlst = hashlib.md5(_image(nlst, uid("ct-g"), uid("ct-g", 2))).hexdigest()
    assert nlst.get(V1 + "getM5HashForImage",
                    params={"SOPInstanceUid": uid("ct-g", 2)}).text == on_nlst
    # v1 runs as the guest, whoever asks: a restricted image is as unknown as "1.2.3".
    token = client.post("/nbia-api/oauth/token", data={
        "grant_type": "password", "username": "alice",
        "password": USERS["alice"].password}).json()["access_token"]
    alice = {"Authorization": f"Bearer {token}"}
    assert _image(client, uid("ct-f"), uid("ct-f", 1), **alice)  # she may read it ...
    for params in ({"SOPInstanceUid": uid("ct-f", 1)}, {"SOPInstanceUid": "1.2.3"}, {},
                   {"SOPInstanceUid": uid("ct-g", 2)},  # ... and NLST's is not on main
                   {"SOPInstanceUID": sop}):  # v1 ignores a name it does not read
        assert_empty(client.get(V1 + "getM5HashForImage", params=params, headers=alice))
    not_found = "Server was not able to process your request\nHTTP 404 Not Found"
    for path in (V4 + "getM5HashForImage", V2 + "getM5HashForImage", V1 + "getMD5HashForImage"):
        assert_text(client.get(path, params={"SOPInstanceUid": sop}), 500, not_found,
                    "text/plain")


def test_v4_md5_of_an_image_is_broken_as_nbia_s_is(client: httpx.Client) -> None:
    sop = uid("ct-a", 4)
    assert_text(client.get(V4 + "getMD5HashForImage", params={"SOPInstanceUid": sop}), 400,
                "Invalid query parameter: 'SOPInstanceUid'. Allowed parameters are: "
                "[SOPInstanceUID]", "application/xml")
    assert_empty(client.get(V4 + "getMD5HashForImage", params={"SOPInstanceUID": sop}))


def test_damaged_storage_leaves_the_stored_md5(client: httpx.Client) -> None:
    sop = uid("ct-a", 5)
    sound = _image(client, uid("ct-a"), sop)
    assert client.post("/_emulator/faults", json={"pcorrupt": 1.0}).status_code == 200
    try:  # every endpoint faulted: images come damaged, the MD5 stays the stored one
        damaged = _image(client, uid("ct-a"), sop)
        listed = client.get(V1 + "getM5HashForImage", params={"SOPInstanceUid": sop}).text
    finally:
        client.post("/_emulator/faults", json={})
    assert damaged != sound and listed == hashlib.md5(sound).hexdigest()


def test_unknown_paths_and_case_sensitivity(client: httpx.Client) -> None:
    expected = "Server was not able to process your request\nHTTP 404 Not Found"
    for path in (V4 + "getSeriesMetaData", V1 + "getSeriesMetadata", V4 + "getContentsByName",
                 V1 + "getdicomtags", ROOT + "getSeries", "/nbia-api/services/v3/getSeries"):
        assert_text(client.get(path), 500, expected, "text/plain")


def test_nlst_server_holds_only_nlst(client: httpx.Client, nlst: httpx.Client) -> None:
    assert_empty(client.get(V4 + "getSeries", params={"SeriesInstanceUID": uid("ct-g")}))
    rows = nlst.get(V4 + "getSeries").json()
    assert [r["SeriesInstanceUID"] for r in rows] == [uid("ct-g")]
    assert_empty(nlst.get(V1 + "getSeries", params={"Collection": CT_LUNG}))


def test_legacy_api(client: httpx.Client) -> None:
    base = "/services/v4/TCIA/query/"
    assert client.get(base + "getCollectionValues", params={"format": "json"}).json() == [
        {"Collection": MR_BRAIN}, {"Collection": CT_LUNG}]
    patients = client.get(base + "getPatient", params={"Collection": MR_BRAIN}).json()
    assert patients[0] == {"PatientID": ".hidden-pt", "PatientName": ".hidden-pt",
                           "PatientSex": "M", "Collection": MR_BRAIN}
    size = client.get(base + "getSeriesSize", params={"SeriesInstanceUID": uid("ct-c")}).json()
    assert re.fullmatch(r"\d+\.0", size[0]["TotalSizeInBytes"]) and size[0]["ObjectCount"] == 5
    series = client.get(base + "getSeries", params={"Collection": CT_LUNG, "Modality": "SEG"})
    assert series.json()[0]["SeriesDate"] == "2001-02-03"
    by_modality = client.get(base + "PatientsByModality",
                             params={"Collection": MR_BRAIN, "Modality": "MR"}).json()
    assert [p["PatientID"] for p in by_modality] == [".hidden-pt", "Zoë-1"]
    new = client.get(base + "NewPatientsInCollection",
                     params={"Collection": MR_BRAIN, "Date": "2022-05-31"}).json()
    assert len(new) == 2
    cart = client.get(base + "ContentsByName", params={"name": "nbia-demo-cart"}).json()
    assert {s["Collection"] for s in cart} == {CT_LUNG, MR_BRAIN}
    assert client.get(base + "PatientsByModality").status_code == 400


def test_legacy_v3_needs_an_api_key(client: httpx.Client) -> None:
    path = "/services/v3/TCIA/query/getCollectionValues"
    assert client.get(path).status_code == 401
    assert client.get(path, headers={"api_key": "wrong"}).status_code == 401
    assert client.get(path, headers={"api_key": API_KEY}).status_code == 200
    assert client.get(path, params={"api_key": API_KEY}).json()[0] == {"Collection": MR_BRAIN}
