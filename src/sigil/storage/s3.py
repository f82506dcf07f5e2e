"""Objects on S3-compatible storage (``storage.backend: s3``): AWS S3, MinIO, Ceph RGW, SeaweedFS.

Client: aiobotocore, the asyncio port of botocore. It speaks every S3 dialect botocore does
(SigV4, path or virtual-host addressing, checksums, presigned URLs), reuses botocore's retry
policies and credential handling, and runs on aiohttp, which sigil already uses. The other
async choices are thinner (``aioboto3`` is a convenience layer over aiobotocore; ``s3fs``/
``obstore`` add file-system or Rust layers sigil does not need; hand-signing requests on
aiohttp would re-implement SigV4 and each server's quirks).

Layout in the bucket, every key built from a validated :class:`~sigil.oci.digest.Digest`::

    <prefix>blobs/sha256/<2 hex>/<64 hex>   committed content (manifests are blobs too)
    <prefix>quarantine/<64 hex>             objects fsck found corrupt

Writes (:class:`S3Upload`) stream: bytes are hashed as they come (or, when the caller already
hashes exactly the bytes it writes, vouched for by it: :meth:`S3Upload.hash_by_caller`; the
download's scratch feeder does, so a cold blob is hashed once) and cut into parts of
``part_size`` (8 MiB by default) held in memory: ``upload_concurrency`` parts uploading (2 by
default: on loopback SeaweedFS one part in flight left both processes waiting on each other,
two gave about +30 %; a caller may ask for fewer for a while, :meth:`S3Upload.limit_inflight`)
and one filling, never the whole blob and never on local disk. A write of exactly one part
into an empty buffer is sent as it is, without a copy. Peak
memory per upload is ``(2 x upload_concurrency + 1) x part_size`` (aiohttp holds a copy of a
part while sending it), 40 MiB with the defaults. A blob smaller than one part is sent as
a single PUT at commit. A larger one is a multipart upload *to its final key*, and the commit is
``CompleteMultipartUpload``, issued only after the sha256 of everything written matched: in S3
an incomplete multipart upload is invisible under its key, so nothing unverified is ever
readable, and, unlike uploading to a staging key and copying, the commit costs no second copy of
the data on the server (a server-side copy of a 256 MiB object is a full read and write, and one
above 5 GiB needs a multipart copy of its own). On a mismatch the upload is aborted. Each part
is sent with a checksum botocore computes, so what the server keeps is what was hashed.
Two writers committing the same digest both succeed; the bytes are equal by construction.

An upload abandoned by a replica that died stays pending in the bucket:
:meth:`S3ObjectStore.cleanup_abandoned` aborts the ones older than a bound (start-up and gc).

Failures: throttling and server errors (500, 503, ``SlowDown``) are retried by botocore's
``standard`` retry mode (exponential backoff with jitter, ``max_attempts`` tries); what still
fails becomes :class:`~sigil.errors.Unavailable`, a missing object
:class:`~sigil.errors.BlobUnknown`. Refused credentials at start-up raise
:class:`~sigil.errors.StorageError` naming the config keys they came from, never the secret.
No botocore or aiohttp exception leaves this module.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from sigil.config import S3Config
from sigil.errors import BlobUnknown, DigestInvalid, RangeInvalid, StorageError, Unavailable
from sigil.logs import get_logger
from sigil.oci.digest import Digest
from sigil.storage.blobs import ObjectInfo
from sigil.storage.contracts import READ_CHUNK, PendingUpload, check_range, check_vouch

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

log = get_logger("sigil.storage.s3")

MIN_PART_SIZE = 5 * 1024 * 1024  # S3's floor for every part but the last
_HEX64 = re.compile(r"[a-f0-9]{64}")
_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_CREDENTIALS_REFUSED = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403",
                        "InvalidToken", "ExpiredToken", "InvalidClientTokenId"}
_S3_ERRORS: tuple[type[BaseException], ...] = (ClientError, BotoCoreError, aiohttp.ClientError,
                                               asyncio.TimeoutError, OSError)


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


class _Translate:
    """Turns client errors into sigil's: one place, so every call site agrees."""

    def __init__(self, settings: S3Config) -> None:
        self.settings = settings

    @contextmanager
    def __call__(self, what: str, digest: Digest | None = None) -> Iterator[None]:
        try:
            yield
        except ClientError as exc:
            code = _code(exc)
            if code in _NOT_FOUND and digest is not None:
                raise BlobUnknown(detail={"digest": str(digest)}) from exc
            if code == "InvalidRange":
                raise RangeInvalid() from exc
            if code in _CREDENTIALS_REFUSED:
                raise Unavailable(f"object storage refused the credentials from "
                                  f"{self.settings.credential_source} ({code}) during {what}"
                                  ) from exc
            raise Unavailable(f"object storage failed during {what}: {code or 'error'}") from exc
        except _S3_ERRORS as exc:
            raise Unavailable(f"object storage unreachable during {what}: "
                              f"{type(exc).__name__}") from exc


