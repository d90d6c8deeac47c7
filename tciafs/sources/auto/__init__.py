"""`--source auto`: NBIA's tree, with the bytes of each series IDC also holds read from
IDC's buckets, and NBIA's getImage and getSingleImage for everything else.

`AutoSource` (source.py) is what the rest of tciafs uses, through
tciafs.sources.build("auto"); mapping.py keeps which object holds which instance,
streams.py hands IDC's objects to the cache, checked. docs/auto.md tells the rules.
"""

from .mapping import MappedObject, ObjectMap, sop_of
from .source import AutoSource, build

__all__ = ["AutoSource", "MappedObject", "ObjectMap", "build", "sop_of"]
