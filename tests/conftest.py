from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests/helpers.py

from helpers import WrappedStorage  # noqa: E402
from s3fixtures import (  # noqa: E402, F401 - fixtures for the S3 and conformance tests
    aws_env,
    fault_proxy,
    moto_endpoint,
    s3_client,
    s3_options,
    s3_prefix,
    s3_uri,
)

from asyncckpt.storage import LocalStorage  # noqa: E402


@pytest.fixture
def ckpt_dir(tmp_path):
    """A fresh (not yet existing) checkpoint folder."""
    return tmp_path / "ckpt"


@pytest.fixture
def wrapped(ckpt_dir):
    """A WrappedStorage over a real LocalStorage in ckpt_dir."""
    storage = WrappedStorage(LocalStorage(ckpt_dir))
    yield storage
    if storage.gate is not None:
        storage.gate.set()  # never leave a writer thread waiting on a test's gate


def pytest_collection_modifyitems(config, items):
    """Skip tests marked ``cuda`` when no CUDA device is present."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
