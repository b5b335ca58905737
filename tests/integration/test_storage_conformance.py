"""The Storage contract, written once and run against every backend.

Backends: ``LocalStorage`` (a temporary folder), ``S3Storage`` (moto's S3 server), the generic
``FsspecStorage`` on ``memory://`` (a sync filesystem, run in threads) and on ``s3://`` (an
async filesystem, the path ``gs://`` and other async fsspec filesystems take). Each test runs
through anyio's pytest plugin on asyncio, and also on trio for the backends that support it
(local folders and sync fsspec filesystems); the asyncio-only ones must refuse trio at open.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from support.s3fixtures import BUCKET, pending_uploads

from asyncckpt import StorageError
from asyncckpt._format.naming import LOCK_NAME, TMP_PREFIX
from asyncckpt.storage import (
    FsspecStorage,
    LocalStorage,
    ObjectTooLargeError,
    S3Storage,
    Storage,
)

pytestmark = pytest.mark.anyio

MiB = 1 << 20
PART = 5 * MiB  # S3's smallest part: the S3 backend runs with it so that 11 MiB is 3 parts


@dataclass
class Backend:
    """How to make a storage of one kind, plant a crashed writer's leftover, and find leftovers."""

    kind: str
    make: Callable[..., Storage]  # make(location=None): a new location, or the given one
    plant_leftover: Callable[[Storage], str]
    leftovers: Callable[[Storage], list[str]]


def _local(tmp_path: Any) -> Backend:
    def make(location: str | None = None) -> Storage:
        return LocalStorage(location or tmp_path / uuid.uuid4().hex[:8], fsync=False)

    def plant(storage: Storage) -> str:
        name = f"{TMP_PREFIX}crashed"
        with open(os.path.join(storage.path, name), "wb") as f:  # type: ignore[attr-defined]
            f.write(b"half a checkpoint")
        return name

    def leftovers(storage: Storage) -> list[str]:
        path = storage.path  # type: ignore[attr-defined]
        return [n for n in os.listdir(path) if n.startswith(TMP_PREFIX)] if os.path.isdir(
            path) else []

    return Backend("local", make, plant, leftovers)


def _s3(s3_client: Any, s3_options: dict[str, Any], generic: bool) -> Backend:
    def make(location: str | None = None) -> Storage:
        location = location or f"s3://{BUCKET}/c-{uuid.uuid4().hex[:12]}"
        if generic:
            return FsspecStorage(location, endpoint_url=s3_options["endpoint_url"])
        return S3Storage(location, part_size=PART, **s3_options)

    def key_prefix(storage: Storage) -> str:
        return storage.uri.removeprefix(f"s3://{BUCKET}/") + "/"

    def plant(storage: Storage) -> str:
        if generic:  # the generic backend writes temporaries, like the local one
            name = f"{TMP_PREFIX}crashed"
            s3_client.put_object(Bucket=BUCKET, Key=key_prefix(storage) + name, Body=b"half")
            return name
        name = "step_9.pt"  # a writer that crashed mid multipart upload
        key = key_prefix(storage) + name
        upload = s3_client.create_multipart_upload(Bucket=BUCKET, Key=key)
        s3_client.upload_part(Bucket=BUCKET, Key=key, UploadId=upload["UploadId"],
                              PartNumber=1, Body=b"x" * PART)
        return name

    def leftovers(storage: Storage) -> list[str]:
        prefix = key_prefix(storage)
        listing = s3_client.list_objects_v2(Bucket=BUCKET, Prefix=prefix + TMP_PREFIX)
        temps = [o["Key"][len(prefix):] for o in listing.get("Contents", [])]
        return temps + [k[len(prefix):] for k in pending_uploads(s3_client, prefix)]

    return Backend("s3-fsspec" if generic else "s3", make, plant, leftovers)


def _memory() -> Backend:
    import fsspec

    fs = fsspec.filesystem("memory")

    def make(location: str | None = None) -> Storage:
        return FsspecStorage(location or f"memory://asyncckpt-conformance/{uuid.uuid4().hex}")

    def plant(storage: Storage) -> str:
        name = f"{TMP_PREFIX}crashed"
        fs.pipe_file(f"{storage.root}/{name}", b"half")  # type: ignore[attr-defined]
        return name

    def leftovers(storage: Storage) -> list[str]:
        root = storage.root  # type: ignore[attr-defined]
        if not fs.exists(root):
            return []
        return [p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)
                if p.rsplit("/", 1)[-1].startswith(TMP_PREFIX)]

    return Backend("memory", make, plant, leftovers)


