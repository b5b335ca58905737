"""Fault injection on top of the real S3 backend (moto over HTTP): nothing committed is lost."""

from __future__ import annotations

import errno
import threading
from typing import Any

import pytest
import torch
from support.helpers import WrappedStorage
from support.s3fixtures import object_keys, pending_uploads

import asyncckpt
from asyncckpt import Checkpointer, TransientStorageError, WriterError
from asyncckpt.events import DeleteFailed, Failed
from asyncckpt.storage import S3Storage

MiB = 1 << 20


def state(step: int, mib: int = 6) -> dict[str, Any]:
    g = torch.Generator().manual_seed(step)
    return {"w": torch.randn(mib * MiB // 4, generator=g), "step": step}


@pytest.fixture
def s3(s3_uri: str, moto_endpoint: str) -> WrappedStorage:
    """The real S3 backend (5 MiB parts: a 6 MiB state is a multipart upload), wrapped."""
    inner = S3Storage(s3_uri, endpoint_url=moto_endpoint, part_size=5 * MiB, retry_backoff=0.01)
    return WrappedStorage(inner)


def listed(s3: WrappedStorage, moto_endpoint: str) -> list[int]:
    opts = {"endpoint_url": moto_endpoint}
    return [c.step for c in asyncckpt.checkpoints(s3.uri, storage_options=opts)]


def test_failure_mid_multipart_upload_leaves_no_object_and_no_upload(
    s3: WrappedStorage, s3_prefix: str, s3_client: Any, moto_endpoint: str
) -> None:
    failed = threading.Event()
    observer = [lambda e: failed.set() if isinstance(e, Failed) else None]
    with Checkpointer(s3, keep_last=3, observers=observer) as ckpt:
        ckpt.save(state(1), step=1).wait()
        before = set(object_keys(s3_client, s3_prefix + "/"))
        s3.fail_after_bytes = (7 * MiB, OSError(errno.ENOSPC, "No space left on device"))
        ckpt.save(state(2, mib=12), step=2)  # fails after its first part went up
        assert failed.wait(60)
        s3.fail_after_bytes = None
        assert set(object_keys(s3_client, s3_prefix + "/")) == before  # nothing visible
        assert not pending_uploads(s3_client, s3_prefix)  # the upload was aborted
        with pytest.raises(WriterError, match="No space left"):
            ckpt.save(state(3), step=3)  # the loop hears of it at its next call
        ckpt.save(state(3), step=3)  # and saving goes on
    assert listed(s3, moto_endpoint) == [1, 3]
    assert asyncckpt.verify(s3.uri, storage_options={"endpoint_url": moto_endpoint}).ok


def test_transient_failures_are_retried_and_commit(s3: WrappedStorage, moto_endpoint: str) -> None:
    s3.fail_write = lambda name, attempt: (
        TransientStorageError("SlowDown") if name.endswith(".pt") and attempt == 1 else None
    )
    with Checkpointer(s3, retry_backoff=0.0) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(state(step, mib=1), step=step)
    assert listed(s3, moto_endpoint) == [1, 2, 3]
    assert all(s3.attempts[f"step_{s}.pt"] == 2 for s in (1, 2, 3))


def test_short_write_is_removed(
    s3: WrappedStorage, s3_prefix: str, s3_client: Any, moto_endpoint: str
) -> None:
    with Checkpointer(s3) as ckpt:
        ckpt.save(state(1, mib=1), step=1).wait()
        s3.drop_tail = 10
        with pytest.raises(WriterError, match="accepted"):
            ckpt.save(state(2, mib=1), step=2).wait()
        s3.drop_tail = 0
    keys = {k.rsplit("/", 1)[-1] for k in object_keys(s3_client, s3_prefix + "/")}
    assert "step_2.pt" not in keys and "step_1.pt" in keys
    assert listed(s3, moto_endpoint) == [1]


def test_failed_deletes_are_reported_and_retried(
    s3: WrappedStorage, s3_prefix: str, s3_client: Any, moto_endpoint: str
) -> None:
    failures: list[str] = []
    s3.fail_delete = lambda name: (
        TransientStorageError("503") if name == "step_1.pt" else None
    )
    observer = [lambda e: failures.append(e.name) if isinstance(e, DeleteFailed) else None]
    with Checkpointer(s3, keep_last=1, retry_backoff=0.0, max_retries=1,
                      observers=observer) as ckpt:
        for step in (1, 2):
            ckpt.save(state(step, mib=1), step=step)
        ckpt.flush()
        assert failures == ["step_1.pt"]
        s3.fail_delete = None
        ckpt.save(state(3, mib=1), step=3)
    keys = {k.rsplit("/", 1)[-1] for k in object_keys(s3_client, s3_prefix + "/")}
    assert {k for k in keys if k.endswith(".pt")} == {"step_3.pt"}
    assert listed(s3, moto_endpoint) == [3]
