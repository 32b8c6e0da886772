"""Master keyring (parse, wrap/unwrap, key file) and password hashing. No store involved."""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import stat
import threading
from pathlib import Path

import pytest

from commands.ports import VaultError
from infrastructure.keyring import Keyring, generate_key, key_id, load_keyring
from infrastructure.passwords import ScryptHasher
from infrastructure.settings import Settings, SettingsError
from tests.conftest import TEST_MASTER_KEY

K1 = TEST_MASTER_KEY
K1_BYTES = base64.b64decode(K1)


def kid(b64: str) -> str:
    return hashlib.sha256(base64.b64decode(b64)).hexdigest()[:8]


# -- parse --------------------------------------------------------------------------------------


def test_single_key_is_active_and_its_id_is_derived_from_the_key() -> None:
    ring = Keyring.parse(K1)
    assert ring.active_kid == hashlib.sha256(K1_BYTES).hexdigest()[:8] == key_id(K1_BYTES)
    assert ring.kids == (ring.active_kid,)


def test_first_key_is_active_and_all_are_known() -> None:
    k2 = generate_key()
    ring = Keyring.parse(f" {k2} , {K1}\n")
    assert ring.active_kid == kid(k2)
    assert ring.kids == (kid(k2), kid(K1))


def test_generate_key_gives_distinct_32_byte_keys() -> None:
    a, b = generate_key(), generate_key()
    assert a != b
    assert len(base64.b64decode(a, validate=True)) == 32
    assert Keyring.parse(a).active_kid == kid(a)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("not base64 at all!!", "not valid base64"),
        (base64.b64encode(b"0123456789abcdef").decode(), "16 bytes"),  # AES-128 size: refused
        (base64.b64encode(b"x" * 33).decode(), "33 bytes"),
        ("", "empty"),
        ("   ", "empty"),
        (f"{TEST_MASTER_KEY},,{TEST_MASTER_KEY}", "entry 2 of 3 is empty"),
        (f"{TEST_MASTER_KEY},Zm9v", "entry 2 of 2"),
    ],
)
def test_bad_keys_are_refused_without_echoing_them(value: str, expected: str) -> None:
    with pytest.raises(SettingsError) as info:
        Keyring.parse(value)
    message = str(info.value)
    assert "INTEGRATIONS_MASTER_KEY" in message
    assert expected in message
    for piece in (p.strip() for p in value.split(",")):
        if len(piece) >= 4:
            assert piece not in message
            assert piece not in repr(info.value)
    # the decoder's exception, if any, is not chained into what gets printed
    assert info.value.__cause__ is None
    assert info.value.__context__ is None or info.value.__suppress_context__


def test_repr_shows_ids_not_keys() -> None:
    ring = Keyring.parse(K1)
    text = repr(ring)
    assert ring.active_kid in text
    assert K1 not in text and repr(K1_BYTES) not in text


# -- wrap / unwrap ------------------------------------------------------------------------------


def test_wrap_unwrap_round_trip_and_blob_names_the_key() -> None:
    ring = Keyring.parse(K1)
    dek = os.urandom(32)
    blob = ring.wrap(dek, b"dek|owner|v1")
    assert dek not in blob
    assert Keyring.blob_kid(blob) == ring.active_kid
    assert ring.unwrap(blob, b"dek|owner|v1") == dek
    assert ring.wrap(dek, b"dek|owner|v1") != blob  # fresh nonce every time


def test_unwrap_with_other_aad_or_tampering_fails_closed() -> None:
    ring = Keyring.parse(K1)
    blob = ring.wrap(os.urandom(32), b"dek|a|v1")
    with pytest.raises(VaultError):
        ring.unwrap(blob, b"dek|b|v1")
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(VaultError):
        ring.unwrap(tampered, b"dek|a|v1")
    with pytest.raises(VaultError):
        ring.unwrap(b"\x02" + blob[1:], b"dek|a|v1")
    with pytest.raises(VaultError):
        ring.unwrap(blob[:20], b"dek|a|v1")


def test_relabelling_a_blob_to_another_known_kid_fails() -> None:
    k2 = generate_key()
    ring = Keyring.parse(f"{k2},{K1}")
    blob = ring.wrap(os.urandom(32), b"aad")  # under k2
    relabelled = blob[:1] + kid(K1).encode() + blob[9:]
    with pytest.raises(VaultError):
        ring.unwrap(relabelled, b"aad")


def test_rotation_old_blobs_open_new_blobs_use_new_key() -> None:
    old = Keyring.parse(K1)
    dek = os.urandom(32)
    blob = old.wrap(dek, b"aad")
    k2 = generate_key()
    rotated = Keyring.parse(f"{k2},{K1}")
    assert rotated.unwrap(blob, b"aad") == dek
    assert Keyring.blob_kid(rotated.wrap(dek, b"aad")) == kid(k2)


def test_unknown_kid_names_the_missing_key() -> None:
    blob = Keyring.parse(K1).wrap(os.urandom(32), b"aad")
    other = Keyring.parse(generate_key())
    with pytest.raises(VaultError, match=kid(K1)) as info:
        other.unwrap(blob, b"aad")
    assert K1 not in str(info.value)


