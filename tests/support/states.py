"""States and snapshot helpers shared by the snapshot, serializer and storage tests."""

from __future__ import annotations

import io

import torch

from asyncckpt._format.hashing import checksum_of
from asyncckpt._format.serialize import serialize
from asyncckpt._snapshot.plan import plan_snapshot
from asyncckpt._snapshot.pool import BufferPool
from asyncckpt._snapshot.snapshot import take_snapshot


def snapshot_of(state, pool=None):
    pool = pool or BufferPool(2, pin_memory=False)
    plan = plan_snapshot(state)
    return take_snapshot(plan, pool.acquire(plan.nbytes))


def serialized(state, **kw) -> bytes:
    chunks: list = []
    size, checksum = serialize(snapshot_of(state), chunks.append, **kw)
    data = b"".join(bytes(c) for c in chunks)
    assert len(data) == size
    assert checksum == checksum_of(data)
    return data


def torch_save_bytes(obj, crc32: bool) -> bytes:
    before = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(crc32)
    try:
        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.getvalue()
    finally:
        torch.serialization.set_crc32_options(before)


def trained_model_and_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16),
                                torch.nn.Linear(16, 3))
    optim = torch.optim.Adam(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(optim, step_size=2)
    for _ in range(3):
        model(torch.randn(4, 8)).sum().backward()
        optim.step()
        sched.step()
    return model, optim, sched


def mixed_state():
    base = torch.arange(48, dtype=torch.float32)
    return {
        "view_a": base[4:12],
        "view_b": base.view(6, 8).t(),  # non-contiguous view of the same storage
        "whole": base,
        "bf16": torch.randn(5).to(torch.bfloat16),
        "half": torch.randn(2, 3).half(),
        "i64": torch.tensor([1, -2, 3]),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False]),
        "complex": torch.randn(3, dtype=torch.complex64),
        "empty": torch.empty(0, 7),
        "scalar_t": torch.tensor(3.5),
        "nested": [1, 2.5, "s", None, b"bytes", (torch.ones(2), {"deep": torch.zeros(1)})],
        "dtype": torch.float16,
        "device": torch.device("cpu"),
        "size": torch.Size([2, 3]),
        3: "int key",
        (1, "a"): "tuple key",
    }
