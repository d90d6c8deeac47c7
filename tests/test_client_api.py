"""Per-generation request spellings and response parsing, from literal wire bodies.

The bodies have the shapes the services answer with (recorded v1 output, the v4
getSeries sample, Jettison's `{}` rows and dropped NULL keys).
"""

from __future__ import annotations

import datetime
import json

import httpx
import pytest

from tciafs.sources.base import Collection, MalformedResponse
from tciafs.sources.nbia import api

pytestmark = pytest.mark.unit

V4, V2, V1, LEGACY = (api.generation(n) for n in ("v4", "v2", "v1", "legacy"))

V1_SERIES_BODY = json.dumps([
    {"SeriesInstanceUID": "1.3.6.1.4.1.9328.50.1.48441840081578419409180519840073808100",
     "StudyInstanceUID": "1.3.6.1.4.1.9328.50.1.216116555221814778114703363464001196508",
     "Modality": "CT", "BodyPartExamined": "CHEST", "SeriesNumber": 8,
     "Collection": "RIDER Lung CT", "PatientID": "RIDER-1129164940", "ImageCount": 213,
     "TimeStamp": "2011-11-08 08:08:01.0"},
    {"SeriesInstanceUID": "1.2.276.0.7230010.3.1.3.0.8180.1415310847.593766",
     "StudyInstanceUID": "1.3.6.1.4.1.9328.50.1.216116555221814778114703363464001196508",
     "Modality": "SEG", "SeriesDate": "2014-11-06 00:00:00.0",
     "SeriesDescription": "QIN CT challenge: alg01 run1segmentation result",
     "SeriesNumber": 1000, "Collection": "RIDER Lung CT", "PatientID": "RIDER-1129164940",
     "Manufacturer": "3D Slicer Community",
     "ManufacturerModelName": "https://github.com/fedorov/Reporting",
     "SoftwareVersions": "Slicer 4.3.1-2014-09-09 r23663 Reporting 56c71a2",
     "ImageCount": 1, "TimeStamp": "2014-12-19 17:59:20.0", "FileSize": 27844690,
     "CollectionURI": "https://doi.org/10.7937/K9/TCIA.2015.U1X8A5NR"},
]).encode()

V4_SERIES_BODY = json.dumps([{
    "SeriesInstanceUID": "1.3.6.1.4.1.14519.5.2.1.2135.6389.861085683843003228352649673146",
    "StudyInstanceUID": "1.3.6.1.4.1.14519.5.2.1.2135.6389.101337736148606617569659173510",
    "Modality": "MG", "SeriesDescription": "DBT slices", "BodyPartExamined": "BREAST",
    "SeriesNumber": 1.5, "Collection": "VICTRE", "Site": "FDA", "PatientID": "1215936303",
    "PatientSex": "F", "Manufacturer": "VICTRE", "ImageCount": 57,
    "MaxSubmissionTimestamp": "02-25-2019",
    "LicenseName": "Creative Commons Attribution 3.0 Unported License",
    "LicenseURI": "http://creativecommons.org/licenses/by/3.0/",
    "DataDescriptionURI": "https://doi.org/10.7937/TCIA.2019.ho23nxaw",
    "FileSize": 165975906, "ReleasedStatus": "Yes", "DateReleased": "03-08-2019",
    "StudyDesc": "DBT Reconstructed Volume", "StudyDate": "01-06-2018", "Authorized": 1,
}]).encode()


def test_request_spellings_per_generation() -> None:
    req = api.series_request(V4, "LIDC-IDRI", "LIDC-IDRI-0001", None)
    assert (req.endpoint, req.params) == (
        "getSeries", {"Collection": "LIDC-IDRI", "PatientID": "LIDC-IDRI-0001"})
    # getPatient alone says PatientId; every other endpoint PatientID.
    assert api.patients_request(V4, "C", "P").params == {"Collection": "C", "PatientId": "P"}
    assert api.studies_request(V2, "C", "P").params == {"Collection": "C", "PatientID": "P"}
    assert api.instance_uids_request(V1, "1.2").params == {"SeriesInstanceUID": "1.2"}
    # Legacy Bindaas wants format=json on listings, and not on binary endpoints.
    assert api.series_size_request(LEGACY, "1.2").params == {
        "SeriesInstanceUID": "1.2", "format": "json"}
    assert api.single_image_request(LEGACY, "1.2", "1.3").params == {
        "SeriesInstanceUID": "1.2", "SOPInstanceUID": "1.3"}
    assert api.collections_request(V4).params == {}


def test_series_zip_request_per_generation() -> None:
    v4 = api.series_zip_request(V4, "1.2", md5=True)
    assert (v4.endpoint, v4.params) == ("getImage", {"SeriesInstanceUID": "1.2",
                                                      "IncludeMD5": "Yes"})
    assert api.series_zip_request(V4, "1.2", md5=False).params == {"SeriesInstanceUID": "1.2"}
    for gen in (V2, V1):
        assert api.series_zip_request(gen, "1.2", md5=True).endpoint == "getImageWithMD5Hash"
        assert api.series_zip_request(gen, "1.2", md5=False).endpoint == "getImage"
    legacy = api.series_zip_request(LEGACY, "1.2", md5=True)
    assert (legacy.endpoint, legacy.params) == ("getImage", {"SeriesInstanceUID": "1.2"})