#: (backend, event loop) pairs: s3fs runs only on asyncio.
RUNS = [("local", "asyncio"), ("local", "trio"), ("memory", "asyncio"), ("memory", "trio"),
        ("s3", "asyncio"), ("s3-fsspec", "asyncio")]


def runs(*pairs: tuple[str, str]) -> list[Any]:
    return [pytest.param(pair, id="-".join(pair)) for pair in pairs]


@pytest.fixture(params=runs(*RUNS))
def run(request: pytest.FixtureRequest) -> tuple[str, str]:
    """The backend under test and the event loop it runs on."""
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def anyio_backend(run: tuple[str, str]) -> str:
    return run[1]


@pytest.fixture
def backend(run: tuple[str, str], request: pytest.FixtureRequest,
            tmp_path: Any) -> Iterator[Backend]:
    kind = run[0]
    if kind == "local":
        yield _local(tmp_path)
    elif kind == "memory":
        yield _memory()
        import fsspec

        fs = fsspec.filesystem("memory")
        if fs.exists("/asyncckpt-conformance"):
            fs.rm("/asyncckpt-conformance", recursive=True)
    else:
        yield _s3(request.getfixturevalue("s3_client"), request.getfixturevalue("s3_options"),
                  generic=kind == "s3-fsspec")


@pytest.fixture
async def storage(backend: Backend) -> AsyncIterator[Storage]:
    """A storage of the backend under test, opened as a writer."""
    store = backend.make()
    await store.open(writer=True)
    try:
        yield store
    finally:
        await store.aclose()


def payload(nbytes: int, seed: int = 0) -> bytes:
    return (bytes(range(seed % 251, 256)) + bytes(range(256))) * (nbytes // 512) + b"x" * (
        nbytes % 512)


async def chunked(data: bytes, size: int, *, fail_after: int | None = None,
                  error: BaseException | None = None) -> AsyncIterator[Any]:
    """``data`` in chunks of ``size`` as memoryviews (bytearrays every other one); raise
    ``error`` once ``fail_after`` bytes were yielded."""
    view = memoryview(data)
    for i, start in enumerate(range(0, len(data), size)):
        if fail_after is not None and start >= fail_after:
            assert error is not None
            raise error
        piece = view[start:start + size]
        yield piece if i % 2 == 0 else bytearray(piece)
    if fail_after is not None and error is not None:
        raise error


async def names(storage: Storage) -> list[str]:
    """``storage.list()`` without the local backend's lock file."""
    return [n for n in await storage.list() if n != LOCK_NAME]


async def read_all(storage: Storage, name: str, chunk_size: int = 8 << 20,
                   max_bytes: int | None = None) -> bytes:
    stream = storage.read_stream(name, chunk_size, max_bytes=max_bytes)
    return b"".join([chunk async for chunk in stream])


# -- write / read --------------------------------------------------------------------------------
async def test_write_then_read_back(storage: Storage) -> None:
    data = payload(300_000)
    assert await storage.write("a.pt", chunked(data, 70_000)) == len(data)
    assert await storage.read_bytes("a.pt") == data
    assert await read_all(storage, "a.pt", chunk_size=64_000) == data


async def test_write_larger_than_several_parts_round_trips(storage: Storage) -> None:
    data = payload(2 * PART + 1234, seed=7)
    assert await storage.write("big.pt", chunked(data, 3 * MiB + 17)) == len(data)
    assert await read_all(storage, "big.pt", chunk_size=4 * MiB) == data
    assert await names(storage) == ["big.pt"]


async def test_write_of_empty_stream_publishes_an_empty_object(storage: Storage) -> None:
    assert await storage.write("empty.pt", chunked(b"", 10)) == 0
    assert await storage.read_bytes("empty.pt") == b""
    assert await read_all(storage, "empty.pt") == b""


async def test_write_replaces_previous_content(storage: Storage) -> None:
    await storage.write("a.pt", chunked(b"old" * 1000, 500))
    await storage.write("a.pt", chunked(b"new!", 2))
    assert await storage.read_bytes("a.pt") == b"new!"


