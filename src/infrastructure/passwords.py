"""Password hashing with scrypt (memory-hard, stdlib), parameters kept in the encoded string."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets

_SCHEME = "scrypt"
# Bounds on what an encoded string may ask for, so a planted hash cannot make verify() eat the host.
_MAX_N = 2**20
_MAX_R = 32
_MAX_P = 16
_MAX_MEMORY = 256 * 1024 * 1024


def _memory(n: int, r: int, p: int) -> int:
    # What OpenSSL's scrypt needs (128·r·(n + p + 2)), plus slack for its own bookkeeping.
    return 128 * r * (n + p + 2) + 1024 * 1024


class ScryptHasher:
    """``scrypt$<n>$<r>$<p>$<salt b64>$<hash b64>``; implements :class:`commands.ports.PasswordHasher`."""

    def __init__(self, n: int = 2**14, r: int = 8, p: int = 1, salt_bytes: int = 16, key_bytes: int = 32):
        if not _valid_params(n, r, p):
            raise ValueError("scrypt parameters out of range (n a power of two, within the bounds)")
        self.n, self.r, self.p = n, r, p
        self.salt_bytes, self.key_bytes = salt_bytes, key_bytes

    def hash(self, password: str) -> str:
        salt = secrets.token_bytes(self.salt_bytes)
        digest = _scrypt(password, salt, self.n, self.r, self.p, self.key_bytes)
        return "$".join((_SCHEME, str(self.n), str(self.r), str(self.p), _b64(salt), _b64(digest)))

    def verify(self, password: str, encoded: str) -> bool:
        parsed = _parse(encoded)
        if parsed is None:
            return False
        n, r, p, salt, expected = parsed
        return hmac.compare_digest(_scrypt(password, salt, n, r, p, len(expected)), expected)

    def needs_rehash(self, encoded: str) -> bool:
        """True when ``encoded`` was made with other parameters than this hasher's."""
        parsed = _parse(encoded)
        return parsed is None or parsed[:3] != (self.n, self.r, self.p) or len(parsed[4]) != self.key_bytes


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=_memory(n, r, p), dklen=length)


def _valid_params(n: int, r: int, p: int) -> bool:
    return (
        1 < n <= _MAX_N
        and n & (n - 1) == 0
        and 1 <= r <= _MAX_R
        and 1 <= p <= _MAX_P
        and _memory(n, r, p) <= _MAX_MEMORY
    )


def _parse(encoded: object) -> tuple[int, int, int, bytes, bytes] | None:
    if not isinstance(encoded, str):
        return None
    parts = encoded.split("$")
    if len(parts) != 6 or parts[0] != _SCHEME:
        return None
    if not all(part.isascii() and part.isdigit() for part in parts[1:4]):
        return None
    try:
        n, r, p = (int(part) for part in parts[1:4])
        salt = base64.b64decode(parts[4], validate=True)
        digest = base64.b64decode(parts[5], validate=True)
    except (ValueError, binascii.Error):
        return None
    if not _valid_params(n, r, p) or not salt or not 16 <= len(digest) <= 64:
        return None
    return n, r, p, salt, digest


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
