from __future__ import annotations

import pytest
from support.helpers import WrappedStorage
from support.s3fixtures import (  # noqa: F401 - fixtures for the S3 and conformance tests
    aws_env,
    fault_proxy,
    moto_endpoint,
    s3_client,
    s3_options,
    s3_prefix,
    s3_uri,
)

from asyncckpt.storage import LocalStorage


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_pycollect_makeitem(collector, name, obj):
    """Give coroutine tests marked ``anyio`` back to anyio's plugin.

    pytest-asyncio's auto mode claims every coroutine test and runs it on its asyncio loop,
    whatever ``anyio_backend`` says; the asyncio-only tests keep that, the ``anyio`` ones run
    on the event loop their ``anyio_backend`` names.
    """
    result = yield
    items = result if isinstance(result, list) else [result] if result is not None else []
    if not any(_claimed_from_anyio(item) for item in items):
        return result
    plain = [_as_plain_function(item) if _claimed_from_anyio(item) else item for item in items]
    return plain if isinstance(result, list) else plain[0]


def _claimed_from_anyio(item):
    return (
        isinstance(item, pytest.Function)
        and type(item) is not pytest.Function
        and type(item).__module__.startswith("pytest_asyncio")
        and item.get_closest_marker("anyio") is not None
    )


def _as_plain_function(item):
    plain = pytest.Function.from_parent(
        item.parent,
        name=item.name,
        callspec=getattr(item, "callspec", None),
        callobj=item.obj,
        fixtureinfo=item._fixtureinfo,
        keywords=item.keywords,
        originalname=item.originalname,
    )
    plain.own_markers = [m for m in item.own_markers if m.name != "asyncio"]
    return plain


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    """The event loops that tests marked ``anyio`` run on (anyio's pytest plugin): asyncckpt's
    async front door and local storage support both."""
    return request.param


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