def test_base_paths() -> None:
    assert V4.base_path() == "/nbia-api/services/v4/"
    assert V2.base_path("ignored") == "/nbia-api/services/v2/"
    assert LEGACY.base_path() == "/services/v4/TCIA/query/"
    assert LEGACY.base_path("some-key") == "/services/v3/TCIA/query/"
    with pytest.raises(ValueError, match="unknown API generation"):
        api.generation("v3")


def test_v1_series_rows() -> None:
    rows = api.parse_rows(V1_SERIES_BODY, "getSeries")
    first, seg = (api.parse_series(r, V1, "RIDER Lung CT", "getSeries") for r in rows)
    assert first is not None and seg is not None
    assert first.series_number == 8.0 and first.image_count == 213
    assert first.submission_date == datetime.date(2011, 11, 8)
    assert first.series_date is None and first.manufacturer is None  # absent = NULL
    assert seg.series_date == datetime.date(2014, 11, 6)
    assert seg.file_size == 27844690
    assert seg.data_description_uri == "https://doi.org/10.7937/K9/TCIA.2015.U1X8A5NR"
    assert seg.patient_id == "RIDER-1129164940" and seg.modality == "SEG"


def test_v4_series_row() -> None:
    (row,) = api.parse_rows(V4_SERIES_BODY, "getSeries")
    series = api.parse_series(row, V4, "VICTRE", "getSeries")
    assert series is not None
    assert series.date_released == datetime.date(2019, 3, 8)
    assert series.study_date == datetime.date(2018, 1, 6)
    assert series.submission_date == datetime.date(2019, 2, 25)
    assert series.data_description_uri == "https://doi.org/10.7937/TCIA.2019.ho23nxaw"
    assert series.study_description == "DBT Reconstructed Volume"
    assert series.file_size == 165975906 and series.series_number == 1.5
    assert series.license_uri == "http://creativecommons.org/licenses/by/3.0/"


def test_patient_and_study_rows() -> None:
    patient_row = {"PatientId": "Mass-Training_P_01009_RIGHT_CC_1",
                   "PatientName": "Mass-Training_P_01009_RIGHT_CC_1", "Collection": "CBIS-DDSM",
                   "Phantom": "NO", "SpeciesCode": "337915000",
                   "SpeciesDescription": "Homo sapiens"}
    patient = api.parse_patient(patient_row, "cbis-ddsm", "getPatient")
    assert patient is not None
    assert patient.patient_id == "Mass-Training_P_01009_RIGHT_CC_1"
    assert patient.collection == "CBIS-DDSM"  # the server's spelling wins
    assert patient.patient_sex is None and patient.phantom == "NO"
    # legacy Bindaas spells it PatientID
    legacy = api.parse_patient({"PatientID": "X-1", "Collection": "C"}, "C", "getPatient")
    assert legacy is not None and legacy.patient_id == "X-1"

    study_row = {"StudyInstanceUID": "1.3.6.1.4.1.9590.100.1.2.2293611427107681384116",
                 "StudyDate": "2016-07-21 00:00:00.0", "StudyID": "DDSM",
                 "PatientID": "Mass-Training_P_01009_RIGHT_CC_1", "Collection": "CBIS-DDSM",
                 "SeriesCount": 1, "PatientAge": "065Y"}
    study = api.parse_study(study_row, V1, "CBIS-DDSM", None, "getPatientStudy")
    assert study is not None
    assert study.study_date == datetime.date(2016, 7, 21)
    assert (study.series_count, study.study_id, study.patient_age) == (1, "DDSM", "065Y")
    v4_study = api.parse_study({**study_row, "StudyDate": "07-21-2016"}, V4, "C", None, "s")
    assert v4_study is not None and v4_study.study_date == datetime.date(2016, 7, 21)


def test_rows_without_keys_are_skipped_not_fatal() -> None:
    assert api.parse_study({"StudyDate": "2016-07-21 00:00:00.0"}, V1, "C", None, "s") is None
    assert api.parse_series({"SeriesInstanceUID": "1.2"}, V4, "C", "s") is None
    assert api.parse_patient({"PatientName": "nobody"}, "C", "p") is None


def test_collections_empty_rows_and_duplicates() -> None:
    body = (b'[{}, {"Collection":"4D-Lung"}, {"Collection":"APOLLO-5-LSCC"}, '
            b'{"Collection":"4D-Lung"}]')
    rows = api.parse_rows(body, "getCollectionValues")
    assert api.parse_collections(rows, "nlst", "x") == [
        Collection("4D-Lung", "nlst"), Collection("APOLLO-5-LSCC", "nlst")]


