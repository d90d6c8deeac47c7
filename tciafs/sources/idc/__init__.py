"""The NCI Imaging Data Commons (IDC): public DICOM in S3 buckets, and its catalog.

So far this package holds the S3 client the IDC source will read through: anonymous
listings with exact sizes (`S3Client.list_objects`), ranged reads (`S3Client.open`),
HEAD, and S3's errors as the source boundary's. docs/idc.md has the facts it relies on.
"""

from .http import RetryPolicy, S3Stats
from .s3 import AWS_ENDPOINT, ObjectHead, ObjectStream, RangeNotSatisfiable, S3Client
from .s3xml import ListPage, S3Object

__all__ = [
    "AWS_ENDPOINT",
    "ListPage",
    "ObjectHead",
    "ObjectStream",
    "RangeNotSatisfiable",
    "RetryPolicy",
    "S3Client",
    "S3Object",
    "S3Stats",
]
