"""Encryption at rest: the sealed stream format, round trips, tamper and misuse detection."""

from __future__ import annotations

import json
import os
import shutil
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support.helpers import tensors_equal

import asyncckpt
from asyncckpt import (
    AsyncCheckpointer,
    Checkpointer,
    CheckpointerConfig,
    DecryptionError,
    Encryption,
    IntegrityError,
)
from asyncckpt._format.crypto import HEADER_SIZE, Opener, Sealer
from asyncckpt._format.hashing import checksum_of

KEY = bytes(range(32))
CHUNK = 1024  # small chunks, so a few-KiB state spans several of them


def state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(40, 40, generator=g),  # 6.4 KB: several chunks
        "marker": torch.full((64,), 7.25),  # a byte pattern to look for in the stored file
        "step": seed,
        "name": "run",
    }


def seal(data: bytes, enc: Encryption, pieces: list[int] | None = None) -> bytes:
    out: list[bytes] = []
    sealer = Sealer(enc, out.append)
    view, pos = memoryview(data), 0
    for n in pieces or [len(data)]:
        sealer.write(view[pos : pos + n])
        pos += n
    sealer.write(view[pos:])
    size, checksum = sealer.finish()
    stored = b"".join(out)
    assert size == len(stored) and checksum == checksum_of(stored)
    return stored


def open_sealed(stored: bytes, key: bytes = KEY, mode: str | None = None,
                step: int = 997) -> bytes:
    opener = Opener(key, mode)
    for i in range(0, len(stored), step):
        opener.feed(stored[i : i + step])
    return opener.finish()