async def test_chunks_are_copied_before_write_returns(storage: Storage) -> None:
    source = bytearray(payload(200_000))
    expected = bytes(source)

    async def views() -> AsyncIterator[memoryview]:
        view = memoryview(source)
        for start in range(0, len(source), 50_000):
            yield view[start:start + 50_000]

    await storage.write("a.pt", views())
    source[:] = b"\0" * len(source)  # the snapshot memory is reused once write() returned
    assert await storage.read_bytes("a.pt") == expected


async def test_write_bytes_publishes_small_objects(storage: Storage) -> None:
    assert await storage.write_bytes("asyncckpt-index.json", b'{"v": 1}') == 8
    assert await storage.write_bytes("asyncckpt-index.json", memoryview(b'{"v": 2}')) == 8
    assert await storage.read_bytes("asyncckpt-index.json") == b'{"v": 2}'


# -- names ---------------------------------------------------------------------------------------
async def test_list_exists_delete(storage: Storage) -> None:
    assert await names(storage) == []
    for name in ("b.pt", "a.pt", "last_checkpoint"):
        await storage.write_bytes(name, name.encode())
    assert await names(storage) == ["a.pt", "b.pt", "last_checkpoint"]
    assert await storage.exists("a.pt")
    assert not await storage.exists("c.pt")
    await storage.delete("a.pt")
    await storage.delete("a.pt")  # deleting what is gone is not an error
    assert await names(storage) == ["b.pt", "last_checkpoint"]
    assert not await storage.exists("a.pt")


async def test_missing_names_raise_file_not_found(storage: Storage) -> None:
    with pytest.raises(FileNotFoundError):
        await storage.read_bytes("nope.pt")
    with pytest.raises(FileNotFoundError):
        await read_all(storage, "nope.pt")


async def test_uri_of_names_the_object_under_the_base_uri(storage: Storage) -> None:
    assert storage.uri_of("step_1.pt") == f"{storage.uri}/step_1.pt"


# -- atomicity -----------------------------------------------------------------------------------
class Boom(Exception):
    pass


@pytest.mark.parametrize("fail_after", [0, 100_000, 2 * PART + MiB])
async def test_failing_chunks_publish_nothing_and_leave_nothing(
    backend: Backend, storage: Storage, fail_after: int
) -> None:
    await storage.write("a.pt", chunked(b"previous", 4))
    error = Boom("serializer failed")
    for name in ("a.pt", "b.pt"):  # replacing an object, and a new one
        with pytest.raises(Boom) as raised:
            await storage.write(name, chunked(payload(3 * PART), MiB, fail_after=fail_after,
                                              error=error))
        assert raised.value is error  # the iterator's own exception, unwrapped
    assert await storage.read_bytes("a.pt") == b"previous"
    assert not await storage.exists("b.pt")
    assert await names(storage) == ["a.pt"]
    assert backend.leftovers(storage) == []


async def test_cancelled_write_publishes_nothing_and_leaves_nothing(
    backend: Backend, storage: Storage
) -> None:
    reached = anyio.Event()

    async def endless() -> AsyncIterator[bytes]:
        block = payload(MiB)
        sent = 0
        while True:
            yield block
            await anyio.lowlevel.checkpoint()  # like the writer's channel: a chance to cancel
            sent += len(block)
            if sent >= 2 * PART + MiB:  # some parts are uploaded (or in flight) by now
                reached.set()

    async with anyio.create_task_group() as tg:
        async def write() -> None:
            await storage.write("a.pt", endless())

        tg.start_soon(write)
        await reached.wait()
        tg.cancel_scope.cancel()
    assert not await storage.exists("a.pt")
    assert await names(storage) == []
    assert backend.leftovers(storage) == []


async def test_cleanup_temporaries_removes_what_a_crashed_writer_left(
    backend: Backend, storage: Storage
) -> None:
    await storage.write_bytes("keep.pt", b"committed")
    name = backend.plant_leftover(storage)
    assert backend.leftovers(storage) == [name]
    assert await storage.cleanup_temporaries() == [name]
    assert backend.leftovers(storage) == []
    assert await storage.read_bytes("keep.pt") == b"committed"
    assert await storage.cleanup_temporaries() == []