# -- load_keyring ----------------------------------------------------------------------------------


def test_load_keyring_prefers_configured_keys(tmp_path: Path) -> None:
    ring = load_keyring(Settings(data_dir=tmp_path, master_keys=K1))
    assert ring.active_kid == kid(K1)
    assert not (tmp_path / "master.key").exists()


def test_load_keyring_creates_key_file_0600_once_and_reuses_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    with caplog.at_level(logging.WARNING, logger="integrations.keys"):
        first = load_keyring(settings)
    path = tmp_path / "data" / "master.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    stored = path.read_text().strip()
    assert first.active_kid == kid(stored)
    warnings = [r for r in caplog.records if r.name == "integrations.keys" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "back" in warnings[0].getMessage().lower() and str(path) in warnings[0].getMessage()
    assert stored not in caplog.text

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="integrations.keys"):
        second = load_keyring(settings)
    assert second.active_kid == first.active_kid
    assert path.read_text().strip() == stored
    assert not caplog.records  # nothing generated the second time
    assert [p.name for p in path.parent.iterdir()] == ["master.key"]  # no temp files left


def test_concurrent_first_starts_agree_on_one_key(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    barrier = threading.Barrier(8)
    kids: list[str] = []

    def start() -> None:
        barrier.wait()
        kids.append(load_keyring(settings).active_kid)

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(kids) == 8 and len(set(kids)) == 1
    assert kids[0] == kid((tmp_path / "master.key").read_text().strip())


def test_malformed_key_file_is_refused(tmp_path: Path) -> None:
    short = base64.b64encode(b"k" * 16).decode()
    (tmp_path / "master.key").write_text(short + "\n")
    with pytest.raises(SettingsError, match=r"master\.key") as info:
        load_keyring(Settings(data_dir=tmp_path))
    assert short not in str(info.value)
    assert (tmp_path / "master.key").read_text() == short + "\n"  # not overwritten


def test_empty_key_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "master.key").write_text("")
    with pytest.raises(SettingsError):
        load_keyring(Settings(data_dir=tmp_path))


# -- passwords ----------------------------------------------------------------------------------


def test_scrypt_hash_encodes_params_and_verifies() -> None:
    hasher = ScryptHasher()
    encoded = hasher.hash("correct horse ☃")
    scheme, n, r, p, salt, digest = encoded.split("$")
    assert (scheme, n, r, p) == ("scrypt", "16384", "8", "1")
    assert len(base64.b64decode(salt)) == 16 and len(base64.b64decode(digest)) == 32
    assert "correct horse" not in encoded
    assert hasher.verify("correct horse ☃", encoded)
    assert not hasher.verify("correct horse", encoded)
    assert not hasher.verify("", encoded)
    assert hasher.hash("correct horse ☃") != encoded  # salted
    assert not hasher.needs_rehash(encoded)


def test_scrypt_verifies_with_the_params_in_the_string() -> None:
    encoded = ScryptHasher(n=2**12, r=4, p=2).hash("pw")
    assert encoded.startswith("scrypt$4096$4$2$")
    assert ScryptHasher().verify("pw", encoded)
    assert ScryptHasher().needs_rehash(encoded)


@pytest.mark.parametrize(
    "encoded",
    [
        "",
        "garbage",
        "scrypt$16384$8$1$c2FsdA==",  # too few parts
        "bcrypt$16384$8$1$c2FsdHNhbHRzYWx0$" + base64.b64encode(b"x" * 32).decode(),
        "scrypt$abc$8$1$c2FsdHNhbHRzYWx0$" + base64.b64encode(b"x" * 32).decode(),
        "scrypt$16383$8$1$c2FsdHNhbHRzYWx0$" + base64.b64encode(b"x" * 32).decode(),  # n not 2^k
        "scrypt$1073741824$8$1$c2FsdHNhbHRzYWx0$" + base64.b64encode(b"x" * 32).decode(),  # DoS n
        "scrypt$16384$8$1$!!!$" + base64.b64encode(b"x" * 32).decode(),
        "scrypt$16384$8$1$c2FsdHNhbHRzYWx0$not-base64",
        "scrypt$16384$8$1$c2FsdHNhbHRzYWx0$" + base64.b64encode(b"x" * 4).decode(),  # short hash
        "scrypt$+16384$8$1$c2FsdHNhbHRzYWx0$" + base64.b64encode(b"x" * 32).decode(),
    ],
)
def test_scrypt_malformed_encodings_verify_false(encoded: str) -> None:
    assert ScryptHasher().verify("pw", encoded) is False


def test_scrypt_a_tampered_hash_fails() -> None:
    hasher = ScryptHasher()
    encoded = hasher.hash("pw")
    head, digest = encoded.rsplit("$", 1)
    raw = bytearray(base64.b64decode(digest))
    raw[0] ^= 1
    assert not hasher.verify("pw", f"{head}${base64.b64encode(bytes(raw)).decode()}")