def sealed_sizes(enc: Encryption, plain_len: int) -> list[int]:
    """The stored length of each chunk for a plaintext of plain_len bytes."""
    full, rest = divmod(plain_len, enc.chunk_size)
    if rest == 0 and full:
        full, rest = full - 1, enc.chunk_size
    lens = [enc.chunk_size] * full + [rest]
    if enc.mode == "AES-GCM":
        return [n + 16 for n in lens]
    return [16 + (n // 16 + 1) * 16 + 32 for n in lens]


# -- the stream format --------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["AES-GCM", "AES-CBC"])
@pytest.mark.parametrize("length", [0, 1, 15, 16, 1023, 1024, 1025, 2048, 5000])
def test_seal_open_round_trip_at_chunk_boundaries(mode, length):
    enc = Encryption(KEY, mode, chunk_size=CHUNK)
    data = os.urandom(length)
    stored = seal(data, enc)
    assert len(stored) == HEADER_SIZE + sum(sealed_sizes(enc, length))
    assert open_sealed(stored) == data


@settings(max_examples=40, deadline=None)
@given(
    mode=st.sampled_from(["AES-GCM", "AES-CBC"]),
    length=st.integers(0, 3 * 64 + 5),
    cuts=st.lists(st.integers(0, 80), max_size=8),
    read_step=st.integers(1, 300),
)
def test_any_write_and_read_partition_gives_the_same_bytes(mode, length, cuts, read_step):
    enc = Encryption(KEY[:16], mode, chunk_size=64)
    data = bytes((i * 31 + 7) % 251 for i in range(length))
    stored = seal(data, enc, cuts)
    assert len(stored) == HEADER_SIZE + sum(sealed_sizes(enc, length))
    assert open_sealed(stored, KEY[:16], step=read_step) == data


def test_sealer_emits_bounded_pieces_and_fresh_keys_per_file():
    enc = Encryption(KEY, chunk_size=CHUNK)
    pieces: list[bytes] = []
    sealer = Sealer(enc, pieces.append)
    sealer.write(os.urandom(50 * CHUNK + 3))  # one large write, as a zero-copy tensor view is
    sealer.finish()
    assert len(pieces[0]) == HEADER_SIZE
    assert max(len(p) for p in pieces[1:]) == CHUNK + 16
    data = b"same plaintext" * 100
    a, b = seal(data, enc), seal(data, enc)
    assert a[16:48] != b[16:48]  # random salt: fresh per-file keys and nonces
    assert a[HEADER_SIZE:] != b[HEADER_SIZE:]


# -- through the checkpointer -------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["AES-GCM", "AES-CBC"])
@pytest.mark.parametrize("key_len", [16, 24, 32])
def test_checkpointer_round_trip(ckpt_dir, mode, key_len):
    key = os.urandom(key_len)
    saved = state(1)
    with Checkpointer(ckpt_dir, encryption=Encryption(key, mode, chunk_size=CHUNK)) as ckpt:
        info = ckpt.save(saved, step=1).wait()
    assert info is not None
    assert tensors_equal(asyncckpt.load(ckpt_dir, dec_key=key), saved)
    assert tensors_equal(asyncckpt.load(ckpt_dir, dec_key=key, dec_mode=mode), saved)
    assert tensors_equal(asyncckpt.load(info.uri, dec_key=key), saved)  # the file on its own


async def test_async_front_door_encrypts_in_a_worker_thread(ckpt_dir):
    threads: list[threading.Thread] = []

    class Recording(Encryption):
        def sealer(self, emit):
            threads.append(threading.current_thread())
            return super().sealer(emit)

    loop_thread = threading.current_thread()
    async with AsyncCheckpointer(ckpt_dir, encryption=Recording(KEY, chunk_size=CHUNK)) as ckpt:
        handle = await ckpt.save(state(2), step=2)
        await handle.committed()
    assert threads and all(t is not loop_thread for t in threads)
    assert asyncckpt.load(ckpt_dir, dec_key=KEY)["step"] == 2


def test_stored_bytes_hide_the_data_and_the_index_never_holds_the_key(ckpt_dir):
    with Checkpointer(ckpt_dir, encryption=Encryption(KEY, chunk_size=CHUNK)) as ckpt:
        ckpt.save(state(3), step=3)
    stored = (ckpt_dir / "step_3.pt").read_bytes()
    marker = torch.full((64,), 7.25).numpy().tobytes()
    assert stored.startswith(b"ACKPTENC") and marker[:16] not in stored
    assert b"data.pkl" not in stored and b"PK\x03\x04" not in stored
    with pytest.raises(Exception):  # noqa: B017 - whatever torch says, it cannot read it
        torch.load(ckpt_dir / "step_3.pt", weights_only=True)
    index_bytes = (ckpt_dir / "asyncckpt-index.json").read_bytes()
    assert KEY not in index_bytes and KEY.hex().encode() not in index_bytes
    entry = json.loads(index_bytes)["entries"][0]
    assert entry["encryption"] == "AES-GCM"
    # The checksum is of the stored bytes: verifiable (and listable) without the key.
    assert entry["checksum"] == checksum_of(stored) and entry["size"] == len(stored)
    assert [c.step for c in asyncckpt.checkpoints(ckpt_dir)] == [3]
    shown = repr(CheckpointerConfig(encryption=Encryption(KEY)))
    assert "AES-GCM" in shown and repr(KEY) not in shown and KEY.hex() not in shown


def test_encrypted_folder_resumes_and_rotates(ckpt_dir):
    enc = Encryption(KEY, "AES-CBC", chunk_size=CHUNK)
    with Checkpointer(ckpt_dir, encryption=enc, keep_last=2) as ckpt:
        for step in (1, 2):
            ckpt.save(state(step), step=step)
    with Checkpointer(ckpt_dir, encryption=enc, keep_last=2) as ckpt:
        ckpt.save(state(3), step=3)
    assert [c.step for c in asyncckpt.checkpoints(ckpt_dir)] == [2, 3]
    assert asyncckpt.load(ckpt_dir, 2, dec_key=KEY)["step"] == 2
    assert sorted(os.listdir(ckpt_dir)) == [
        ".asyncckpt.lock", "asyncckpt-index.json", "last_checkpoint", "step_2.pt", "step_3.pt"
    ]


# -- tampering ----------------------------------------------------------------------------------
@pytest.fixture(params=["AES-GCM", "AES-CBC"])
def sealed_file(request, tmp_path):
    """An encrypted checkpoint copied out of its folder (so no index checksum stands in front)."""
    mode = request.param
    folder = tmp_path / "ckpt"
    with Checkpointer(folder, encryption=Encryption(KEY, mode, chunk_size=CHUNK)) as ckpt:
        ckpt.save(state(4), step=4)
    path = tmp_path / "loose.pt"
    shutil.copy(folder / "step_4.pt", path)
    assert asyncckpt.load(path, dec_key=KEY)["step"] == 4
    return path, mode


def chunk_offsets(stored: bytes, mode: str) -> list[int]:
    """Where each sealed chunk of a file written with CHUNK-sized chunks starts."""
    full = CHUNK + (16 if mode == "AES-GCM" else 16 + 16 + 32)
    return list(range(HEADER_SIZE, len(stored), full))


@pytest.mark.parametrize(
    "where",
    ["magic", "version", "mode", "chunk_size", "salt", "key_check", "first_chunk",
     "middle_chunk", "last_chunk_body", "last_byte"],
)
def test_a_flipped_byte_anywhere_is_detected(sealed_file, where):
    path, mode = sealed_file
    data = bytearray(path.read_bytes())
    starts = chunk_offsets(bytes(data), mode)
    assert len(starts) >= 4
    position = {
        "magic": 2, "version": 8, "mode": 9, "chunk_size": 14, "salt": 30, "key_check": 50,
        "first_chunk": HEADER_SIZE + 5, "middle_chunk": starts[len(starts) // 2] + 100,
        "last_chunk_body": starts[-1] + 1, "last_byte": len(data) - 1,
    }[where]
    data[position] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(DecryptionError):
        asyncckpt.load(path, dec_key=KEY)


@pytest.mark.parametrize(
    "cut", ["header_only", "mid_header", "at_chunk_boundary", "mid_chunk", "last_byte",
            "drop_middle_chunk", "swap_chunks", "append"],
)
def test_truncated_reordered_or_extended_files_are_detected(sealed_file, cut):
    path, mode = sealed_file
    data = path.read_bytes()
    starts = chunk_offsets(data, mode)
    full = starts[1] - starts[0]
    a, b = starts[1], starts[2]
    changed = {
        "header_only": data[:HEADER_SIZE],
        "mid_header": data[:HEADER_SIZE - 10],
        "at_chunk_boundary": data[: starts[-1]],
        "mid_chunk": data[: starts[2] + 50],
        "last_byte": data[:-1],
        "drop_middle_chunk": data[:a] + data[a + full :],
        "swap_chunks": data[:a] + data[b : b + full] + data[a:b] + data[b + full :],
        "append": data + b"\x00" * 16,
    }[cut]
    path.write_bytes(changed)
    with pytest.raises(DecryptionError):
        asyncckpt.load(path, dec_key=KEY)


def test_index_checksum_catches_tampering_first_and_without_the_key(ckpt_dir):
    with Checkpointer(ckpt_dir, encryption=Encryption(KEY, chunk_size=CHUNK)) as ckpt:
        ckpt.save(state(5), step=5)
    path = ckpt_dir / "step_5.pt"
    data = bytearray(path.read_bytes())
    data[HEADER_SIZE + 3] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="checksum") as info:
        asyncckpt.load(ckpt_dir, dec_key=KEY)
    assert not isinstance(info.value, DecryptionError)
    with pytest.raises(DecryptionError, match="chunk 0 failed authentication"):
        asyncckpt.load(ckpt_dir, dec_key=KEY, verify=False)


# -- keys and modes -----------------------------------------------------------------------------
def test_wrong_key_wrong_mode_and_missing_key(sealed_file):
    path, mode = sealed_file
    other = "AES-CBC" if mode == "AES-GCM" else "AES-GCM"
    with pytest.raises(DecryptionError, match="wrong dec_key"):
        asyncckpt.load(path, dec_key=bytes(32))
    with pytest.raises(DecryptionError, match="16-byte key|32-byte key"):
        asyncckpt.load(path, dec_key=KEY[:16])
    with pytest.raises(DecryptionError, match=f"encrypted with {mode}, but dec_mode='{other}'"):
        asyncckpt.load(path, dec_key=KEY, dec_mode=other)
    with pytest.raises(DecryptionError, match="is encrypted; pass dec_key"):
        asyncckpt.load(path)


def test_missing_key_for_a_listed_file_names_the_mode(ckpt_dir):
    with Checkpointer(ckpt_dir, encryption=Encryption(KEY, "AES-CBC")) as ckpt:
        ckpt.save(state(), step=1)
    with pytest.raises(DecryptionError, match=r"encrypted \(AES-CBC\); pass dec_key"):
        asyncckpt.load(ckpt_dir)


def test_a_key_for_a_plain_file_is_refused(ckpt_dir):
    with Checkpointer(ckpt_dir) as ckpt:
        ckpt.save(state(), step=1)
    with pytest.raises(DecryptionError, match="not encrypted"):
        asyncckpt.load(ckpt_dir, dec_key=KEY)
    assert asyncckpt.load(ckpt_dir)["step"] == 0


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"dec_key": b"short"}, ValueError, "16, 24 or 32 bytes"),
        ({"dec_key": bytes(33)}, ValueError, "got 33 bytes"),
        ({"dec_key": "a" * 32}, TypeError, "dec_key must be bytes"),
        ({"dec_key": KEY, "dec_mode": "AES-ECB"}, ValueError, "'AES-GCM' or 'AES-CBC'"),
        ({"dec_key": KEY, "dec_mode": 1}, TypeError, "dec_mode must be a str"),
    ],
)
def test_bad_keys_and_modes_are_rejected_before_reading(tmp_path, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        asyncckpt.load(tmp_path / "does-not-exist", **kwargs)  # not found would come later


@pytest.mark.parametrize(
    ("args", "exc", "match"),
    [
        ((b"k" * 15,), ValueError, "got 15 bytes"),
        (("k" * 16,), TypeError, "must be bytes"),
        ((None,), TypeError, "must be bytes"),
        ((KEY, "AES-CTR"), ValueError, "'AES-GCM' or 'AES-CBC'"),
        ((KEY, "AES-GCM", 1000), ValueError, "multiple of 16"),
        ((KEY, "AES-GCM", 0), ValueError, "multiple of 16"),
        ((KEY, "AES-GCM", True), TypeError, "chunk_size must be an int"),
    ],
)
def test_encryption_validation(args, exc, match):
    with pytest.raises(exc, match=match):
        Encryption(*args)


def test_encryption_option_must_be_an_encryption(ckpt_dir):
    with pytest.raises(TypeError, match="asyncckpt.Encryption"):
        Checkpointer(ckpt_dir, encryption=KEY)
    assert Encryption(bytearray(KEY)).key == KEY  # bytes-like keys are copied to bytes