async def test_a_reader_sees_what_a_writer_published(backend: Backend, storage: Storage) -> None:
    await storage.write("a.pt", chunked(b"hello", 2))
    reader = backend.make(storage.uri)
    await reader.open(writer=False)
    try:
        assert await reader.read_bytes("a.pt") == b"hello"
        assert await names(reader) == ["a.pt"]
    finally:
        await reader.aclose()


@pytest.mark.parametrize("run", runs(("s3", "asyncio"), ("s3-fsspec", "asyncio"),
                                     ("memory", "asyncio"), ("memory", "trio")), indirect=True)
async def test_remote_storages_used_before_open_fail_clearly(backend: Backend) -> None:
    store = backend.make()  # the local backend needs no session: it works unopened
    with pytest.raises(StorageError, match="not open"):
        await store.read_bytes("a.pt")


@pytest.mark.parametrize("run", runs(("s3", "trio"), ("s3-fsspec", "trio")), indirect=True)
async def test_asyncio_only_backends_refuse_trio_at_open(backend: Backend) -> None:
    """s3fs (aiobotocore, aiohttp) needs asyncio: on trio, open() says so at once, for a writer
    and a reader alike (instead of a 'transient' error deep inside, retried in vain)."""
    for writer in (True, False):
        store = backend.make()
        with anyio.fail_after(30), pytest.raises(StorageError, match="only on asyncio") as err:
            await store.open(writer=writer)
        assert "on trio" in str(err.value) and err.value.uri == store.uri
        await store.aclose()


# -- reading untrusted objects -------------------------------------------------------------------
async def test_a_limited_read_of_a_large_object_returns_all_of_it(storage: Storage) -> None:
    """A limit at (or above) the size reads the whole object, even where the backend hands
    its bytes over in pieces (an HTTP body arrives in network-sized reads)."""
    data = payload(6 << 20)
    await storage.write("big.pt", chunked(data, 1 << 20))
    assert await storage.read_bytes("big.pt", max_bytes=len(data)) == data
    assert await storage.read_bytes("big.pt", max_bytes=len(data) + 10) == data


async def test_reads_stop_at_max_bytes(storage: Storage) -> None:
    data = payload(100_000)
    await storage.write("a.pt", chunked(data, 30_000))
    assert await storage.read_bytes("a.pt", max_bytes=len(data)) == data
    assert await read_all(storage, "a.pt", 30_000, max_bytes=len(data)) == data
    chunks: list[bytes] = []
    with pytest.raises(ObjectTooLargeError) as err:
        async for chunk in storage.read_stream("a.pt", 10_000, max_bytes=len(data) - 1):
            chunks.append(chunk)
    assert chunks == []  # the size is known up front: nothing is read
    assert err.value.max_bytes == len(data) - 1 and err.value.uri == storage.uri_of("a.pt")
    assert str(len(data) - 1) in str(err.value)
    with pytest.raises(ObjectTooLargeError):
        await storage.read_bytes("a.pt", max_bytes=len(data) - 1)
    await storage.write_bytes("empty.pt", b"")
    assert await storage.read_bytes("empty.pt", max_bytes=0) == b""
    assert await read_all(storage, "empty.pt", max_bytes=0) == b""
    with pytest.raises(ObjectTooLargeError):
        await storage.read_bytes("a.pt", max_bytes=0)


@pytest.mark.parametrize(("max_bytes", "exc"), [(-1, ValueError), (1.5, TypeError),
                                                (True, TypeError), ("10", TypeError)])
async def test_max_bytes_is_validated(storage: Storage, max_bytes: Any, exc: type) -> None:
    await storage.write_bytes("a.pt", b"abc")
    with pytest.raises(exc, match="max_bytes"):
        await storage.read_bytes("a.pt", max_bytes=max_bytes)
    with pytest.raises(exc, match="max_bytes"):
        await read_all(storage, "a.pt", max_bytes=max_bytes)


async def test_open_local_is_the_checked_file_or_none(backend: Backend, storage: Storage) -> None:
    await storage.write_bytes("a.pt", b"local bytes")
    f = await anyio.to_thread.run_sync(storage.open_local, "a.pt")
    if backend.kind != "local":
        assert f is None  # no local file: loaders read the bytes instead
        return
    assert f is not None
    with f:
        assert f.read() == b"local bytes"
    with pytest.raises(FileNotFoundError):
        await anyio.to_thread.run_sync(storage.open_local, "nope.pt")
