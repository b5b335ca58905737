"""S3 storage end to end, against moto's HTTP S3 server (and a fault proxy in front of it).

The Storage contract itself is in test_storage_conformance.py; here: the writer on S3 (rotation,
best, latest, resume, ``last_checkpoint``), streaming multipart uploads, loading, error mapping,
and transient / permanent faults.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

import anyio
import pytest
import torch
from support.faultproxy import FaultProxy
from support.helpers import tensors_equal
from support.s3fixtures import BUCKET, object_keys, pending_uploads

import asyncckpt
from asyncckpt import (
    AsyncCheckpointer,
    Checkpointer,
    CheckpointNotFoundError,
    IntegrityError,
    StorageError,
    TransientStorageError,
    WriterError,
)
from asyncckpt.storage import FsspecStorage, LocalStorage, S3Storage, storage_for
from asyncckpt.storage._s3errors import translate_error

MiB = 1 << 20
PART = 5 * MiB
INDEX = "asyncckpt-index.json"


def small_state(value: float) -> dict[str, Any]:
    return {"w": torch.full((8, 8), value), "step": int(value)}


def big_state(value: float, nbytes: int = 2 * PART + 3 * MiB) -> dict[str, Any]:
    """A state whose file is larger than two parts (three parts at PART)."""
    return {"w": torch.full((nbytes // 4,), value), "b": torch.arange(10.0) + value}


def keys(s3_client: Any, prefix: str) -> set[str]:
    return {k.removeprefix(prefix + "/") for k in object_keys(s3_client, prefix + "/")}


def options(endpoint: str, **extra: Any) -> dict[str, Any]:
    return {"endpoint_url": endpoint, "part_size": PART, "retry_backoff": 0.01, **extra}


# -- dispatch, options, missing extra ------------------------------------------------------------
def test_storage_for_dispatches_by_scheme(tmp_path: Any) -> None:
    s3 = storage_for("s3://bucket/runs/exp1/", storage_options={"part_size": 8 * MiB})
    assert isinstance(s3, S3Storage)
    assert (s3.uri, s3.bucket, s3.prefix, s3.part_size) == (
        "s3://bucket/runs/exp1", "bucket", "runs/exp1", 8 * MiB)
    assert s3.uri_of("step_1.pt") == "s3://bucket/runs/exp1/step_1.pt"
    root = storage_for("s3a://bucket")
    assert isinstance(root, S3Storage) and root.uri_of("x.pt") == "s3://bucket/x.pt"
    assert isinstance(storage_for("memory://runs/exp1"), FsspecStorage)
    assert isinstance(storage_for(f"file://{tmp_path}"), LocalStorage)
    assert isinstance(storage_for(str(tmp_path)), LocalStorage)
    with pytest.raises(ValueError, match="no backend for nosuchproto://"):
        storage_for("nosuchproto://x/y")


@pytest.mark.parametrize(
    ("uri", "opts", "match"),
    [
        ("s3://", {}, "names no bucket"),
        ("s3://bucket/p?versionId=1", {}, "query"),
        ("s3://bucket/p", {"part_size": 5 * MiB - 1}, "part_size must be >= 5242880"),
        ("s3://bucket/p", {"max_concurrency": 0}, "max_concurrency must be >= 1"),
        ("s3://bucket/p", {"max_attempts": 0}, "max_attempts must be >= 1"),
        ("s3://bucket/p", {"retry_backoff": -1}, "retry_backoff"),
    ],
)
def test_invalid_s3_locations_and_options_are_rejected(uri: str, opts: dict[str, Any],
                                                        match: str) -> None:
    with pytest.raises(ValueError, match=match):
        storage_for(uri, storage_options=opts)


@pytest.mark.parametrize(("uri", "module"), [("s3://bucket/p", "s3fs"), ("memory://p", "fsspec")])
def test_a_missing_extra_is_named(monkeypatch: pytest.MonkeyPatch, uri: str, module: str) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # makes `import <module>` fail
    with pytest.raises(ImportError, match=r"pip install 'asyncckpt\[s3\]'"):
        storage_for(uri)


def _client_error(code: str, status: int) -> Exception:
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": "m"},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")


@pytest.mark.parametrize(
    ("code", "status", "expected"),
    [
        ("NoSuchKey", 404, FileNotFoundError),
        ("404", 404, FileNotFoundError),
        ("SlowDown", 503, TransientStorageError),
        ("ServiceUnavailable", 503, TransientStorageError),
        ("InternalError", 500, TransientStorageError),
        ("502", 502, TransientStorageError),
        ("504", 504, TransientStorageError),
        ("Throttling", 400, TransientStorageError),
        ("RequestTimeout", 400, TransientStorageError),
        ("AccessDenied", 403, StorageError),
        ("InvalidAccessKeyId", 403, StorageError),
        ("SignatureDoesNotMatch", 403, StorageError),
        ("NoSuchBucket", 404, StorageError),
    ],
)
def test_s3_errors_are_classified(code: str, status: int, expected: type) -> None:
    # s3fs raises its own OSError translation with the botocore error as __cause__.
    raised = OSError("translated by s3fs")
    raised.__cause__ = _client_error(code, status)
    error = translate_error(raised, "write", "s3://bkt/p/step_1.pt")
    assert type(error) is expected
    if expected is not FileNotFoundError:
        assert "s3://bkt/p/step_1.pt" in str(error)
    if code == "NoSuchBucket":
        assert "'bkt' does not exist" in str(error)


def test_network_failures_are_transient() -> None:
    from botocore.exceptions import ConnectionClosedError, ReadTimeoutError

    for exc in (ConnectionResetError(104, "reset"), TimeoutError(),
                ReadTimeoutError(endpoint_url="http://x"),
                ConnectionClosedError(endpoint_url="http://x")):
        assert type(translate_error(exc, "read", "s3://b/k")) is TransientStorageError


# -- the writer on S3 ----------------------------------------------------------------------------
def test_checkpointer_on_s3_rotates_tracks_best_and_resumes(
    s3_uri: str, s3_prefix: str, s3_options: dict[str, Any], s3_client: Any
) -> None:
    config = {"keep_last": 2, "best": {"loss": "less"}}
    with Checkpointer(s3_uri, storage_options=s3_options, **config) as ckpt:
        for step, loss in [(1, 0.9), (2, 0.5), (3, 0.7), (4, 0.8)]:
            ckpt.save(small_state(step), step=step, metrics={"loss": loss})
        ckpt.flush()
        assert [c.name for c in ckpt.checkpoints()] == ["step_2.pt", "step_3.pt", "step_4.pt"]
        assert ckpt.latest().uri == f"{s3_uri}/step_4.pt"
        assert ckpt.best("loss").name == "step_2.pt"
    assert keys(s3_client, s3_prefix) == {"step_2.pt", "step_3.pt", "step_4.pt", INDEX,
                                          "last_checkpoint"}
    pointer = s3_client.get_object(Bucket=BUCKET, Key=f"{s3_prefix}/last_checkpoint")
    assert pointer["Body"].read().decode() == f"{s3_uri}/step_4.pt"
    listed = asyncckpt.checkpoints(s3_uri, storage_options=s3_options)
    assert [(c.name, c.step, c.uri) for c in listed] == [
        (f"step_{s}.pt", s, f"{s3_uri}/step_{s}.pt") for s in (2, 3, 4)]

    # Resume: rotation goes on counting, the best is remembered.
    with Checkpointer(s3_uri, storage_options=s3_options, **config) as ckpt:
        assert ckpt.latest().name == "step_4.pt"
        ckpt.save(small_state(5), step=5, metrics={"loss": 0.95})
    assert keys(s3_client, s3_prefix) == {"step_2.pt", "step_4.pt", "step_5.pt", INDEX,
                                          "last_checkpoint"}
    assert tensors_equal(asyncckpt.load(s3_uri, storage_options=s3_options), small_state(5))
    assert tensors_equal(asyncckpt.load(s3_uri, "best:loss", storage_options=s3_options),
                         small_state(2))
    assert tensors_equal(asyncckpt.load(s3_uri, 4, storage_options=s3_options), small_state(4))
    one = asyncckpt.load(f"{s3_uri}/step_4.pt", storage_options=s3_options)
    assert tensors_equal(one, small_state(4))


def test_large_checkpoint_goes_up_in_parts_and_round_trips_byte_exact(
    s3_uri: str, s3_prefix: str, s3_client: Any, moto_endpoint: str, tmp_path: Any
) -> None:
    state = big_state(1.5)
    with Checkpointer(s3_uri, storage_options=options(moto_endpoint)) as ckpt:
        info = ckpt.save(state, step=1).wait()
    with Checkpointer(tmp_path / "local") as ckpt:
        ckpt.save(state, step=1)
    key = f"{s3_prefix}/step_1.pt"
    head = s3_client.head_object(Bucket=BUCKET, Key=key, PartNumber=1)
    assert head["PartsCount"] == 3
    assert s3_client.head_object(Bucket=BUCKET, Key=key)["ETag"].strip('"').endswith("-3")
    body = s3_client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    assert len(body) == info.size > 2 * PART
    assert body == (tmp_path / "local" / "step_1.pt").read_bytes()  # exactly what torch.save writes
    assert tensors_equal(asyncckpt.load(s3_uri, storage_options=options(moto_endpoint)), state)
    assert pending_uploads(s3_client, s3_prefix) == []


def test_small_objects_are_a_single_put(
    s3_uri: str, s3_prefix: str, s3_client: Any, fault_proxy: FaultProxy
) -> None:
    with Checkpointer(s3_uri, storage_options=options(fault_proxy.endpoint)) as ckpt:
        ckpt.save(small_state(1), step=1)
    assert fault_proxy.requests["CreateMultipartUpload"] == 0
    # the empty index a writer publishes on a new prefix, then the index recording the name in
    # flight, the checkpoint, the index listing it, last_checkpoint
    assert fault_proxy.requests["PutObject"] == 5
    assert "-" not in s3_client.head_object(Bucket=BUCKET, Key=f"{s3_prefix}/step_1.pt")["ETag"]


async def test_parts_upload_while_chunks_arrive_within_the_memory_bound(
    s3_uri: str, fault_proxy: FaultProxy
) -> None:
    storage = S3Storage(s3_uri, **options(fault_proxy.endpoint, max_concurrency=1))
    part_done = fault_proxy.forwarded("UploadPart")
    overlapped = []

    async def chunks() -> Any:
        block = bytes(range(256)) * 4096  # 1 MiB
        for i in range(4 * 5 + 2):  # 22 MiB: five parts
            yield block
            if i == 6:  # the first part was handed over at 5 MiB: it uploads meanwhile
                overlapped.append(await anyio.to_thread.run_sync(part_done.wait, 60))

    await storage.open(writer=True)
    try:
        assert await storage.write("big.pt", chunks()) == 22 * MiB
        assert overlapped == [True]
        assert fault_proxy.requests["UploadPart"] == 5
        assert fault_proxy.max_in_flight["UploadPart"] == 1
        assert storage._uploads.parts.created <= 2  # part_size * (max_concurrency + 1) at most
        data = await storage.read_bytes("big.pt")
        assert data == (bytes(range(256)) * 4096) * 22
    finally:
        await storage.aclose()


async def test_abandoned_upload_is_aborted_and_nothing_is_visible(
    s3_uri: str, s3_prefix: str, s3_client: Any, fault_proxy: FaultProxy
) -> None:
    fault_proxy.plan = lambda r: "stall" if r.operation == "UploadPart" else None
    stalled = fault_proxy.arrived("UploadPart")

    class Stop(Exception):
        pass

    with pytest.raises(Stop):
        async with AsyncCheckpointer(s3_uri, storage_options=options(fault_proxy.endpoint),
                                     on_exception="abandon") as ckpt:
            await ckpt.save(small_state(1), step=1)
            await (await ckpt.save(small_state(2), step=2)).committed()
            await ckpt.save(big_state(3.0), step=3)
            assert await anyio.to_thread.run_sync(stalled.wait, 60)
            raise Stop  # leaves the block while parts of step 3 are in flight
    assert fault_proxy.requests["AbortMultipartUpload"] == 1
    assert pending_uploads(s3_client, s3_prefix) == []
    assert "step_3.pt" not in keys(s3_client, s3_prefix)
    listed = asyncckpt.checkpoints(s3_uri, storage_options=options(fault_proxy.endpoint))
    assert [c.name for c in listed] == ["step_1.pt", "step_2.pt"]


def test_opening_a_prefix_aborts_uploads_a_crashed_writer_left(
    s3_uri: str, s3_prefix: str, s3_client: Any, s3_options: dict[str, Any]
) -> None:
    key = f"{s3_prefix}/step_7.pt"
    upload = s3_client.create_multipart_upload(Bucket=BUCKET, Key=key)
    s3_client.upload_part(Bucket=BUCKET, Key=key, UploadId=upload["UploadId"], PartNumber=1,
                          Body=b"x" * PART)
    other = s3_client.create_multipart_upload(Bucket=BUCKET, Key=f"{s3_prefix}-other/x.pt")
    with Checkpointer(s3_uri, storage_options=s3_options):
        assert pending_uploads(s3_client, s3_prefix + "/") == []
    assert pending_uploads(s3_client, f"{s3_prefix}-other/") == [f"{s3_prefix}-other/x.pt"]
    s3_client.abort_multipart_upload(Bucket=BUCKET, Key=f"{s3_prefix}-other/x.pt",
                                     UploadId=other["UploadId"])


def test_configuration_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, s3_uri: str, moto_endpoint: str
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    with Checkpointer(s3_uri) as ckpt:  # credentials, region and endpoint all from the env
        ckpt.save(small_state(3), step=3)
    assert tensors_equal(asyncckpt.load(s3_uri), small_state(3))


def test_checkpointer_on_a_generic_fsspec_url() -> None:
    import fsspec

    uri = "memory://asyncckpt-tests/run1"
    try:
        with Checkpointer(uri, keep_last=1) as ckpt:
            ckpt.save(small_state(1), step=1)
            ckpt.save(small_state(2), step=2)
        files = sorted(p.rsplit("/", 1)[-1]
                       for p in fsspec.filesystem("memory").ls("/asyncckpt-tests/run1", False))
        assert files == [INDEX, "last_checkpoint", "step_2.pt"]
        assert [c.uri for c in asyncckpt.checkpoints(uri)] == [f"{uri}/step_2.pt"]
        assert tensors_equal(asyncckpt.load(uri), small_state(2))
        assert tensors_equal(asyncckpt.load(f"{uri}/step_2.pt"), small_state(2))
    finally:
        fsspec.filesystem("memory").rm("/asyncckpt-tests", recursive=True)


# -- loading -------------------------------------------------------------------------------------
def test_load_verifies_the_checksum_of_an_s3_object(
    s3_uri: str, s3_prefix: str, s3_client: Any, s3_options: dict[str, Any]
) -> None:
    with Checkpointer(s3_uri, storage_options=s3_options) as ckpt:
        ckpt.save(small_state(1), step=1)
    key = f"{s3_prefix}/step_1.pt"
    data = bytearray(s3_client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    data[-30] ^= 0xFF
    s3_client.put_object(Bucket=BUCKET, Key=key, Body=bytes(data))
    with pytest.raises(IntegrityError, match="step_1.pt"):
        asyncckpt.load(s3_uri, storage_options=s3_options)
    with pytest.raises(IntegrityError):
        asyncckpt.load(f"{s3_uri}/step_1.pt", storage_options=s3_options)


def test_load_of_missing_things_says_what_is_missing(
    s3_uri: str, s3_options: dict[str, Any]
) -> None:
    with pytest.raises(CheckpointNotFoundError):
        asyncckpt.load(s3_uri, storage_options=s3_options)
    with pytest.raises(CheckpointNotFoundError):
        asyncckpt.checkpoints(s3_uri, storage_options=s3_options)
    with pytest.raises(StorageError, match="'no-such-bucket' does not exist"):
        asyncckpt.load("s3://no-such-bucket/run", storage_options=s3_options)


# -- faults --------------------------------------------------------------------------------------
@pytest.mark.parametrize("fault", ["503", "slowdown", "reset", "drop"])
def test_transient_faults_are_retried_and_every_checkpoint_commits(
    fault: str, s3_uri: str, s3_client: Any, s3_prefix: str, fault_proxy: FaultProxy
) -> None:
    # Four failures in a row outlast one request's 3 attempts, so the writer's own retry of
    # the whole checkpoint is needed too; the multipart upload loses its start (a lost answer
    # leaves an orphaned upload, which must be aborted), parts and its completion.
    budget = {"PutObject": 4, "CreateMultipartUpload": 1, "UploadPart": 2,
              "CompleteMultipartUpload": 1}

    def plan(request: Any) -> str | None:
        if budget.get(request.operation, 0) > 0:
            budget[request.operation] -= 1
            return fault
        return None

    fault_proxy.plan = plan
    opts = options(fault_proxy.endpoint, max_attempts=3)
    with Checkpointer(s3_uri, storage_options=opts, keep_last=2, retry_backoff=0.01) as ckpt:
        handles = [ckpt.save(small_state(1), step=1), ckpt.save(big_state(2.0), step=2),
                   ckpt.save(small_state(3), step=3)]
        for handle in handles:
            handle.wait()
        assert [h.status for h in handles] == ["committed"] * 3
    assert fault_proxy.injected[fault] == 8
    # Only a lost answer to CreateMultipartUpload leaves an upload behind, aborted at once.
    assert fault_proxy.requests["AbortMultipartUpload"] == (1 if fault == "drop" else 0)
    assert [c.name for c in asyncckpt.checkpoints(s3_uri, storage_options=opts)] == [
        "step_2.pt", "step_3.pt"]
    assert tensors_equal(asyncckpt.load(s3_uri, 2, storage_options=opts), big_state(2.0))
    assert tensors_equal(asyncckpt.load(s3_uri, 3, storage_options=opts), small_state(3))
    assert pending_uploads(s3_client, s3_prefix) == []


def test_retries_are_bounded_by_attempts_times_writer_retries(
    s3_uri: str, fault_proxy: FaultProxy
) -> None:
    opts = options(fault_proxy.endpoint, max_attempts=3)
    with Checkpointer(s3_uri, storage_options=opts, max_retries=1, retry_backoff=0.01) as ckpt:
        fault_proxy.fail_share({"503": 1.0}, operations={"PutObject"})
        ckpt.save(small_state(1), step=1)
        with pytest.raises(WriterError) as raised:
            ckpt.flush()
        # 3 attempts per request, 2 writes of the checkpoint; no hidden retries in s3fs or
        # botocore.
        assert fault_proxy.injected["503"] == 6
        fault_proxy.reset_plan()
    assert type(raised.value.__cause__) is TransientStorageError
    assert "ServiceUnavailable" in str(raised.value.__cause__)


def test_a_stalled_request_times_out_and_is_retried(
    s3_uri: str, fault_proxy: FaultProxy
) -> None:
    opts = options(fault_proxy.endpoint, config_kwargs={"read_timeout": 1})
    fault_proxy.fail_next("stall", 1, operations={"UploadPart"})
    with Checkpointer(s3_uri, storage_options=opts) as ckpt:
        ckpt.save(big_state(1.0), step=1).wait()
    assert fault_proxy.injected["stall"] == 1
    assert tensors_equal(asyncckpt.load(s3_uri, storage_options=opts), big_state(1.0))


def test_a_completion_whose_response_was_lost_still_commits(
    s3_uri: str, fault_proxy: FaultProxy
) -> None:
    completions = []

    def plan(request: Any) -> str | None:
        if request.operation != "CompleteMultipartUpload":
            return None
        completions.append(request)
        # The first completion succeeds but its answer is lost; the retry then finds the
        # upload gone, as S3 may answer.
        return "drop" if len(completions) == 1 else "nosuchupload"

    fault_proxy.plan = plan
    opts = options(fault_proxy.endpoint)
    with Checkpointer(s3_uri, storage_options=opts) as ckpt:
        assert ckpt.save(big_state(4.0), step=1).wait() is not None
    assert len(completions) == 2
    assert tensors_equal(asyncckpt.load(s3_uri, storage_options=opts), big_state(4.0))


def test_a_completion_that_never_happened_is_not_mistaken_for_success(
    s3_uri: str, s3_client: Any, s3_prefix: str, fault_proxy: FaultProxy
) -> None:
    fault_proxy.fail_next("nosuchupload", 1, operations={"CompleteMultipartUpload"})
    with pytest.raises(WriterError) as raised:
        with Checkpointer(s3_uri, storage_options=options(fault_proxy.endpoint)) as ckpt:
            ckpt.save(big_state(4.0), step=1)
    assert "NoSuchUpload" in str(raised.value.__cause__)
    assert "step_1.pt" not in keys(s3_client, s3_prefix)
    assert pending_uploads(s3_client, s3_prefix) == []  # aborted after the failure


@pytest.mark.parametrize("operation", ["PutObject", "UploadPart"])
def test_a_permanent_fault_reaches_the_caller_and_keeps_what_was_committed(
    operation: str, s3_uri: str, s3_client: Any, s3_prefix: str, fault_proxy: FaultProxy
) -> None:
    opts = options(fault_proxy.endpoint)
    with Checkpointer(s3_uri, storage_options=opts, max_retries=3) as ckpt:
        ckpt.save(small_state(1), step=1)
        ckpt.save(small_state(2), step=2)
        ckpt.flush()
        fault_proxy.fail_next("403", 1, operations={operation}, key_suffix="/step_3.pt")
        ckpt.save(big_state(3.0) if operation == "UploadPart" else small_state(3), step=3)
        with pytest.raises(WriterError) as raised:
            ckpt.flush()
        cause = raised.value.__cause__
        assert type(cause) is StorageError  # permanent: not retried
        assert "AccessDenied" in str(cause) and f"{s3_uri}/step_3.pt" in str(cause)
        assert fault_proxy.injected["403"] == 1
        ckpt.save(small_state(4), step=4)  # the writer goes on once the fault is gone
    fault_proxy.reset_plan()
    assert [c.name for c in asyncckpt.checkpoints(s3_uri, storage_options=opts)] == [
        "step_1.pt", "step_2.pt", "step_4.pt"]
    assert tensors_equal(asyncckpt.load(s3_uri, 2, storage_options=opts), small_state(2))
    assert pending_uploads(s3_client, s3_prefix) == []


def test_wrong_credentials_fail_at_open(s3_uri: str, fault_proxy: FaultProxy) -> None:
    fault_proxy.fail_share({"badkey": 1.0})
    with pytest.raises(StorageError, match="access denied"):
        Checkpointer(s3_uri, storage_options=options(fault_proxy.endpoint))
    assert fault_proxy.injected["badkey"] == 1  # permanent: asked once


def test_a_deleted_bucket_reaches_the_caller(s3_client: Any, moto_endpoint: str) -> None:
    bucket = "asyncckpt-doomed"
    s3_client.create_bucket(Bucket=bucket)
    uri = f"s3://{bucket}/run"
    with pytest.raises(WriterError) as raised:
        with Checkpointer(uri, storage_options=options(moto_endpoint)) as ckpt:
            ckpt.save(small_state(1), step=1)
            ckpt.flush()
            for obj in s3_client.list_objects_v2(Bucket=bucket).get("Contents", []):
                s3_client.delete_object(Bucket=bucket, Key=obj["Key"])
            s3_client.delete_bucket(Bucket=bucket)
            ckpt.save(small_state(2), step=2)
    assert type(raised.value.__cause__) is StorageError
    assert f"'{bucket}' does not exist" in str(raised.value.__cause__)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # hundreds of S3 calls through a proxy that fails and stalls them
def test_soak_mixed_transient_faults(s3_uri: str, fault_proxy: FaultProxy) -> None:
    opts = options(fault_proxy.endpoint, config_kwargs={"read_timeout": 2}, max_attempts=4)
    fault_proxy.fail_share({"503": 0.08, "slowdown": 0.04, "reset": 0.06, "drop": 0.04,
                            "stall": 0.01}, seed=11)
    with Checkpointer(s3_uri, storage_options=opts, keep_last=3, retry_backoff=0.01,
                      max_retries=6) as ckpt:
        for step in range(1, 25):
            state = big_state(float(step)) if step % 6 == 0 else small_state(step)
            ckpt.save(state, step=step)
        ckpt.flush()
        assert ckpt.stats.committed == 24
    assert sum(fault_proxy.injected.values()) > 0
    fault_proxy.reset_plan()
    assert tensors_equal(asyncckpt.load(s3_uri, 23, storage_options=opts), small_state(23))
    assert tensors_equal(asyncckpt.load(s3_uri, 24, storage_options=opts), big_state(24.0))


def test_reading_through_an_open_checkpointers_s3_storage(s3_uri: str,
                                                          s3_options: dict[str, Any]) -> None:
    """checkpoints() / load() / verify() given ckpt.storage while the checkpointer is open: they
    run on the writer's loop (the client session lives there) and leave the session open."""
    storage = S3Storage(s3_uri, **s3_options)
    with asyncckpt.Checkpointer(storage) as ckpt:
        ckpt.save(small_state(1.0), step=1).wait()
        assert [c.step for c in asyncckpt.checkpoints(storage)] == [1]
        assert tensors_equal(asyncckpt.load(storage), small_state(1.0))
        assert asyncckpt.verify(storage).ok
        ckpt.save(small_state(2.0), step=2).wait()  # the writer's session still works
    assert [c.step for c in asyncckpt.checkpoints(s3_uri, storage_options=s3_options)] == [1, 2]


