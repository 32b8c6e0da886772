"""The master keyring: versioned key-encryption keys (KEKs) that wrap the vault's data keys.

Keys come from ``INTEGRATIONS_MASTER_KEY`` (comma-separated base64, 32 bytes each, the first is
active) or, for a zero-config start, from ``<data_dir>/master.key``. A key's id is derived from the
key itself (``sha256(key)[:8]``), so a single-key configuration needs no ids and rotation is
"prepend a new key, run rewrap, drop the old one". Key material never appears in a message, a log
line or a ``repr``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from commands.ports import VaultError
from infrastructure.settings import Settings, SettingsError

log = logging.getLogger("integrations.keys")

ENV_NAME = "INTEGRATIONS_MASTER_KEY"
KEY_FILE = "master.key"
KEY_BYTES = 32
KID_LENGTH = 8
NONCE_BYTES = 12
TAG_BYTES = 16
_FORMAT = b"\x01"
_HEADER_BYTES = len(_FORMAT) + KID_LENGTH


def key_id(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()[:KID_LENGTH]


def generate_key() -> str:
    """A fresh master key, base64 of 32 random bytes (for ``integrations keys rotate``)."""
    return base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode("ascii")


class Keyring:
    """KEKs by id; wraps with the active (first) one and unwraps with whichever a blob names.

    A wrapped blob is ``format(1) | kid(8, ascii) | nonce(12) | ciphertext+tag``; the header is part
    of the associated data, so a blob cannot be relabelled to another key id.
    """

    __slots__ = ("_active", "_ciphers")

    def __init__(self, keys: Iterable[bytes]) -> None:
        ciphers: dict[str, AESGCM] = {}
        active: str | None = None
        for key in keys:
            if len(key) != KEY_BYTES:
                raise SettingsError(f"a master key must be {KEY_BYTES} bytes, got {len(key)}")
            kid = key_id(key)
            ciphers.setdefault(kid, AESGCM(key))  # a repeated key is harmless; keep the first
            active = active or kid
        if active is None:
            raise SettingsError("the master keyring needs at least one key")
        self._ciphers = ciphers
        self._active = active

    @classmethod
    def parse(cls, value: str, source: str = ENV_NAME) -> Keyring:
        """Parse ``"<b64>[,<b64>...]"``; errors name ``source`` and the entry's position only."""
        entries = [entry.strip() for entry in (value or "").strip().split(",")]
        if entries == [""]:
            raise SettingsError(f"{source} is empty: set it to one or more base64 {KEY_BYTES}-byte keys")
        keys: list[bytes] = []
        for position, entry in enumerate(entries, start=1):
            where = f"{source} entry {position} of {len(entries)}"
            if not entry:
                raise SettingsError(f"{where} is empty")
            try:
                key = base64.b64decode(entry, validate=True)
            except (binascii.Error, ValueError):
                # `from None`: the decoder's own message must not travel with the key material.
                raise SettingsError(f"{where} is not valid base64") from None
            if len(key) != KEY_BYTES:
                raise SettingsError(f"{where} decodes to {len(key)} bytes; a master key must be {KEY_BYTES}")
            keys.append(key)
        return cls(keys)

    @property
    def active_kid(self) -> str:
        return self._active

    @property
    def kids(self) -> tuple[str, ...]:
        """All key ids, the active one first."""
        return tuple(self._ciphers)

    def __contains__(self, kid: object) -> bool:
        return kid in self._ciphers

    def __repr__(self) -> str:
        return f"Keyring(active={self._active!r}, kids={list(self._ciphers)!r})"

    @staticmethod
    def blob_kid(blob: bytes) -> str:
        """The id of the key that wrapped ``blob``."""
        if len(blob) < _HEADER_BYTES + NONCE_BYTES + TAG_BYTES or blob[:1] != _FORMAT:
            raise VaultError("wrapped key has an unknown format")
        try:
            return blob[1:_HEADER_BYTES].decode("ascii")
        except UnicodeDecodeError:
            raise VaultError("wrapped key has an unknown format") from None

    def wrap(self, dek: bytes, aad: bytes) -> bytes:
        header = _FORMAT + self._active.encode("ascii")
        nonce = os.urandom(NONCE_BYTES)
        return header + nonce + self._ciphers[self._active].encrypt(nonce, dek, header + aad)

    def unwrap(self, blob: bytes, aad: bytes) -> bytes:
        kid = self.blob_kid(blob)
        cipher = self._ciphers.get(kid)
        if cipher is None:
            raise VaultError(
                f"master key {kid} is not in the keyring (configured: {', '.join(self._ciphers)}); "
                f"add it to {ENV_NAME} to read data wrapped under it"
            )
        header, nonce = blob[:_HEADER_BYTES], blob[_HEADER_BYTES : _HEADER_BYTES + NONCE_BYTES]
        try:
            return cipher.decrypt(nonce, blob[_HEADER_BYTES + NONCE_BYTES :], header + aad)
        except InvalidTag:
            raise VaultError(f"wrapped key under master key {kid} failed authentication") from None


def load_keyring(settings: Settings) -> Keyring:
    """The keyring from ``settings.master_keys``, else from ``<data_dir>/master.key`` (created once)."""
    if settings.master_keys is not None:
        return Keyring.parse(settings.master_keys)
    path = settings.data_dir / KEY_FILE
    if not path.exists():
        _create_key_file(path)
    return _read_key_file(path)


def _read_key_file(path: Path) -> Keyring:
    source = f"{path} (used because {ENV_NAME} is not set)"
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as e:
        raise SettingsError(f"{source} cannot be read: {type(e).__name__}") from None
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        log.warning("master key file %s is accessible to other users (mode %o); chmod 600 it", path, mode)
    return Keyring.parse(text, source=source)


def _create_key_file(path: Path) -> None:
    """Write a new key to a temporary file, then hard-link it into place.

    ``link`` fails if the name exists, so concurrent first starts agree on one key and no reader
    ever sees a half-written file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (generate_key() + "\n").encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return  # another process won the race; its key is the one
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    log.warning(
        "%s is not set: generated a new master key in %s. Back this file up now and keep it apart "
        "from database backups; without it the stored secrets cannot be decrypted.",
        ENV_NAME,
        path,
    )


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # not every filesystem allows fsync on a directory
    finally:
        os.close(fd)
