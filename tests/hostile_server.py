"""A tiny NBIA-like v4 server on loopback whose every reply can be made hostile.

stdlib `http.server` in a thread. Replies are looked up by endpoint and key parameter
(`Collection` for getPatient/getSeries/getPatientStudy, `SeriesInstanceUID` for
getSOPInstanceUIDs/getImage, `SOPInstanceUID` for getSingleImage, "" for
getCollectionValues); a reply is a `Reply` or a callable that makes one per request, so a
case can be switched on, off or changed at run time with `set()`. Anything not set
answers like NBIA does for "nothing there": an empty JSON list for listings, a 500 with
an empty body for getSingleImage, a 404 for getImage.

`add_collection()` fills the routes of a small, well-formed collection with real DICOM
bytes (pydicom), so that hostile cases sit next to good ones in the same tree.
"""

from __future__ import annotations

import io
import json
import socket
import struct
import threading
import time
import urllib.parse
import zipfile
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from dicomutil import dicom_bytes

PREFIX = "/nbia-api/services/v4/"
KEYS = {"getCollectionValues": None, "getPatient": "Collection", "getSeries": "Collection",
        "getPatientStudy": "Collection", "getSOPInstanceUIDs": "SeriesInstanceUID",
        "getImage": "SeriesInstanceUID", "getSingleImage": "SOPInstanceUID"}
LISTINGS = {"getCollectionValues", "getPatient", "getSeries", "getPatientStudy",
            "getSOPInstanceUIDs"}


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    cut_after: int | None = None  # send this many body bytes, then reset the connection
    stall_after: int | None = None  # send this many body bytes, then wait ...
    stall_seconds: float = 0.0  # ... this long before sending the rest


def json_reply(value: object, status: int = 200) -> Reply:
    return Reply(status, json.dumps(value).encode())


def html_reply(title: str = "503 Service Temporarily Unavailable", status: int = 200) -> Reply:
    page = (f"<!DOCTYPE html>\n<html><head><title>{title}</title></head><body><center>"
            f"<h1>{title}</h1></center><hr><center>nginx</center></body></html>\n")
    return Reply(status, page.encode(), "text/html; charset=utf-8")


Route = Reply | Callable[[Mapping[str, str]], Reply]
Tree = Mapping[str, Mapping[str, Mapping[str, list[str]]]]  # patient → study → series → SOPs


class HostileServer:
    """Start with `with HostileServer() as server:`; `server.url` is the root URL."""

    nlst_url = None  # mountutil.mounted() passes --nlst-server only when this is set

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.routes: dict[tuple[str, str], Route] = {}
        self.requests: Counter[str] = Counter()  # by endpoint
        self.keyed: Counter[tuple[str, str]] = Counter()  # by (endpoint, key)
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer((host, port), _handler_for(self))
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None
        self.url = f"http://{host}:{self._httpd.server_address[1]}"

    # -- content ---------------------------------------------------------------------------

    def set(self, endpoint: str, key: str, reply: Route) -> None:
        with self._lock:
            self.routes[(endpoint, key)] = reply

    def collections(self, names: list[str]) -> None:
        self.set("getCollectionValues", "", json_reply([{"Collection": n} for n in names]))

    def add_collection(self, collection: str, tree: Tree) -> dict[str, bytes]:
        """Serve {patient: {study: {series: [sop, ...]}}} well-formed; returns bytes by SOP."""
        patients, series_rows, images = [], [], {}
        for patient, studies in tree.items():
            patients.append({"PatientId": patient, "Collection": collection,
                             "PatientSex": "O"})
            for study, serieses in studies.items():
                for series, sops in serieses.items():
                    series_rows.append(series_row(collection, patient, study, series,
                                                  len(sops)))
                    self.set("getSOPInstanceUIDs", series,
                             json_reply([{"SOPInstanceUID": s} for s in sops]))
                    for sop in sops:
                        images[sop] = dicom_bytes(sop, series, study, patient)
                        self.set("getSingleImage", sop, dicom_reply(images[sop]))
        self.set("getPatient", collection, json_reply(patients))
        self.set("getSeries", collection, json_reply(series_rows))
        return images

    # -- statistics ------------------------------------------------------------------------

    def count(self, *endpoints: str) -> int:
        with self._lock:
            if not endpoints:
                return sum(self.requests.values())
            return sum(self.requests[e] for e in endpoints)

    def count_key(self, endpoint: str, key: str) -> int:
        with self._lock:
            return self.keyed[(endpoint, key)]

    # -- life ------------------------------------------------------------------------------

    def start(self) -> HostileServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> HostileServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _route(self, endpoint: str, params: Mapping[str, str]) -> Reply:
        name = KEYS.get(endpoint, "")
        key = params.get(name, "") if name else ""
        with self._lock:
            self.requests[endpoint] += 1
            self.keyed[(endpoint, key)] += 1
            route = self.routes.get((endpoint, key))
        if route is None:
            if endpoint not in KEYS:
                return Reply(404, b"Not Found", "text/plain")
            if endpoint in LISTINGS:
                return json_reply([])
            if endpoint == "getSingleImage":
                return Reply(500, b"", "text/plain")
            return Reply(404, b"Not Found", "text/plain")
        return route(params) if callable(route) else route


def series_row(collection: str, patient: object, study: str, series: str,
               count: int) -> dict[str, object]:
    return {"SeriesInstanceUID": series, "StudyInstanceUID": study, "Modality": "CT",
            "SeriesDescription": "hostile", "Collection": collection, "PatientID": patient,
            "ImageCount": count, "SeriesNumber": 1, "SeriesDate": "01-02-2020",
            "LicenseName": "CC BY 4.0"}


def dicom_reply(data: bytes) -> Reply:
    return Reply(200, data, "application/dicom")


def zip_bytes(entries: Mapping[str, bytes]) -> bytes:
    """A series ZIP as NBIA sends it, entries STORED (no MD5 list)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return out.getvalue()


def once_then(first: Reply, then: Reply) -> Callable[[Mapping[str, str]], Reply]:
    """The first request gets `first`, every later one `then`."""
    served = []

    def route(_params: Mapping[str, str]) -> Reply:
        served.append(1)
        return first if len(served) == 1 else then

    return route


def _handler_for(server: HostileServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            url = urllib.parse.urlsplit(self.path)
            params = {k: v[0] for k, v in urllib.parse.parse_qs(url.query,
                                                                 keep_blank_values=True).items()}
            if not url.path.startswith(PREFIX):
                reply = Reply(404, b"Not Found", "text/plain")
            else:
                reply = server._route(url.path[len(PREFIX):], params)
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            self.send_header("Content-Length", str(len(reply.body)))
            for name, value in reply.headers:
                self.send_header(name, value)
            self.end_headers()
            if reply.stall_after is not None:
                self.wfile.write(reply.body[:reply.stall_after])
                self.wfile.flush()
                time.sleep(reply.stall_seconds)
                self.wfile.write(reply.body[reply.stall_after:])
                return
            if reply.cut_after is None:
                self.wfile.write(reply.body)
                return
            self.wfile.write(reply.body[:reply.cut_after])
            self.wfile.flush()
            # RST instead of FIN: the peer sees a reset in the middle of the body.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
            self.close_connection = True

    return Handler
