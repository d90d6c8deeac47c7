"""The site cache on loopback: a real nginx running the repository's
contrib/nginx/tciafs-site-cache.conf, as tests/test_site_cache.py and figure 11 use it.

Only the config's lines marked "SITE:" (listen address, upstream URLs, cache directory,
log file, CA bundle) are rewritten. A small main config around it gives nginx what
Debian's /etc/nginx/nginx.conf gives it at a site (pid file, error log, temp paths), all
under a directory of its own, so that any number of these can run side by side.

This module needs nothing but the standard library: the test suite imports it with
`scripts/` on sys.path, as it imports the rest of benchlib.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

CONFIG = Path(__file__).resolve().parents[2] / "contrib" / "nginx" / "tciafs-site-cache.conf"
# Debian puts nginx in /usr/sbin, which a user's PATH often lacks.
NGINX = shutil.which("nginx", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
SYSTEM_CAS = "/etc/ssl/certs/ca-certificates.crt"


class NginxError(RuntimeError):
    """nginx is missing, did not start, or the config lost a line this module rewrites."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def render_site_config(upstream: str, nlst_upstream: str, port: int, cache_dir: Path,
                       access_log: Path, ca_bundle: str = SYSTEM_CAS) -> str:
    """The repository's config with its SITE: values replaced, and nothing else."""
    site_values = {
        SYSTEM_CAS: ca_bundle,
        "listen 8080;": f"listen 127.0.0.1:{port};",
        "https://services.cancerimagingarchive.net": upstream,
        "https://nlst.cancerimagingarchive.net": nlst_upstream,
        "/var/cache/nginx/tciafs ": f"{cache_dir} ",
        "/var/log/nginx/tciafs-cache.log": str(access_log),
    }
    used: Counter[str] = Counter()
    lines = []
    for line in CONFIG.read_text().splitlines(keepends=True):
        if "# SITE:" in line:
            for old, new in site_values.items():
                if old in line.split("#", 1)[0]:
                    line = line.replace(old, new, 1)
                    used[old] += 1
        lines.append(line)
    missing = set(site_values) - set(used)
    if missing:
        raise NginxError(f"{CONFIG.name} no longer has these SITE: values: {missing}")
    return "".join(lines)


@dataclass
class Nginx:
    """One nginx master run in the foreground, with everything of its own under `root`."""

    root: Path
    ports: tuple[int, ...]
    proc: subprocess.Popen | None = None

    def configure(self, http_text: str) -> None:
        """nginx.conf around `http_text`, as Debian's /etc/nginx/nginx.conf is at a site."""
        temp = self.root / "temp"
        temp.mkdir(parents=True, exist_ok=True)
        site = self.root / "site.conf"
        site.write_text(http_text)
        # As root, workers would run as "nobody", who cannot enter a 0700 temporary
        # directory (pytest's, the benchmark's).
        user = "user root;\n" if os.geteuid() == 0 else ""
        (self.root / "nginx.conf").write_text(
            f"{user}worker_processes 2;\npid {self.root}/nginx.pid;\n"
            f"error_log {self.root}/error.log info;\n"
            "events { worker_connections 512; }\n"
            "http {\n"
            + "".join(f"    {kind}_temp_path {temp}/{kind};\n"
                      for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
            + f"    include {site};\n}}\n")

    def start(self) -> None:
        if NGINX is None:
            raise NginxError("nginx is not installed (scripts/setup installs it)")
        if self.proc is not None:
            raise NginxError("this nginx is running already")
        self.proc = subprocess.Popen(
            [NGINX, "-c", str(self.root / "nginx.conf"), "-p", str(self.root),
             "-e", str(self.root / "error.log"), "-g", "daemon off;"],
            stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not all(_listening(port) for port in self.ports):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise NginxError(f"nginx did not start:\n{self.error_log()}")
            time.sleep(0.02)

    def stop(self) -> None:
        """Fast shutdown, as `nginx -s stop`: open connections are closed at once."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def error_log(self) -> str:
        path = self.root / "error.log"
        return path.read_text() if path.exists() else ""


class SiteCache(Nginx):
    """The repository's config in front of `upstream`; `url` and `nlst_url` are what the
    nodes are given as --server and --nlst-server."""

    def __init__(self, root: Path, upstream: str, nlst_upstream: str,
                 ca_bundle: str = SYSTEM_CAS) -> None:
        super().__init__(root, (free_port(),))
        self.cache_dir.mkdir(parents=True)
        self.configure(render_site_config(upstream, nlst_upstream, self.port, self.cache_dir,
                                          self.access_log, ca_bundle))

    @property
    def port(self) -> int:
        return self.ports[0]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def nlst_url(self) -> str:
        return f"{self.url}/nlst"

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    @property
    def access_log(self) -> Path:
        return self.root / "access.log"

    def log(self) -> list[LogLine]:
        """The access log, one entry per request nginx answered."""
        if not self.access_log.exists():
            return []
        return [parsed for line in self.access_log.read_text().splitlines()
                if (parsed := LogLine.parse(line)) is not None]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


LOG_RE = re.compile(r'^\S+ \S+ "(?P<method>\S+) (?P<uri>\S+) [^"]*" '
                    r'(?P<status>\d+) (?P<bytes>\d+) cache=(?P<cache>\S+) ')


@dataclass(frozen=True)
class LogLine:
    """One line of the config's `tciafs_cache` access log format."""

    method: str
    uri: str  # as the node sent it: /nlst/... for the NLST host
    status: int
    body_bytes: int  # what nginx sent the node
    cache: str  # HIT, MISS, BYPASS, EXPIRED, ... or "-" when the cache was not asked

    @classmethod
    def parse(cls, line: str) -> LogLine | None:
        m = LOG_RE.match(line)
        if m is None:
            return None
        return cls(m["method"], m["uri"], int(m["status"]), int(m["bytes"]), m["cache"])

    @property
    def endpoint(self) -> str:
        return self.uri.split("?", 1)[0].rsplit("/", 1)[-1]

    @property
    def upstream(self) -> bool:
        """Whether this request was passed to the service."""
        return self.cache in ("MISS", "EXPIRED", "BYPASS", "-")