@pytest.mark.parametrize("resave", [False, True])
@pytest.mark.parametrize("method", ["complete_multipart_upload", "put_object"])
def test_abandoning_while_s3_commits_records_what_s3_committed(
    s3_uri: str, s3_options: dict[str, Any], monkeypatch: pytest.MonkeyPatch, method: str,
    resave: bool
) -> None:
    """on_exception='abandon' (or Ctrl-C) while the commit request is in flight (S3 takes
    seconds to complete a large upload): its answer is awaited, shielded, so the checkpoint
    S3 now holds is listed (and a re-saved name stays listed, with its new bytes)."""
    state = big_state if method == "complete_multipart_upload" else small_state
    s3_options = {**s3_options, "part_size": PART}
    with Checkpointer(s3_uri, storage_options=s3_options) as ckpt:
        ckpt.save(state(1.0), step=1).wait()
    storage = S3Storage(s3_uri, **s3_options)
    name = "step_1.pt" if resave else "step_2.pt"
    in_flight = threading.Event()
    closing: list[anyio.Event] = []
    real_call = storage._s3.call  # every S3 request goes through it

    async def call(op: str, action: str, uri: str, *args: Any, **kwargs: Any) -> Any:
        result = await real_call(op, action, uri, *args, **kwargs)
        if op == method and uri.endswith(name):
            in_flight.set()  # S3 has committed; its answer arrives only once we are closing
            await closing[0].wait()
            await anyio.lowlevel.checkpoint()  # where a cancellation not shielded is raised
        return result

    monkeypatch.setattr(storage._s3, "call", call)
    with pytest.raises(RuntimeError, match="boom"):
        with Checkpointer(storage, on_exception="abandon") as ckpt:
            engine = ckpt._engine
            closing.append(ckpt._portal.call(anyio.Event))
            real_close = engine.close

            async def close(*, abandon: bool) -> None:
                closing[0].set()  # close() cancels the writer before it next awaits
                await real_close(abandon=abandon)

            monkeypatch.setattr(engine, "close", close)
            handle = ckpt.save(state(2.0), step=1 if resave else 2)
            assert in_flight.wait(60)
            raise RuntimeError("boom")
    assert handle.status == "committed"
    listed = asyncckpt.checkpoints(s3_uri, storage_options=s3_options)
    assert [c.name for c in listed] == (["step_1.pt"] if resave else ["step_1.pt", "step_2.pt"])
    assert tensors_equal(asyncckpt.load(s3_uri, storage_options=s3_options), state(2.0))