def test_series_size_numbers_and_legacy_strings() -> None:
    assert api.parse_series_size(
        api.parse_rows(b'[{"TotalSizeInBytes":27844690,"ObjectCount":1}]', "s")) == (27844690, 1)
    assert api.parse_series_size(
        api.parse_rows(b'[{"TotalSizeInBytes":"6309504.0","ObjectCount":"12"}]', "s")
    ) == (6309504, 12)
    # v1's aggregate row of NULLs for an unknown series, and v4's empty body
    assert api.parse_series_size(api.parse_rows(b"[{}]", "s")) is None
    assert api.parse_series_size(api.parse_rows(b"", "s")) is None


def test_numbers_given_as_strings_and_garbage() -> None:
    row = {"SeriesInstanceUID": "1", "StudyInstanceUID": "2", "PatientID": "3",
           "SeriesNumber": "1.000000", "ImageCount": "57", "FileSize": "not a number",
           "SeriesDate": "yesterday"}
    series = api.parse_series(row, V4, "C", "s")
    assert series is not None
    assert series.series_number == 1.0 and series.image_count == 57
    assert series.file_size is None and series.series_date is None


@pytest.mark.parametrize("value, expected", [
    ("03-08-2019", datetime.date(2019, 3, 8)),
    ("2011-11-08 08:08:01.0", datetime.date(2011, 11, 8)),
    ("2014-11-06", datetime.date(2014, 11, 6)),
    ("", None), (None, None), (20190308, None), ("13-45-2019", None),
])
def test_dates(value: object, expected: datetime.date | None) -> None:
    assert api.parse_date(value) == expected
    assert api.parse_date(value, v4_first=False) == expected


def test_empty_body_is_empty_list() -> None:
    assert api.parse_rows(b"", "getSeries") == []
    assert api.parse_rows(b"  \n", "getSeries") == []
    assert api.parse_rows(b"[]", "getSeries") == []


@pytest.mark.parametrize("body, message", [
    (b"<html><body>Service Unavailable</body></html>", "got HTML"),
    (b'<?xml version="1.0"?><Results><Row/></Results>', "got XML"),
    (b'{"Collection": "x"}', "list of objects, got dict"),
    (b'["4D-Lung", "LIDC-IDRI"]', "found a str"),
    (b"Server was not able to process your request", "expected JSON"),
    (b'[{"Collection": "x"}', "expected JSON"),
    (b"\xff\xfe\x00garbage", "expected JSON"),
])
def test_malformed_bodies(body: bytes, message: str) -> None:
    with pytest.raises(MalformedResponse, match=message) as info:
        api.parse_rows(body, "v4 getSeries(Collection='X') on main")
    assert "getSeries" in str(info.value)


def test_wrong_type_for_a_key_field() -> None:
    with pytest.raises(MalformedResponse, match="SeriesInstanceUID is a list"):
        api.parse_series({"SeriesInstanceUID": ["1"], "StudyInstanceUID": "2",
                          "PatientID": "3"}, V4, "C", "getSeries")


def test_not_authorised_texts() -> None:
    assert api.is_not_authorised_text(
        "The user has not been granted the access to image with given SeriesInstanceUID,1.2. "
        "Please contact System Admin to resolve this issue.")
    assert api.is_not_authorised_text(
        "Image with given SeriesInstanceUID,1.2, is not in public domain.")
    assert not api.is_not_authorised_text("A parameter, SeriesInstanceUID is required")


# -- canonical requests: one URL per question, so a site cache shares the answers ----------

def _url(request: api.Request, gen: api.Generation) -> str:
    # As the transport sends it: httpx keeps the parameters in the order given.
    return str(httpx.URL("http://cache:8080" + gen.base_path() + request.endpoint,
                         params=request.params))


def test_every_request_is_spelled_one_way() -> None:
    """A shared site cache keys its entries by the URL, query string in the order sent
    (docs/cluster.md): the same question must always be the same URL, on every node."""
    v4 = api.generation("v4")
    root = "http://cache:8080/nbia-api/services/v4/"
    assert [_url(r, v4) for r in (
        api.collections_request(v4),
        api.patients_request(v4, "Demo-Lung CT_2024"),
        api.studies_request(v4, "Demo-Lung CT_2024", "LUNG/003"),
        api.series_request(v4, "Demo-Lung CT_2024", "P1", "1.2.3"),
        api.instance_uids_request(v4, "1.2.3.4"),
        api.single_image_request(v4, "1.2.3.4", "1.2.3.4.5"),
        api.series_zip_request(v4, "1.2.3.4", True),
    )] == [
        root + "getCollectionValues",
        root + "getPatient?Collection=Demo-Lung+CT_2024",
        root + "getPatientStudy?Collection=Demo-Lung+CT_2024&PatientID=LUNG%2F003",
        root + "getSeries?Collection=Demo-Lung+CT_2024&PatientID=P1&StudyInstanceUID=1.2.3",
        root + "getSOPInstanceUIDs?SeriesInstanceUID=1.2.3.4",
        root + "getSingleImage?SeriesInstanceUID=1.2.3.4&SOPInstanceUID=1.2.3.4.5",
        root + "getImage?SeriesInstanceUID=1.2.3.4&IncludeMD5=Yes",
    ]
