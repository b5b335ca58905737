"""Multi-rank checkpoints on S3, with real gloo ranks and a moto S3 server over HTTP: save on 2
ranks with rotation, best and latest; ``load_into`` on 2 and 1 ranks, ``asyncckpt.load``,
``verify`` and ``asyncckpt ls``; a storage failure on one rank; a rank killed mid-save."""

from __future__ import annotations

import json
import random
import time

import pytest
import torch
from support import dist_front as df
from support import dist_s3
from support import dist_support as ds
from support.s3fixtures import BUCKET, REGION, object_keys, pending_uploads

import asyncckpt
from asyncckpt._cli import main

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:torch")

OPTIONS = {"keep_last": 2, "best": {"loss": "less"}}
INDEX = "asyncckpt-index.json"


def rank_options(endpoint: str) -> dict[str, object]:
    """What a rank needs to reach the moto server (ranks do not inherit the test's env)."""
    return {"endpoint_url": endpoint, "key": "testing", "secret": "testing",
            "client_kwargs": {"region_name": REGION}, "retry_backoff": 0.01}


def _assert_same(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    assert sorted(expected) == sorted(got)
    for key, value in expected.items():
        assert torch.equal(value, got[key]), key


def _folders(s3_client, prefix: str) -> set[str]:
    """The top-level names under ``prefix/`` that hold objects."""
    return {k[len(prefix) + 1:].split("/")[0] for k in object_keys(s3_client, prefix + "/")}


@pytest.fixture(scope="module")
def saved(moto_endpoint, s3_client):
    """A DDP model + Adam saved at steps 1, 2, 3 on 2 ranks into S3 (keep_last=2; step 2 has
    the best loss)."""
    prefix = f"dist-{random.randrange(1 << 30):x}"
    uri = f"s3://{BUCKET}/{prefix}"
    options = rank_options(moto_endpoint)
    results = ds.run(2, df.scenario_ddp_checkpointer, uri, [1, 2, 3],
                     {**OPTIONS, "storage_options": options})
    return uri, prefix, options, results


def test_two_ranks_save_to_s3_with_rotation_best_and_latest(saved, s3_client):
    uri, prefix, _, results = saved
    for r in results:
        assert [i.name for i in r["infos"]] == ["step_1", "step_2", "step_3"]
        assert [c.name for c in r["listed"]] == ["step_2", "step_3"]  # step_1 rotated away
        assert r["listed"] == results[0]["listed"]
        assert r["latest"].name == "step_3" and r["best"].name == "step_2"
        assert all(c.kind == "dcp" and c.world_size == 2 for c in r["listed"])
        assert r["listed"][-1].uri == f"{uri}/step_3"
    # the rotated checkpoint's objects are gone; nothing but the listed ones and the index
    assert _folders(s3_client, prefix) == {INDEX, "last_checkpoint", "step_2", "step_3"}
    keys = object_keys(s3_client, f"{prefix}/step_3/")
    assert sorted(k.rsplit("/", 1)[1] for k in keys) == [
        ".asyncckpt.json", ".metadata", "__0_0.distcp", "__1_0.distcp"]
    entry = json.loads(s3_client.get_object(Bucket=BUCKET, Key=f"{prefix}/{INDEX}")["Body"]
                       .read())["entries"][-1]
    assert entry["size"] == sum(f[1] for f in entry["files"])
    assert pending_uploads(s3_client, prefix) == []


@pytest.mark.parametrize(("world", "which", "step"), [(2, "latest", 3), (1, "best:loss", 2)])
def test_load_into_from_s3_on_two_ranks_and_on_one(saved, world, which, step):
    uri, _, options, results = saved
    loaded = ds.run(world, dist_s3.scenario_load_into_ddp, uri, which, options)
    for got in loaded:
        _assert_same(results[0]["expected"][step], got["tensors"])
        assert got["step"] == step


def test_load_verify_and_ls_read_multi_rank_checkpoints_on_s3(saved, s3_client, s3_options,
                                                               capsys):
    uri, prefix, _, results = saved
    full = asyncckpt.load(uri, storage_options=s3_options)  # one process, full tensors
    assert full["step"] == 3
    _assert_same(results[0]["expected"][3],
                 ds.flat_tensors({"model": full["model"], "optim": full["optim"]}))
    assert asyncckpt.load(uri, which="best:loss", storage_options=s3_options)["step"] == 2
    report = asyncckpt.verify(uri, load=True, storage_options=s3_options)
    assert report.ok and report.checked == ("step_2", "step_3"), report.problems
    assert main(["ls", uri, "--storage-option", f"endpoint_url={s3_options['endpoint_url']}",
                 "--format", "tsv"]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert [r[0] for r in rows] == ["step_2/", "step_3/"]
    assert "ranks:2" in rows[1][-1] and "latest" in rows[1][-1]


def test_a_changed_object_fails_verify_and_load(moto_endpoint, s3_client, s3_options):
    prefix = f"dist-{random.randrange(1 << 30):x}"
    uri = f"s3://{BUCKET}/{prefix}"
    ds.run(2, df.scenario_ddp_checkpointer, uri, [1],
           {"storage_options": rank_options(moto_endpoint)})
    key = f"{prefix}/step_1/__1_0.distcp"
    data = bytearray(s3_client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    data[-1] ^= 0xFF
    s3_client.put_object(Bucket=BUCKET, Key=key, Body=bytes(data))
    report = asyncckpt.verify(uri, storage_options=s3_options)
    assert [(p.kind, p.name) for p in report.problems] == [("checksum", "step_1")]
    assert "__1_0.distcp" in report.problems[0].message
    with pytest.raises(asyncckpt.IntegrityError, match="__1_0.distcp"):
        asyncckpt.load(uri, storage_options=s3_options)
    s3_client.delete_object(Bucket=BUCKET, Key=key)
    with pytest.raises(asyncckpt.IntegrityError, match="missing"):
        asyncckpt.load(uri, storage_options=s3_options)


def test_a_storage_failure_on_one_rank_fails_the_step_everywhere(moto_endpoint, fault_proxy,
                                                                s3_client, s3_options):
    prefix = f"dist-{random.randrange(1 << 30):x}"
    uri = f"s3://{BUCKET}/{prefix}"
    good = rank_options(moto_endpoint)
    faulty = {**good, "endpoint_url": fault_proxy.endpoint}  # rank 1 goes through the proxy
    fault_proxy.fail_next("403", 100, key_suffix="/step_2/__1_0.distcp")
    results = ds.run(2, dist_s3.scenario_fault, uri, [good, faulty])
    for r in results:
        assert len(r["errors"]) == 1, r
        assert r["errors"][0].startswith("WriterError(DistributedSaveError)"), r
        assert "rank 1" in r["errors"][0] and "step_2" in r["errors"][0]
        assert r["listed"] == ["step_1"] and r["latest"] == "step_1"
    assert fault_proxy.injected["403"] >= 1
    # never listed, and what the failed save wrote was removed at once
    assert [c.name for c in asyncckpt.checkpoints(uri, storage_options=s3_options)] == ["step_1"]
    assert _folders(s3_client, prefix) == {INDEX, "last_checkpoint", "step_1"}
    assert asyncckpt.load(uri, storage_options=s3_options)["n"] == 1
    # what a crash could leave (an object of an unfinished save, an upload in flight) is
    # removed by the next writer to open the folder
    s3_client.put_object(Bucket=BUCKET, Key=f"{prefix}/step_7/__1_0.distcp", Body=b"partial")
    s3_client.create_multipart_upload(Bucket=BUCKET, Key=f"{prefix}/step_8/__0_0.distcp")
    s3_client.put_object(Bucket=BUCKET, Key=f"{prefix}/notes/readme.txt", Body=b"user's")
    listed = ds.run(2, dist_s3.scenario_reopen, uri, 9, good)
    assert listed == [["step_1", "step_9"]] * 2
    assert _folders(s3_client, prefix) == {INDEX, "last_checkpoint", "step_1", "step_9", "notes"}
    assert pending_uploads(s3_client, prefix) == []


def test_a_committed_checkpoint_on_s3_is_never_overwritten(moto_endpoint, s3_client, s3_options):
    uri = f"s3://{BUCKET}/dist-{random.randrange(1 << 30):x}"
    for r in ds.run(2, dist_s3.scenario_resave, uri, rank_options(moto_endpoint)):
        assert len(r["errors"]) == 1 and "never overwritten" in r["errors"][0], r
        assert r["listed"] == ["step_1"]
    assert asyncckpt.load(uri, storage_options=s3_options)["n"] == 1  # the first save's bytes
    assert asyncckpt.verify(uri, storage_options=s3_options).ok


def test_a_folder_rank_0_cannot_open_fails_on_every_rank(moto_endpoint, s3_client):
    uri = "s3://no-such-bucket-asyncckpt/run"
    rank0, rank1 = ds.run(2, dist_s3.scenario_open_error, uri, rank_options(moto_endpoint))
    assert rank0.startswith("StorageError") and "no-such-bucket-asyncckpt" in rank0, rank0
    assert rank1.startswith("CheckpointError") and "rank 0: StorageError" in rank1, rank1


def test_a_peer_dying_after_rank_0_recorded_the_checkpoint_deletes_nothing(moto_endpoint,
                                                                          s3_client):
    # rank 0 may have listed the checkpoint when the outcome broadcast fails: its objects stay
    prefix = f"dist-{random.randrange(1 << 30):x}"
    killed = ds._CTX.Event()
    ranks = ds.Ranks(2, dist_s3.scenario_peer_dies_after_record, f"s3://{BUCKET}/{prefix}",
                     rank_options(moto_endpoint), killed)
    assert ranks.next_event() == (0, "recorded")
    ranks.kill(1)
    killed.set()
    outcome = ranks.wait([0])[0]
    assert outcome.startswith("CheckpointGroupError"), outcome
    keys = object_keys(s3_client, f"{prefix}/step_1/")
    assert sorted(k.rsplit("/", 1)[1] for k in keys) == [
        ".asyncckpt.json", ".metadata", "__0_0.distcp", "__1_0.distcp"]


KILL_TIMEOUT = 10.0


def test_sigkill_of_a_rank_mid_save_lists_nothing_partial(moto_endpoint, s3_client, s3_options):
    rng = random.Random(2468)
    options = rank_options(moto_endpoint)
    for run in range(3):
        prefix = f"dist-kill-{run}-{random.randrange(1 << 30):x}"
        uri = f"s3://{BUCKET}/{prefix}"
        ranks = ds.Ranks(2, dist_s3.scenario_save_forever, uri, KILL_TIMEOUT, options)
        for _ in range(rng.randint(1, 4)):
            ranks.next_event()
        victim = rng.randrange(2)
        time.sleep(rng.uniform(0, 0.05))  # picks the instant; nothing waits on it
        ranks.kill(victim)
        survivor = ranks.wait([1 - victim])[1 - victim]
        assert isinstance(survivor, str), survivor
        assert survivor.startswith(("WriterError(CheckpointGroupError)",
                                    "WriterError(DistributedSaveError)")), survivor
        listed = asyncckpt.checkpoints(uri, storage_options=s3_options)
        assert listed, "the run committed something before the kill"
        assert asyncckpt.verify(uri, storage_options=s3_options).ok
        for info in listed:
            full = asyncckpt.load(uri, which=info.step, storage_options=s3_options)
            expected = ds.plain_state(info.step, ds.KILL_KEYS, ds.KILL_ROWS)
            assert full["n"] == info.step
            for key in ds.KILL_KEYS:
                assert torch.equal(full[key], expected[key]), (info.name, key)
        # the next open removes whatever the killed save left
        names = ds.run(2, dist_s3.scenario_reopen, uri, 10_000, options)[0]
        assert _folders(s3_client, prefix) == {INDEX, "last_checkpoint", *names}
        assert pending_uploads(s3_client, prefix) == []


def test_other_fsspec_stores_are_refused_for_multi_rank_checkpoints():
    for message in ds.run(2, dist_s3.scenario_refuses_other_stores, "memory://dist-run"):
        assert message.startswith("ValueError: multi-rank checkpoints"), message
        assert "memory://dist-run" in message and "s3://" in message
