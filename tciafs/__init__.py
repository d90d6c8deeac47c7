"""tciafs: The Cancer Imaging Archive as a read-only filesystem."""

__version__ = "0.1.0"