class _S3Reader:
    """A ranged GET body, streamed."""

    def __init__(self, body: Any, length: int, total: int, errors: _Translate,
                 digest: Digest) -> None:
        self._body = body
        self.length = length
        self.total = total
        self._errors = errors
        self._digest = digest

    async def __aiter__(self) -> AsyncIterator[bytes]:
        received = 0
        with self._errors("read", self._digest):
            async for chunk in self._body.iter_chunks(READ_CHUNK):
                received += len(chunk)
                yield chunk
        if received != self.length:
            raise Unavailable(f"object storage sent {received} of {self.length} bytes")


class S3Upload:
    """One object being written as described in the module docstring. One writer at a time;
    S3's 10,000-part limit caps an object at 10,000 x ``part_size``."""

    def __init__(self, store: S3ObjectStore, expected: Digest) -> None:
        self._store = store
        self.expected = expected
        self.key = store.key(expected)
        self.size = 0
        self.local_path: Path | None = None
        # None once the caller hashes (hash_by_caller); its vouch then stands in at commit.
        self._hash: hashlib._Hash | None = hashlib.sha256()
        self._vouched: tuple[Digest, int] | None = None
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self._inflight: list[asyncio.Task[dict[str, Any]]] = []
        self._done = False
        self._inflight_limit: int | None = None  # limit_inflight; None: upload_concurrency

    @property
    def upload_id(self) -> str | None:
        """The multipart upload id once one was started (small objects never start one)."""
        return self._upload_id

    @property
    def write_size(self) -> int:
        """One part: a write of exactly this size into an empty buffer is sent as it is."""
        return self._store.settings.part_size

    def hash_by_caller(self) -> None:
        """Skip this session's own sha256: the caller hashes exactly the bytes it writes and
        vouches for them (:meth:`vouch`) before :meth:`commit`, which refuses without it."""
        if self.size or self._done:
            raise StorageError("hash_by_caller after the first write")
        self._hash = None

    def vouch(self, digest: Digest, size: int) -> None:
        """The digest and length the caller computed over exactly the bytes it wrote."""
        self._vouched = (digest, size)

    def limit_inflight(self, parts: int | None) -> None:
        """At most ``parts`` (>= 1, at most ``upload_concurrency``) parts in flight from the
        next part on; None: ``upload_concurrency`` again."""
        if parts is not None:
            parts = max(1, min(parts, self._store.settings.upload_concurrency))
        self._inflight_limit = parts

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Hash (unless the caller does) and buffer ``data``; send each full part (waiting
        while the upload has ``upload_concurrency`` parts in flight)."""
        if self._done:
            raise StorageError("write to a finished upload")
        if self._hash is not None:
            self._hash.update(data)
        self.size += len(data)
        part_size = self._store.settings.part_size
        if not self._buffer and len(data) == part_size and isinstance(data, bytes):
            await self._send(data)  # a whole part, immutable: no copy into the buffer
            return
        self._buffer += data
        while len(self._buffer) >= part_size:
            with memoryview(self._buffer) as view:  # one copy, not two
                part = bytes(view[:part_size])
            del self._buffer[:part_size]
            await self._send(part)

    async def _send(self, part: bytes) -> None:
        # Back-pressure: at most upload_concurrency parts in flight (plus the one filling).
        while len(self._inflight) >= (self._inflight_limit
                                      or self._store.settings.upload_concurrency):
            self._parts.append(await self._inflight.pop(0))
        client, bucket = self._store.client, self._store.settings.bucket
        if self._upload_id is None:
            with self._store.errors("upload start"):
                created = await client.create_multipart_upload(Bucket=bucket, Key=self.key)
            self._upload_id = created["UploadId"]
        number, upload_id = len(self._parts) + len(self._inflight) + 1, self._upload_id

        async def upload() -> dict[str, Any]:
            with self._store.errors("part upload"):
                sent = await client.upload_part(Bucket=bucket, Key=self.key, PartNumber=number,
                                                UploadId=upload_id, Body=part)
            return {"PartNumber": number, "ETag": sent["ETag"]}

        self._inflight.append(asyncio.get_running_loop().create_task(upload()))

    async def _settle(self) -> None:
        """Wait for the parts in flight and record them (re-raising a failure)."""
        while self._inflight:
            self._parts.append(await self._inflight.pop(0))

    async def commit(self) -> None:
        """Publish under :attr:`expected` if the hash (or the caller's vouch) matched; else
        abort (DigestInvalid; StorageError when a caller that hashes did not vouch, or vouched
        for another length than was written)."""
        if self._done:
            raise StorageError("commit of a finished upload")
        try:
            if self._hash is None:
                check_vouch(self._vouched, self.size, self.expected)
            elif (actual := Digest(self._hash.hexdigest())) != self.expected:
                raise DigestInvalid(f"content digest {actual} does not match {self.expected}",
                                    detail={"expected": str(self.expected),
                                            "actual": str(actual)})
        except (StorageError, DigestInvalid):
            await self.abort()
            raise
        client, bucket = self._store.client, self._store.settings.bucket
        try:
            if self._upload_id is None:
                with self._store.errors("put"):
                    await client.put_object(Bucket=bucket, Key=self.key,
                                            Body=bytes(self._buffer))
            else:
                if self._buffer:
                    await self._send(bytes(self._buffer))
                await self._settle()
                with self._store.errors("upload complete"):
                    await client.complete_multipart_upload(
                        Bucket=bucket, Key=self.key, UploadId=self._upload_id,
                        MultipartUpload={"Parts": self._parts})  # type: ignore[typeddict-item]
        except BaseException:
            await self.abort()
            raise
        self._done = True
        self._buffer = bytearray()

    async def abort(self) -> None:
        """Drop the buffered part and abort the multipart upload (best effort: one left
        behind is removed later by cleanup_abandoned). Idempotent."""
        if self._done:
            return
        self._done = True
        self._buffer = bytearray()
        tasks, self._inflight = self._inflight, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._upload_id is not None:
            try:
                with self._store.errors("upload abort"):
                    await self._store.client.abort_multipart_upload(
                        Bucket=self._store.settings.bucket, Key=self.key,
                        UploadId=self._upload_id)
            except Unavailable as exc:
                log.warning("s3.abort_failed", key=self.key, error=str(exc))


class S3ObjectStore:
    """:class:`~sigil.storage.contracts.ObjectStore` on an S3 bucket. Build with :meth:`open`."""

    def __init__(self, settings: S3Config, client: S3Client, stack: AsyncExitStack) -> None:
        self.settings = settings
        self.client = client
        self._stack = stack
        self.errors = _Translate(settings)
        self._blobs = f"{settings.prefix}blobs/sha256/"

    @classmethod
    async def open(cls, settings: S3Config) -> S3ObjectStore:
        """Connect and check the bucket (creating it if ``create_bucket``).

        Raise :class:`StorageError` naming the config key at fault: the credentials' source
        when they are refused, ``storage.s3.bucket`` when it is missing,
        ``storage.s3.endpoint`` when nothing answers."""
        if settings.part_size < MIN_PART_SIZE:
            raise StorageError(f"storage.s3.part_size must be at least {MIN_PART_SIZE} bytes")
        config = AioConfig(
            signature_version="s3v4",
            # total_max_attempts counts the first try; botocore's "max_attempts" would not.
            retries={"mode": "standard", "total_max_attempts": settings.max_attempts},
            connect_timeout=settings.connect_timeout, read_timeout=settings.read_timeout,
            max_pool_connections=settings.max_connections,
            # Self-hosted servers (MinIO, SeaweedFS, RGW) want path-style; AWS picks itself.
            s3={"addressing_style": "path" if settings.endpoint else "auto"})
        stack = AsyncExitStack()
        client = await stack.enter_async_context(get_session().create_client(
            "s3", endpoint_url=settings.endpoint, region_name=settings.region,
            aws_access_key_id=settings.access_key, aws_secret_access_key=settings.secret_key,
            config=config))
        store = cls(settings, client, stack)
        try:
            await store._check_bucket()
        except BaseException:
            await stack.aclose()
            raise
        return store

    async def _check_bucket(self) -> None:
        s = self.settings
        where = s.endpoint or f"AWS S3 ({s.region})"
        for attempt in (1, 2):
            try:
                await self.client.list_objects_v2(Bucket=s.bucket, Prefix=self._blobs, MaxKeys=1)
                return
            except ClientError as exc:
                code = _code(exc)
                if code in _CREDENTIALS_REFUSED:
                    raise StorageError(f"{where} refused the credentials from "
                                       f"{s.credential_source} ({code}): check them") from exc
                if code == "NoSuchBucket" and s.create_bucket and attempt == 1:
                    try:
                        await self.client.create_bucket(Bucket=s.bucket)
                    except ClientError as create_exc:
                        if _code(create_exc) not in ("BucketAlreadyOwnedByYou",
                                                     "BucketAlreadyExists"):
                            raise StorageError(f"storage.s3.bucket: cannot create bucket "
                                               f"{s.bucket!r}: {_code(create_exc)}"
                                               ) from create_exc
                    log.info("s3.bucket_created", bucket=s.bucket)
                    continue
                if code == "NoSuchBucket":
                    raise StorageError(f"storage.s3.bucket: bucket {s.bucket!r} does not exist "
                                       f"at {where} (set storage.s3.create_bucket: true to "
                                       f"create it)") from exc
                raise StorageError(f"storage.s3: {where} answered {code or 'an error'} for "
                                   f"bucket {s.bucket!r}") from exc
            except _S3_ERRORS as exc:
                raise StorageError(f"storage.s3.endpoint: cannot reach {where}: "
                                   f"{type(exc).__name__}") from exc

    def key(self, digest: Digest) -> str:
        """The object key of ``digest``."""
        if not _HEX64.fullmatch(digest.hex):  # Digest(...) can be built unvalidated
            raise DigestInvalid(f"invalid digest hex {digest.hex[:80]!r}")
        return f"{self._blobs}{digest.hex[:2]}/{digest.hex}"

    async def close(self) -> None:
        """Close the client's connection pool."""
        await self._stack.aclose()

    # --- reads -----------------------------------------------------------------------------

    async def size(self, digest: Digest) -> int | None:
        """The object's size (a HEAD), or None if absent."""
        try:
            with self.errors("head", digest):
                head = await self.client.head_object(Bucket=self.settings.bucket,
                                                     Key=self.key(digest))
        except BlobUnknown:
            return None
        return int(head["ContentLength"])

    async def has(self, digest: Digest) -> bool:
        """True if the object is committed."""
        return await self.size(digest) is not None

    @asynccontextmanager
    async def open_range(self, digest: Digest, offset: int = 0,
                         length: int | None = None) -> AsyncIterator[_S3Reader]:
        """A (ranged) GET, streamed; one request."""
        request: dict[str, Any] = {"Bucket": self.settings.bucket, "Key": self.key(digest)}
        if offset or length is not None:
            if offset < 0 or (length is not None and length < 0):
                raise RangeInvalid(f"range {offset}+{length} is invalid")
            if length == 0:  # S3 has no empty range: learn the size, send nothing
                total = await self.size(digest)
                if total is None:
                    raise BlobUnknown(detail={"digest": str(digest)})
                check_range(total, offset, 0)
                yield _S3Reader(_Empty(), 0, total, self.errors, digest)
                return
            end = "" if length is None else str(offset + length - 1)
            request["Range"] = f"bytes={offset}-{end}"
        with self.errors("get", digest):
            response = await self.client.get_object(**request)
        body = response["Body"]
        try:
            if "Range" in request:
                total = int(str(response.get("ContentRange", "")).rpartition("/")[2] or -1)
                # S3 shortens a range that runs past the end; the contract refuses it.
                served = check_range(total, offset, length)
            else:
                total = served = int(response["ContentLength"])
            yield _S3Reader(body, served, total, self.errors, digest)
        finally:
            body.close()

    async def read_bytes(self, digest: Digest) -> bytes:
        """The whole object (manifests and other small objects)."""
        with self.errors("get", digest):
            response = await self.client.get_object(Bucket=self.settings.bucket,
                                                    Key=self.key(digest))
            async with response["Body"] as body:
                return await body.read()

    async def hash_object(self, digest: Digest) -> Digest | None:
        """Re-hash the stored bytes, streaming; None if absent."""
        hasher = hashlib.sha256()
        try:
            async with self.open_range(digest) as reader:
                async for chunk in reader:
                    hasher.update(chunk)
        except BlobUnknown:
            return None
        return Digest(hasher.hexdigest())

    async def iter_objects(self) -> AsyncIterator[ObjectInfo]:
        """Every committed object (a paginated listing; fsck only: gc uses the index).
        Keys that are not ``<2 hex>/<64 hex>`` with a matching prefix are skipped."""
        paginator = self.client.get_paginator("list_objects_v2")
        with self.errors("list"):
            async for page in paginator.paginate(Bucket=self.settings.bucket,
                                                 Prefix=self._blobs):
                for item in page.get("Contents", []):
                    fan, _, name = item["Key"][len(self._blobs):].partition("/")
                    if _HEX64.fullmatch(name) and name.startswith(fan) and len(fan) == 2:
                        yield ObjectInfo(Digest(name), int(item["Size"]),
                                         item["LastModified"].timestamp())

    async def presign_url(self, digest: Digest, expires: float) -> str | None:
        """A presigned GET URL valid for ``expires`` seconds (``storage.s3.redirect``).

        Signing is local (no request), so it cannot fail on the network."""
        return await self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.settings.bucket, "Key": self.key(digest)},
            ExpiresIn=max(1, int(expires)))

    def local_path(self, digest: Digest) -> Path | None:
        """No local file: the server streams through :meth:`open_range` or redirects."""
        return None

    # --- writes ----------------------------------------------------------------------------

    async def begin_upload(self, expected: Digest) -> S3Upload:
        """A streamed upload of ``expected`` (nothing is sent before the first full part)."""
        self.key(expected)  # validate before anything is buffered
        return S3Upload(self, expected)

    async def put_bytes(self, digest: Digest, data: bytes) -> None:
        """Verify, then one PUT (small objects: manifests, signatures)."""
        actual = Digest.of(data)
        if actual != digest:
            raise DigestInvalid(f"content digest {actual} does not match {digest}",
                                detail={"expected": str(digest), "actual": str(actual)})
        with self.errors("put"):
            await self.client.put_object(Bucket=self.settings.bucket, Key=self.key(digest),
                                         Body=data)

    async def delete(self, digest: Digest) -> bool:
        """Delete the object; return whether it existed (S3's DELETE does not say)."""
        if not await self.has(digest):
            return False
        with self.errors("delete", digest):
            await self.client.delete_object(Bucket=self.settings.bucket, Key=self.key(digest))
        return True

    async def quarantine(self, digest: Digest) -> bool:
        """Copy the object to ``<prefix>quarantine/<hex>`` and delete it from blobs/."""
        if not await self.has(digest):
            return False
        target = f"{self.settings.prefix}quarantine/{digest.hex}"
        with self.errors("quarantine", digest):
            await self.client.copy_object(Bucket=self.settings.bucket, Key=target,
                                          CopySource={"Bucket": self.settings.bucket,
                                                      "Key": self.key(digest)})
            await self.client.delete_object(Bucket=self.settings.bucket, Key=self.key(digest))
        return True

    # --- abandoned uploads -----------------------------------------------------------------

    async def _uploads(self) -> list[tuple[str, str, float]]:
        found: list[tuple[str, str, float]] = []
        paginator = self.client.get_paginator("list_multipart_uploads")
        with self.errors("list uploads"):
            async for page in paginator.paginate(Bucket=self.settings.bucket,
                                                 Prefix=self._blobs):
                for upload in page.get("Uploads", []):
                    found.append((upload["Key"], upload["UploadId"],
                                  upload["Initiated"].timestamp()))
        return found

    async def pending_uploads(self) -> list[PendingUpload]:
        """Multipart uploads under blobs/ never completed nor aborted."""
        return [PendingUpload(f"{key} {upload_id}", started)
                for key, upload_id, started in await self._uploads()]

    async def cleanup_abandoned(self, older_than: float,
                                keep: Callable[[Digest], Awaitable[bool]] | None = None) -> int:
        """Abort multipart uploads initiated more than ``older_than`` seconds ago (as the
        listing reports it), except those ``keep`` spares (their key names the digest);
        return how many were aborted."""
        cutoff = time.time() - older_than
        aborted = 0
        for key, upload_id, started in await self._uploads():
            if started > cutoff:
                continue
            name = key.rpartition("/")[2]
            if keep is not None and _HEX64.fullmatch(name) and await keep(Digest(name)):
                continue
            try:
                with self.errors("upload abort"):
                    await self.client.abort_multipart_upload(
                        Bucket=self.settings.bucket, Key=key, UploadId=upload_id)
            except Unavailable as exc:  # gone meanwhile (another replica cleaned it)
                log.warning("s3.abandoned_abort_failed", key=key, error=str(exc))
                continue
            aborted += 1
        if aborted:
            log.info("s3.abandoned_uploads_aborted", count=aborted)
        return aborted


class _Empty:
    """The body of an empty range."""

    async def iter_chunks(self, chunk: int) -> AsyncIterator[bytes]:
        nothing: tuple[bytes, ...] = ()
        for item in nothing:
            yield item
