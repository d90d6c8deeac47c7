"""The public services tciafs mounts unless told otherwise; a module of its own, so that
the light commands (`tciafs login`) can name them without loading the daemon."""

DEFAULT_SERVER = "https://services.cancerimagingarchive.net"
DEFAULT_NLST_SERVER = "https://nlst.cancerimagingarchive.net"