def test_an_upload_whose_abort_failed_is_aborted_later(
    s3_uri: str, s3_prefix: str, s3_client: Any, fault_proxy: FaultProxy
) -> None:
    """A part fails, then its abort fails too: the upload is aborted again once the endpoint
    answers (after the next successful write), so no billed parts are left behind."""
    opts = options(fault_proxy.endpoint, max_attempts=1)
    budget = {"UploadPart": 1, "AbortMultipartUpload": 1}

    def plan(request: Any) -> str | None:
        if budget.get(request.operation, 0) > 0:
            budget[request.operation] -= 1
            return "503"
        return None

    with Checkpointer(s3_uri, storage_options=opts, retry_backoff=0.01) as ckpt:
        fault_proxy.plan = plan
        handle = ckpt.save(big_state(3.0), step=1)
        assert handle.wait() is not None  # the writer's retry committed it
        assert fault_proxy.injected["503"] == 2  # the part, then the abort
    fault_proxy.reset_plan()
    assert pending_uploads(s3_client, s3_prefix) == []
    assert [c.step for c in asyncckpt.checkpoints(s3_uri, storage_options=opts)] == [1]


def test_a_writer_without_permission_to_list_uploads_still_writes(
    s3_uri: str, fault_proxy: FaultProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """A policy without s3:ListBucketMultipartUploads: cleaning up at open is skipped, with a
    warning, instead of refusing to open."""
    opts = options(fault_proxy.endpoint)
    fault_proxy.plan = lambda r: "403" if r.operation == "ListMultipartUploads" else None
    with Checkpointer(s3_uri, storage_options=opts) as ckpt:
        ckpt.save(small_state(1.0), step=1).wait()
    assert fault_proxy.injected["403"] >= 1
    fault_proxy.reset_plan()
    assert "could not look for unfinished uploads" in caplog.text
    assert [c.step for c in asyncckpt.checkpoints(s3_uri, storage_options=opts)] == [1]
