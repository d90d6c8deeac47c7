"""The public services tciafs mounts unless told otherwise; a module of its own, so that
the light commands (`tciafs login`) can name them without loading the daemon."""

DEFAULT_SERVER = "https://services.cancerimagingarchive.net"
DEFAULT_NLST_SERVER = "https://nlst.cancerimagingarchive.net"

# Connections to the service, polite to TCIA (docs/connections.md): the official Python
# client downloads ten series at once, each on its own connection; tciafs stays below it.
MAX_CONNECTIONS = 8  # requests at once, per mount
SERIES_CONNECTIONS = 4  # connections one series may use at once (its ZIP and singles)
