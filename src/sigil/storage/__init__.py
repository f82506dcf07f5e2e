"""Local storage: the content-addressed blob store, the SQLite index, eviction and fsck.

Kept behind two small classes (:class:`BlobStore`, :class:`Index`) so that a shared bucket and a
shared database can be added as second implementations when sigil runs as several replicas.
"""

from sigil.storage.blobs import BlobStore, ObjectInfo, StagingFile
from sigil.storage.gc import FsckReport, GcStats, collect, fsck
from sigil.storage.index import Index, ManifestRow, TagRow, VerdictRow

__all__ = ["BlobStore", "FsckReport", "GcStats", "Index", "ManifestRow", "ObjectInfo",
           "StagingFile", "TagRow", "VerdictRow", "collect", "fsck"]
