"""Crash consistency under SIGKILL (see crash_harness.py for what is checked after each kill)."""

from __future__ import annotations

from typing import Any

import pytest
from support.crash_harness import CHECKPOINT_NAME, Target, crash_loop, local_target
from support.s3fixtures import object_keys, pending_uploads

LOCAL_KILLS, LOCAL_KILLS_LONG = 20, 200
S3_KILLS, S3_KILLS_LONG = 5, 40


def s3_target(s3_uri: str, s3_prefix: str, s3_client: Any, moto_endpoint: str) -> Target:
    # 6.25 MiB states in 5 MiB parts: every save is a multipart upload a kill can interrupt
    def files() -> list[str]:
        names = [k.rpartition("/")[2] for k in object_keys(s3_client, s3_prefix)]
        return [n for n in names if CHECKPOINT_NAME.fullmatch(n)]

    return Target(
        s3_uri,
        {"endpoint_url": moto_endpoint, "part_size": 5 * 2**20},
        lambda: pending_uploads(s3_client, s3_prefix),
        files,
        rows=1600,
    )


def test_sigkill_at_random_moments(tmp_path):
    """20 kills in the default suite (the slow run does 200)."""
    target = local_target(str(tmp_path / "run"))
    assert crash_loop(target, LOCAL_KILLS, seed=20261121) >= LOCAL_KILLS


@pytest.mark.slow
@pytest.mark.timeout(3600)  # 200 kills, each with a check and a resume: sized to the work
def test_sigkill_at_random_moments_long(tmp_path):
    target = local_target(str(tmp_path / "run"))
    assert crash_loop(target, LOCAL_KILLS_LONG, seed=7) >= LOCAL_KILLS_LONG


def test_sigkill_on_s3(s3_uri, s3_prefix, s3_client, moto_endpoint):
    """The same on S3 (moto over HTTP): kills land mid multipart upload too."""
    target = s3_target(s3_uri, s3_prefix, s3_client, moto_endpoint)
    assert crash_loop(target, S3_KILLS, seed=11) >= S3_KILLS
    assert not pending_uploads(s3_client, s3_prefix)


@pytest.mark.slow
@pytest.mark.timeout(3600)  # 40 kills of 6 MiB multipart uploads through moto
def test_sigkill_on_s3_long(s3_uri, s3_prefix, s3_client, moto_endpoint):
    target = s3_target(s3_uri, s3_prefix, s3_client, moto_endpoint)
    assert crash_loop(target, S3_KILLS_LONG, seed=13) >= S3_KILLS_LONG
