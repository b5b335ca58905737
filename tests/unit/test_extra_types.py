"""Core options the adapters need: extra_types, cpu_locations, superseding unlisted files."""

from __future__ import annotations

import copyreg
import io
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch
from support.helpers import folder_files

import asyncckpt
from asyncckpt import Checkpointer, CheckpointerConfig
from asyncckpt._format.serialize import serialize
from asyncckpt._snapshot.plan import plan_snapshot
from asyncckpt._snapshot.pool import BufferPool
from asyncckpt._snapshot.snapshot import take_snapshot

_NP_CORE = getattr(np, "_core", None) or np.core


class Record:
    """A plain object a user might keep in the state (not a tensor, no state_dict())."""

    def __init__(self, values: list[float]) -> None:
        self.values = values
        self.cache = {"derived": sum(values)}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Record) and other.values == self.values


def reduce_record(record: Record) -> tuple:
    # Drop the derived cache: the file holds only what is needed to rebuild the object.
    return (copyreg.__newobj__, (Record,), {"values": record.values})


def test_unknown_type_is_rejected_by_default(ckpt_dir):
    with Checkpointer(ckpt_dir) as ckpt:
        with pytest.raises(TypeError, match=r"state\['r'\].*Record"):
            ckpt.save({"r": Record([1.0])}, step=1)


def test_extra_type_is_deep_copied_at_save_time(ckpt_dir):
    record = Record([1.0, 2.0])
    with Checkpointer(ckpt_dir, extra_types=[Record]) as ckpt:
        ckpt.save({"r": record, "t": torch.ones(2)}, step=1)
        record.values.append(99.0)  # mutating after save() must not reach the file
    with pytest.raises(pickle.UnpicklingError, match="Record"):
        torch.load(ckpt_dir / "step_1.pt", weights_only=True)  # not allowlisted
    with torch.serialization.safe_globals([Record]):
        loaded = asyncckpt.load(ckpt_dir)
    assert loaded["r"] == Record([1.0, 2.0])
    assert loaded["r"].cache == {"derived": 3.0}  # the class's own pickling keeps everything
    assert torch.equal(loaded["t"], torch.ones(2))


def test_extra_type_reducer_controls_the_pickled_form(ckpt_dir):
    with Checkpointer(ckpt_dir, extra_types={Record: reduce_record}) as ckpt:
        ckpt.save({"r": Record([3.0])}, step=1)
    with torch.serialization.safe_globals([Record]):
        loaded = torch.load(ckpt_dir / "step_1.pt", weights_only=True)
    assert loaded["r"].values == [3.0]
    assert not hasattr(loaded["r"], "cache")
    # the reducer applies to this writer's files only, not to pickling in general
    assert Record not in copyreg.dispatch_table


def test_numpy_as_extra_type_stays_numpy_in_the_file(ckpt_dir):
    arr = np.arange(4, dtype=np.float64)
    with Checkpointer(ckpt_dir, extra_types=[np.ndarray]) as ckpt:
        ckpt.save({"a": arr, "same": arr}, step=1)
        arr[:] = -1
    index = (ckpt_dir / "asyncckpt-index.json").read_text()
    assert '"numpy": []' in index  # not recorded as a tensor that load() converts back
    with torch.serialization.safe_globals(
        [np.ndarray, np.dtype, type(np.dtype("f8")),
         (_NP_CORE.multiarray._reconstruct, "numpy._core.multiarray._reconstruct")]
    ):
        loaded = torch.load(ckpt_dir / "step_1.pt", weights_only=True)
    assert isinstance(loaded["a"], np.ndarray)
    assert loaded["a"].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert loaded["same"] is loaded["a"]  # shared references stay shared


@pytest.mark.parametrize(
    ("extra", "error", "match"),
    [
        ([dict], ValueError, "already handled"),
        ([torch.Tensor], ValueError, "already handled"),
        (["Record"], TypeError, "expected a class"),
        ({Record: 3}, TypeError, "reducer must be callable"),
        ([Record, Record], ValueError, "given twice"),
        (Record, TypeError, "list of classes or a mapping"),
    ],
)
def test_extra_types_validation(extra, error, match):
    with pytest.raises(error, match=match):
        CheckpointerConfig(extra_types=extra)


def _snapshot(state):
    plan = plan_snapshot(state)
    pool = BufferPool(1)
    arena = pool.acquire(max(plan.nbytes, 1))
    return take_snapshot(plan, arena), pool


def test_cpu_locations_records_device_tensors_as_cpu():
    """A snapshot copied from an accelerator is recorded as 'cpu' when cpu_locations is set.

    There is no GPU on CI, so the snapshot's device record is set by hand, as take_snapshot sets
    it for a CUDA tensor.
    """
    snap, pool = _snapshot({"w": torch.arange(6.0)})
    (storage,) = [k for k in snap._keepalive if isinstance(k, torch.UntypedStorage)]
    snap.locations[storage._cdata] = "cuda:0"

    def locations(cpu: bool) -> set[str]:
        out = io.BytesIO()
        serialize(snap, out.write, cpu_locations=cpu, torch_crc32=True)  # zipfile checks CRCs
        with zipfile.ZipFile(io.BytesIO(out.getvalue())) as z:
            pkl = next(z.read(n) for n in z.namelist() if n.endswith("data.pkl"))
        return {loc for loc in ("cuda:0", "cpu") if loc.encode() in pkl}

    assert locations(False) == {"cuda:0"}
    assert locations(True) == {"cpu"}
    pool.close()


def test_supersedes_deletes_a_file_the_index_does_not_list(ckpt_dir):
    os.makedirs(ckpt_dir)
    (ckpt_dir / "epoch_1.pth").write_bytes(b"written by another tool")
    with Checkpointer(ckpt_dir) as ckpt:
        ckpt.save({"t": torch.zeros(1)}, step=2, name="epoch_2.pth",
                  supersedes=["epoch_1.pth", "never_existed.pth"]).wait()
    assert folder_files(ckpt_dir) == {"epoch_2.pth"}


def test_failed_save_leaves_an_unlisted_superseded_file(wrapped, ckpt_dir):
    import errno

    from asyncckpt import WriterError

    os.makedirs(ckpt_dir)
    (ckpt_dir / "old.pth").write_bytes(b"x")
    wrapped.fail_write = lambda name, attempt: OSError(errno.EIO, "boom") if name == "new.pth" \
        else None
    with pytest.raises(WriterError):
        with Checkpointer(wrapped) as ckpt:
            ckpt.save({"t": torch.zeros(1)}, step=1, name="new.pth", supersedes=["old.pth"])
    assert folder_files(ckpt_dir) == {"old.pth"}


def test_extra_types_survive_dataclasses_replace():
    import dataclasses

    config = CheckpointerConfig(extra_types={Record: reduce_record, np.ndarray: None})
    again = dataclasses.replace(config, queue_size=2)
    assert again.extra_types == config.extra_types == ((Record, reduce_record), (np.ndarray, None))
