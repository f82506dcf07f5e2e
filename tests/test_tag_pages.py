"""The offline tag list is paged by the index query (``last`` and ``n`` of the distribution
spec), on SQLite and on a real PostgreSQL, in code point order whatever the database's
collation (upper before lower case, ASCII punctuation where its code point puts it, non-ASCII
last), exactly as Python orders strings, so pages chain without gaps or repeats."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sigil.oci.digest import Digest
from sigil.storage.contracts import AsyncIndex, SqliteAsyncIndex
from sigil.storage.index import Index

TAGS = ["v1", "V2", "latest", "a-1", "a.1", "a_1", "A", "Z", "z", "10", "9", "ä", "é1",
        "sha256-" + "ab" * 32 + ".sig", "1.0", "1.0-rc1"]


@pytest.fixture(params=["sqlite", "postgres"])
async def index(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AsyncIndex]:
    opened: AsyncIndex
    if request.param == "sqlite":
        opened = SqliteAsyncIndex(Index(tmp_path / "index.sqlite"))
    else:
        from sigil.storage.pgindex import PgIndex

        opened = await PgIndex.open(request.getfixturevalue("pg_dsn"))
    try:
        digest = Digest.of(b"m")
        for tag in TAGS:
            await opened.put_tag("docker.io", "app/web", tag, digest, "m", 1.0)
        await opened.put_tag("docker.io", "app/other", "zz-other-repo", digest, "m", 1.0)
        await opened.put_tag("ghcr.io", "app/web", "zz-other-upstream", digest, "m", 1.0)
        yield opened
    finally:
        await opened.close()


async def test_whole_list_in_code_point_order(index: AsyncIndex) -> None:
    assert await index.list_tags("docker.io", "app/web") == sorted(TAGS)
    assert await index.list_tags("docker.io", "app/none") == []


@pytest.mark.parametrize("n", [1, 3, 7, len(TAGS), 100])
async def test_pages_chain_like_python_slices(index: AsyncIndex, n: int) -> None:
    pages: list[list[str]] = []
    last: str | None = None
    while len(pages) <= len(TAGS):  # bounded: each page holds at least one tag
        page = await index.list_tags("docker.io", "app/web", last=last, limit=n)
        assert len(page) <= n
        if not page:
            break
        pages.append(page)
        last = page[-1]
    expected = sorted(TAGS)
    assert pages == [expected[at:at + n] for at in range(0, len(expected), n)]


async def test_last_need_not_be_a_stored_tag(index: AsyncIndex) -> None:
    expected = sorted(TAGS)
    for last in ("", "a", "a-", "latest0", "Ö", "zzzz", "\U0010ffff"):
        assert await index.list_tags("docker.io", "app/web", last=last, limit=4) == \
            [t for t in expected if t > last][:4], last
