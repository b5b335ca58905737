"""Encrypt stage: an optional transform between serialize and store (``encryption=``).

The serialized torch.save stream is cut into fixed-size plaintext chunks, each sealed on its own,
so memory stays bounded by a few chunks whatever the checkpoint size, and the index checksum is
taken over the stored (encrypted) bytes so ``verify`` needs no key::

    serialize (worker thread) ──plaintext──▶ Sealer.write ──header, sealed chunks──▶ storage.write
                                             (same thread)  (xxh3-128 of what is stored)

File format, version 1 (all integers big-endian)::

    header (64 bytes)
      0  magic       8   b"ACKPTENC"
      8  version     1   1
      9  mode        1   1 = AES-GCM, 2 = AES-CBC + HMAC-SHA256 (encrypt-then-MAC)
     10  key length  1   16, 24 or 32 (AES-128/192/256)
     11  reserved    1   0
     12  chunk size  4   plaintext bytes per chunk (a multiple of 16)
     16  salt       32   random per file
     48  key check  16   HMAC-SHA256(check key, header[0:48])[:16]
    chunk i, for i = 0, 1, ... (every chunk holds ``chunk size`` plaintext bytes except the final
    one, which holds 0..chunk size bytes; there is always exactly one final chunk)
      AES-GCM:  ciphertext || tag(16)
                nonce = nonce base XOR i, AAD = header || i (8 bytes) || final (1 byte)
      AES-CBC:  iv(16, random) || ciphertext (PKCS7-padded) || tag(32)
                tag = HMAC-SHA256(mac key, header || i || final || iv || ciphertext)

Per-file keys come from HKDF-SHA256 over the user's key with the header's salt (info binds the
format version, mode and key length): the AES key, then the GCM nonce base or the CBC MAC key,
then the header check key. A fresh salt gives every file fresh keys, so nonces never repeat
across files under one user key. Authenticated: the header (via the key check and as AAD of every
chunk), every chunk's bytes, its position and whether it is the last one, so flipped bytes,
reordered, dropped, duplicated or truncated chunks and appended bytes are all detected. Not
hidden: the plaintext length (to within a chunk's padding), the mode and key length.

``Sealer`` and ``Opener`` are blocking; run them in a worker thread.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from .._errors import DecryptionError
from .hashing import Hasher

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "HEADER_SIZE",
    "MAGIC",
    "EncMode",
    "Encryption",
    "Opener",
    "Sealer",
    "check_key",
    "check_mode",
    "is_encrypted",
]

EncMode = Literal["AES-GCM", "AES-CBC"]

MAGIC = b"ACKPTENC"
HEADER_SIZE = 64
DEFAULT_CHUNK_SIZE = 1 << 20
MAX_CHUNK_SIZE = 64 << 20  # a reader allocates one chunk: bound what a header may ask for
_VERSION = 1
_MODE_IDS: dict[str, int] = {"AES-GCM": 1, "AES-CBC": 2}
_MODE_NAMES = {v: k for k, v in _MODE_IDS.items()}
_KEY_LENGTHS = (16, 24, 32)
_GCM_TAG = 16
_CBC_IV = 16
_CBC_TAG = 32
_CHECK_LEN = 16
_INSTALL_HINT = "encryption needs the 'cryptography' package: pip install 'asyncckpt[crypto]'"


def _require_cryptography() -> None:
    try:
        import cryptography  # noqa: F401
    except ImportError as exc:  # pragma: no cover - the test extra installs it
        raise ImportError(_INSTALL_HINT) from exc


def check_key(key: object, what: str = "key") -> bytes:
    """Validate an AES key (16, 24 or 32 bytes) and return it as ``bytes``.

    Raises:
        TypeError: ``key`` is not bytes-like (a ``str`` is refused: encode it deliberately).
        ValueError: it has the wrong length.
    """
    if not isinstance(key, (bytes, bytearray, memoryview)):
        raise TypeError(f"{what} must be bytes, got {type(key).__name__}")
    raw = bytes(key)
    if len(raw) not in _KEY_LENGTHS:
        raise ValueError(
            f"{what} must be 16, 24 or 32 bytes (AES-128/192/256), got {len(raw)} bytes"
        )
    return raw


def check_mode(mode: object, what: str = "mode") -> EncMode:
    """Validate an encryption mode name (``'AES-GCM'`` or ``'AES-CBC'``).

    Raises:
        TypeError: ``mode`` is not a str.
        ValueError: it names another mode.
    """
    if not isinstance(mode, str):
        raise TypeError(f"{what} must be a str, got {type(mode).__name__}")
    if mode not in get_args(EncMode):
        raise ValueError(f"{what} must be 'AES-GCM' or 'AES-CBC', got {mode!r}")
    return mode  # type: ignore[return-value]


@dataclass(frozen=True)
class Encryption:
    """Encrypt checkpoints at rest: ``Checkpointer(dir, encryption=Encryption(key))``.

    Args:
        key: 16, 24 or 32 random bytes (AES-128/192/256). Never written anywhere; keep it safe,
            a checkpoint cannot be read without it.
        mode: ``"AES-GCM"`` (default; authenticated) or ``"AES-CBC"`` (authenticated with an
            HMAC-SHA256 over each chunk, encrypt-then-MAC).
        chunk_size: plaintext bytes sealed at a time (a multiple of 16, at most 64 MiB); the
            writer holds a few chunks in memory.

    Raises:
        TypeError, ValueError: an argument is invalid.
        ImportError: the ``cryptography`` package is not installed.
    """

    key: bytes = field(repr=False)
    mode: EncMode = "AES-GCM"
    chunk_size: int = DEFAULT_CHUNK_SIZE

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", check_key(self.key, "encryption key"))
        check_mode(self.mode, "encryption mode")
        size = self.chunk_size
        if isinstance(size, bool) or not isinstance(size, int):
            raise TypeError(f"chunk_size must be an int, got {type(size).__name__}")
        if not (16 <= size <= MAX_CHUNK_SIZE and size % 16 == 0):
            raise ValueError(
                f"chunk_size must be a multiple of 16 between 16 and {MAX_CHUNK_SIZE}, got {size}"
            )
        _require_cryptography()

    def sealer(self, emit: Callable[[bytes], None]) -> Sealer:
        """A sink that encrypts what is written to it and passes the stored bytes to ``emit``."""
        return Sealer(self, emit)


def is_encrypted(head: bytes) -> bool:
    """Whether a file starting with ``head`` has an asyncckpt encryption header."""
    return head[: len(MAGIC)] == MAGIC


@dataclass(frozen=True)
class _Keys:
    aes: bytes
    extra: bytes  # GCM: 12-byte nonce base; CBC: 32-byte MAC key
    check: bytes


def _derive(key: bytes, salt: bytes, mode_id: int) -> _Keys:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    extra = 12 if mode_id == _MODE_IDS["AES-GCM"] else 32
    info = b"asyncckpt/encryption" + bytes([_VERSION, mode_id, len(key)])
    okm = HKDF(algorithm=hashes.SHA256(), length=len(key) + extra + 32, salt=salt,
               info=info).derive(key)
    return _Keys(okm[: len(key)], okm[len(key) : len(key) + extra], okm[len(key) + extra :])


def _check_tag(keys: _Keys, head: bytes) -> bytes:
    return hmac.new(keys.check, head, "sha256").digest()[:_CHECK_LEN]


def _position(index: int, final: bool) -> bytes:
    return index.to_bytes(8, "big") + (b"\x01" if final else b"\x00")


class _Cipher:
    """Seal / open one chunk for a given header (mode-specific part of the format)."""

    def __init__(self, mode_id: int, keys: _Keys, header: bytes) -> None:
        self.mode_id = mode_id
        self._keys = keys
        self._header = header
        if mode_id == _MODE_IDS["AES-GCM"]:
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM

            self._gcm: Any = AESGCM(keys.aes)

    def overhead(self, plain_len: int) -> int:
        """Stored bytes minus plaintext bytes for a chunk of ``plain_len`` bytes."""
        if self.mode_id == _MODE_IDS["AES-GCM"]:
            return _GCM_TAG
        return _CBC_IV + (16 - plain_len % 16) + _CBC_TAG

    def _nonce(self, index: int) -> bytes:
        base = int.from_bytes(self._keys.extra, "big")
        return (base ^ index).to_bytes(12, "big")

    def _mac(self, position: bytes, iv: Any, ciphertext: Any) -> Any:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives import hmac as chmac

        mac = chmac.HMAC(self._keys.extra, hashes.SHA256())
        for part in (self._header, position, iv, ciphertext):
            mac.update(part)
        return mac

    def seal(self, plain: Any, index: int, final: bool) -> bytes:
        position = _position(index, final)
        if self.mode_id == _MODE_IDS["AES-GCM"]:
            return bytes(self._gcm.encrypt(self._nonce(index), plain, self._header + position))
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        iv = os.urandom(_CBC_IV)
        view = memoryview(plain).cast("B")
        whole = len(view) - len(view) % 16
        pad = 16 - len(view) % 16  # PKCS7: 1..16 bytes, each holding the pad length
        encryptor = Cipher(algorithms.AES(self._keys.aes), modes.CBC(iv)).encryptor()
        ciphertext = (
            encryptor.update(view[:whole])
            + encryptor.update(bytes(view[whole:]) + bytes([pad]) * pad)
            + encryptor.finalize()
        )
        return iv + ciphertext + self._mac(position, iv, ciphertext).finalize()

    def open(self, sealed: Any, index: int, final: bool) -> bytes:
        """Authenticate and decrypt one chunk (any bytes-like object).

        Raises:
            ValueError: the chunk does not authenticate (the caller words the error).
        """
        position = _position(index, final)
        from cryptography.exceptions import InvalidSignature, InvalidTag

        if self.mode_id == _MODE_IDS["AES-GCM"]:
            try:
                return bytes(self._gcm.decrypt(self._nonce(index), sealed, self._header + position))
            except InvalidTag:
                raise ValueError("authentication failed") from None
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        view = memoryview(sealed).cast("B")
        if len(view) < _CBC_IV + 16 + _CBC_TAG or (len(view) - _CBC_IV - _CBC_TAG) % 16:
            raise ValueError("a chunk has an impossible length")
        iv, ciphertext, tag = view[:_CBC_IV], view[_CBC_IV:-_CBC_TAG], view[-_CBC_TAG:]
        try:  # encrypt-then-MAC: nothing is decrypted before the MAC checks out
            self._mac(position, iv, ciphertext).verify(bytes(tag))
        except InvalidSignature:
            raise ValueError("authentication failed") from None
        decryptor = Cipher(algorithms.AES(self._keys.aes), modes.CBC(bytes(iv))).decryptor()
        padded = decryptor.update(ciphertext) + decryptor.finalize()
        pad = padded[-1]
        if not 1 <= pad <= 16 or padded[-pad:] != bytes([pad]) * pad:
            raise ValueError("bad padding")  # unreachable once the MAC matched
        return padded[:-pad]


class Sealer:
    """Encrypting sink: ``write`` plaintext in pieces of any size, then ``finish``.

    Every chunk but the last is sealed as soon as a byte beyond it arrives (the final flag must be
    right), so at most one chunk of plaintext is held. The header and sealed chunks go to ``emit``
    in order; :meth:`finish` returns the stored size and checksum for the index.
    """

    def __init__(self, encryption: Encryption, emit: Callable[[bytes], None]) -> None:
        self._emit = emit
        self._hasher = Hasher()
        self._size = 0
        self._chunk = encryption.chunk_size
        mode_id = _MODE_IDS[encryption.mode]
        key = encryption.key
        salt = os.urandom(32)
        head = (
            MAGIC
            + bytes([_VERSION, mode_id, len(key), 0])
            + self._chunk.to_bytes(4, "big")
            + salt
        )
        keys = _derive(key, salt, mode_id)
        header = head + _check_tag(keys, head)
        self._cipher = _Cipher(mode_id, keys, header)
        self._pending = bytearray()
        self._index = 0
        self._finished = False
        self._out(header)

    def _out(self, data: bytes) -> None:
        self._hasher.update(data)
        self._size += len(data)
        self._emit(data)

    def _seal(self, plain: Any, final: bool) -> None:
        sealed = self._cipher.seal(plain, self._index, final)
        self._index += 1
        self._out(sealed)

    def write(self, data: Any) -> None:
        """Take the next plaintext bytes (any bytes-like object)."""
        if self._finished:
            raise ValueError("write() after finish()")
        view = memoryview(data).cast("B")
        size = self._chunk
        while view.nbytes:
            if len(self._pending) == size:  # more data follows: the held chunk is not final
                self._seal(self._pending, final=False)
                self._pending.clear()
            if not self._pending and view.nbytes > size:  # whole chunks straight from the input
                self._seal(view[:size], final=False)
                view = view[size:]
                continue
            take = min(size - len(self._pending), view.nbytes)
            self._pending += view[:take]
            view = view[take:]

    def finish(self) -> tuple[int, str]:
        """Seal the final chunk; return ``(stored size, checksum of the stored bytes)``."""
        if not self._finished:
            self._finished = True
            self._seal(self._pending, final=True)
            self._pending = bytearray()
        return self._size, self._hasher.hexdigest()


class Opener:
    """Decrypting reader: ``feed`` the stored bytes in pieces of any size, then ``finish``.

    Args:
        key: the key the file was encrypted with.
        mode: the expected mode, or None to accept the one the header names.
        where: the file's path/URI, for error messages.

    Raises:
        TypeError, ValueError: ``key`` or ``mode`` is invalid (checked before reading anything).
        DecryptionError (from ``feed`` / ``finish``): the file is not encrypted, was encrypted
            with another key or mode, or was modified or truncated.
    """

    def __init__(self, key: object, mode: object = None, *, where: str = "checkpoint") -> None:
        self._key = check_key(key, "dec_key")
        self._mode = None if mode is None else check_mode(mode, "dec_mode")
        _require_cryptography()
        self._where = where
        self._buf = bytearray()
        self._cipher: _Cipher | None = None
        self._sealed_size = 0
        self._index = 0
        self._parts: list[bytes] = []

    def _fail(self, why: str) -> DecryptionError:
        return DecryptionError(f"cannot decrypt {self._where}: {why}")

    def _read_header(self) -> _Cipher:
        header = bytes(self._buf[:HEADER_SIZE])
        del self._buf[:HEADER_SIZE]
        if not is_encrypted(header):
            raise self._fail("it is not an asyncckpt-encrypted file (no encryption header)")
        version, mode_id, key_len, _ = header[8:12]
        if version != _VERSION:
            raise self._fail(f"encryption format version {version} is not supported")
        if mode_id not in _MODE_NAMES or key_len not in _KEY_LENGTHS:
            raise self._fail("the encryption header is damaged (unknown mode or key length)")
        mode = _MODE_NAMES[mode_id]
        if self._mode is not None and self._mode != mode:
            raise self._fail(f"it was encrypted with {mode}, but dec_mode={self._mode!r}")
        if key_len != len(self._key):
            raise self._fail(
                f"it was encrypted with a {key_len}-byte key, but dec_key has {len(self._key)} "
                "bytes: wrong key"
            )
        chunk = int.from_bytes(header[12:16], "big")
        if not (16 <= chunk <= MAX_CHUNK_SIZE and chunk % 16 == 0):
            raise self._fail("the encryption header is damaged (bad chunk size)")
        keys = _derive(self._key, header[16:48], mode_id)
        if not hmac.compare_digest(_check_tag(keys, header[:48]), header[48:HEADER_SIZE]):
            raise self._fail("wrong dec_key, or the encryption header was modified")
        cipher = _Cipher(mode_id, keys, header)
        self._sealed_size = chunk + cipher.overhead(chunk)
        return cipher

    def _open(self, cipher: _Cipher, sealed: Any, final: bool) -> None:
        try:
            self._parts.append(cipher.open(sealed, self._index, final))
        except ValueError:
            what = "the last chunk" if final else f"chunk {self._index}"
            raise self._fail(
                f"{what} failed authentication: the file was modified, truncated or reordered"
            ) from None
        self._index += 1

    def feed(self, data: Any) -> None:
        """Take the next stored bytes; decrypt every chunk that is known not to be the last."""
        self._buf += memoryview(data).cast("B")
        cipher = self._cipher
        if cipher is None:
            if len(self._buf) < HEADER_SIZE:
                return
            cipher = self._cipher = self._read_header()
        size = self._sealed_size
        start = 0
        with memoryview(self._buf) as view:
            # A byte beyond a chunk exists, so that chunk is not the final one.
            while len(view) - start > size:
                self._open(cipher, view[start : start + size], final=False)
                start += size
        del self._buf[:start]

    def finish(self) -> bytes:
        """Decrypt the final chunk and return the whole plaintext.

        Raises:
            DecryptionError: the stream ended early, or the final chunk does not authenticate.
        """
        if self._cipher is None:
            if len(self._buf) >= len(MAGIC) and not is_encrypted(bytes(self._buf)):
                raise self._fail("it is not an asyncckpt-encrypted file (no encryption header)")
            raise self._fail("the file ends inside the encryption header (truncated)")
        if not self._buf:
            raise self._fail("the file ends before its final chunk (truncated)")
        sealed, self._buf = self._buf, bytearray()
        self._open(self._cipher, sealed, final=True)
        parts, self._parts = self._parts, []
        return b"".join(parts)
