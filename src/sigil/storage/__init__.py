"""Storage: the content-addressed blob store, the index, eviction and fsck.

The embedded implementations (:class:`BlobStore` on a filesystem, :class:`Index` on SQLite)
and the async contracts a replica needs (:class:`ObjectStore`, :class:`AsyncIndex`,
:class:`FetchLeases`, :class:`GcLease`), with adapters of the embedded classes to them. The
fleet implementations (``sigil.storage.s3``, ``sigil.storage.pgindex``) are not imported here:
they need the ``fleet`` extra; :func:`open_backends` imports them when configured.
"""

from sigil.storage.backends import Backends, open_backends
from sigil.storage.blobs import BlobStore, ObjectInfo, StagingFile
from sigil.storage.contracts import (
    AsyncIndex,
    FilesystemObjectStore,
    GcLease,
    ObjectReader,
    ObjectStore,
    PendingUpload,
    SqliteAsyncIndex,
    UploadSession,
)
from sigil.storage.gc import FsckReport, GcStats, collect, fsck
from sigil.storage.index import Index, ManifestRow, TagRow, VerdictRow
from sigil.storage.lease import FetchLeases, LeaseInfo
from sigil.storage.lease_sqlite import SqliteFetchLeases

__all__ = ["AsyncIndex", "Backends", "BlobStore", "FetchLeases", "FilesystemObjectStore",
           "FsckReport", "GcLease", "GcStats", "Index", "LeaseInfo", "ManifestRow",
           "ObjectInfo", "ObjectReader", "ObjectStore", "PendingUpload", "SqliteAsyncIndex",
           "SqliteFetchLeases", "StagingFile", "TagRow", "UploadSession", "VerdictRow", "collect",
           "fsck", "open_backends"]
