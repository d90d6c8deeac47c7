"""The NCI Imaging Data Commons (IDC): public DICOM in S3 buckets, and its catalog.

`IdcSource` is what the rest of tciafs uses (through tciafs.sources.build("idc")): the
tree from the pinned catalog (catalog.py), files from the buckets. Below it, the S3
client: anonymous listings with exact sizes (`S3Client.list_objects`), ranged reads
(`S3Client.open`), HEAD, and S3's errors as the source boundary's. docs/idc.md has the
facts it relies on.
"""

from .http import RetryPolicy, S3Stats
from .s3 import AWS_ENDPOINT, ObjectHead, ObjectStream, RangeNotSatisfiable, S3Client
from .s3xml import ListPage, S3Object
from .source import IdcSource, build, leaf_name

__all__ = [
    "AWS_ENDPOINT",
    "IdcSource",
    "ListPage",
    "ObjectHead",
    "ObjectStream",
    "RangeNotSatisfiable",
    "RetryPolicy",
    "S3Client",
    "S3Object",
    "S3Stats",
    "build",
    "leaf_name",
]
