"""The secrets vault, on SQLite and on PostgreSQL (every test runs on both via ``settings``)."""

from __future__ import annotations

import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from commands.ports import SecretRef, VaultError
from infrastructure.keyring import Keyring, generate_key
from infrastructure.settings import Settings
from infrastructure.vault import EnvelopeVault, PostgresVault, SqliteVault, open_vault
from tests.conftest import TEST_MASTER_KEY

K1 = TEST_MASTER_KEY
K2 = generate_key()
K3 = generate_key()

VaultFactory = Callable[..., EnvelopeVault]


@pytest.fixture
def make_vault(settings: Settings) -> Iterator[VaultFactory]:
    opened: list[EnvelopeVault] = []

    def make(keys: str = K1) -> EnvelopeVault:
        vault = open_vault(settings, Keyring.parse(keys))
        assert isinstance(vault, EnvelopeVault)
        opened.append(vault)
        return vault

    yield make
    for vault in opened:
        vault.close()


@pytest.fixture
def vault(make_vault: VaultFactory) -> EnvelopeVault:
    return make_vault()


class Raw:
    """Direct access to the vault's tables, to inspect and tamper with stored bytes."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        if settings.postgres is None:
            self.keys, self.secrets, self.param = "vault_keys", "vault_secrets", "?"
        else:
            schema = settings.postgres.schema
            self.keys = f'"{schema}".integrations_vault_keys'
            self.secrets = f'"{schema}".integrations_vault_secrets'
            self.param = "%s"

    def run(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        sql = sql.format(keys=self.keys, secrets=self.secrets).replace("%s", self.param)
        if self.settings.postgres is None:
            conn = sqlite3.connect(self.settings.data_dir / "vault.sqlite", timeout=10)
            try:
                with conn:
                    cursor = conn.execute(sql, params)
                    return [tuple(r) for r in cursor.fetchall()]
            finally:
                conn.close()
        import psycopg

        with psycopg.connect(self.settings.postgres.conninfo()) as conn:
            cursor = conn.execute(sql, params)
            return [tuple(r) for r in cursor.fetchall()] if cursor.description else []

    def secret_row(self, ref: str) -> tuple[Any, ...]:
        (row,) = self.run("SELECT owner_id, field, ciphertext FROM {secrets} WHERE ref = %s", (ref,))
        return row

    def set_ciphertext(self, ref: str, ciphertext: bytes) -> None:
        self.run("UPDATE {secrets} SET ciphertext = %s WHERE ref = %s", (ciphertext, ref))

    def count(self, table: str, owner: uuid.UUID | None = None) -> int:
        if owner is None:
            return self.run(f"SELECT COUNT(*) FROM {{{table}}}")[0][0]
        return self.run(f"SELECT COUNT(*) FROM {{{table}}} WHERE owner_id = %s", (str(owner),))[0][0]

    def stored_bytes(self) -> list[bytes]:
        """Everything the store holds for the vault, as bytes."""
        if self.settings.postgres is None:
            return [p.read_bytes() for p in self.settings.data_dir.iterdir() if p.name.startswith("vault.sqlite")]
        blobs: list[bytes] = []
        for table in ("keys", "secrets"):
            for row in self.run(f"SELECT * FROM {{{table}}}"):
                for value in row:
                    blobs.append(bytes(value) if isinstance(value, bytes | memoryview) else str(value).encode())
        return blobs


@pytest.fixture
def raw(settings: Settings) -> Raw:
    return Raw(settings)


def kid(b64: str) -> str:
    return Keyring.parse(b64).active_kid


def test_backend_matches_settings(vault: EnvelopeVault, backend: str) -> None:
    assert isinstance(vault, SqliteVault if backend == "sqlite" else PostgresVault)


# -- round trip -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "plaintext",
    ["s3cret", "", "päßwörd ☃ 🔑 秘密", "x" * 10_240, "line\nbreak\x00nul"],
    ids=["ascii", "empty", "unicode", "10kb", "control"],
)
def test_seal_open_round_trip(vault: EnvelopeVault, plaintext: str) -> None:
    owner = uuid.uuid4()
    ref = vault.seal(owner, "client_secret", plaintext)
    assert isinstance(ref, SecretRef)
    assert set(ref) == {"ref", "fingerprint"}
    assert len(ref["ref"]) == 32 and int(ref["ref"], 16) >= 0
    assert len(ref["fingerprint"]) == 12 and int(ref["fingerprint"], 16) >= 0
    assert vault.open(owner, "client_secret", ref["ref"]) == plaintext


def test_sealed_secrets_are_durable_across_vault_instances(make_vault: VaultFactory) -> None:
    owner = uuid.uuid4()
    first = make_vault()
    refs = {field: first.seal(owner, field, f"value of {field}")["ref"] for field in ("a", "b", "c")}
    first.close()
    second = make_vault()
    assert {field: second.open(owner, field, ref) for field, ref in refs.items()} == {f: f"value of {f}" for f in refs}


def test_each_seal_gets_a_new_ref_and_owners_are_independent(vault: EnvelopeVault) -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    r1 = vault.seal(a, "token", "one")["ref"]
    r2 = vault.seal(a, "token", "two")["ref"]
    r3 = vault.seal(b, "token", "three")["ref"]
    assert len({r1, r2, r3}) == 3
    assert (vault.open(a, "token", r1), vault.open(a, "token", r2), vault.open(b, "token", r3)) == (
        "one",
        "two",
        "three",
    )


def test_unknown_ref_owner_and_garbage_ref_raise_vault_error(vault: EnvelopeVault) -> None:
    owner = uuid.uuid4()
    ref = vault.seal(owner, "token", "v")["ref"]
    with pytest.raises(VaultError):
        vault.open(owner, "token", uuid.uuid4().hex)
    with pytest.raises(VaultError):
        vault.open(uuid.uuid4(), "token", ref)  # an owner that never sealed anything
    with pytest.raises(VaultError):
        vault.open(owner, "token", "'; DROP TABLE vault_secrets; --")
    assert vault.open(owner, "token", ref) == "v"


def test_plaintext_never_reaches_the_store(vault: EnvelopeVault, raw: Raw) -> None:
    owner = uuid.uuid4()
    secret = f"refresh-Tøken-{uuid.uuid4().hex}"
    ref = vault.seal(owner, "refresh_token", secret)
    vault.seal(owner, "access_token", secret)
    vault.seal(uuid.uuid4(), "client_secret", secret)
    stored = raw.stored_bytes()
    assert stored and sum(len(b) for b in stored) > 0
    needles = [secret.encode("utf-8"), secret.encode("utf-16-le"), secret.split("-")[-1].encode()]
    for blob in stored:
        for needle in needles:
            assert needle not in blob
    assert raw.count("secrets") == 3 and raw.count("keys") == 2
    assert vault.open(owner, "refresh_token", ref["ref"]) == secret


# -- associated data binding (CR-2) ---------------------------------------------------------------


def test_ciphertext_copied_to_another_owner_fails_closed(vault: EnvelopeVault, raw: Raw) -> None:
    alice, bob = uuid.uuid4(), uuid.uuid4()
    a = vault.seal(alice, "client_secret", "alice's secret")["ref"]
    b = vault.seal(bob, "client_secret", "bob's secret")["ref"]
    raw.set_ciphertext(b, bytes(raw.secret_row(a)[2]))
    with pytest.raises(VaultError):
        vault.open(bob, "client_secret", b)
    # and re-pointing alice's row at bob (same ref, same bytes) fails too
    raw.run("UPDATE {secrets} SET owner_id = %s WHERE ref = %s", (str(bob), a))
    with pytest.raises(VaultError):
        vault.open(bob, "client_secret", a)


def test_ciphertext_copied_to_another_field_or_ref_fails_closed(vault: EnvelopeVault, raw: Raw) -> None:
    owner = uuid.uuid4()
    secret = vault.seal(owner, "client_secret", "the client secret")["ref"]
    other = vault.seal(owner, "api_key", "the api key")["ref"]
    stolen = bytes(raw.secret_row(secret)[2])
    # asking for the secret under another field name
    with pytest.raises(VaultError, match="api_key"):
        vault.open(owner, "api_key", secret)
    # the bytes moved into another row of the same owner (other ref, other field)
    raw.set_ciphertext(other, stolen)
    with pytest.raises(VaultError):
        vault.open(owner, "api_key", other)
    # same field name but a different ref (row swap) still fails
    third = vault.seal(owner, "client_secret", "another")["ref"]
    raw.set_ciphertext(third, stolen)
    with pytest.raises(VaultError):
        vault.open(owner, "client_secret", third)
    assert vault.open(owner, "client_secret", secret) == "the client secret"


def test_tampered_ciphertext_fails_closed(vault: EnvelopeVault, raw: Raw) -> None:
    owner = uuid.uuid4()
    ref = vault.seal(owner, "token", "value")["ref"]
    blob = bytearray(raw.secret_row(ref)[2])
    blob[-1] ^= 0x01
    raw.set_ciphertext(ref, bytes(blob))
    with pytest.raises(VaultError):
        vault.open(owner, "token", ref)
    raw.set_ciphertext(ref, b"\x01short")
    with pytest.raises(VaultError):
        vault.open(owner, "token", ref)


def test_wrapped_data_key_copied_to_another_owner_fails_closed(vault: EnvelopeVault, raw: Raw) -> None:
    alice, bob = uuid.uuid4(), uuid.uuid4()
    vault.seal(alice, "token", "a")
    b = vault.seal(bob, "token", "b")["ref"]
    (alice_key,) = raw.run("SELECT wrapped_dek FROM {keys} WHERE owner_id = %s", (str(alice),))[0]
    raw.run("UPDATE {keys} SET wrapped_dek = %s WHERE owner_id = %s", (bytes(alice_key), str(bob)))
    with pytest.raises(VaultError):
        vault.open(bob, "token", b)


# -- crypto-shredding (CR-4) ------------------------------------------------------------------------


def test_shred_destroys_key_and_rows_of_that_owner_only(vault: EnvelopeVault, raw: Raw) -> None:
    doomed, kept = uuid.uuid4(), uuid.uuid4()
    refs = [vault.seal(doomed, f"f{i}", f"doomed {i}")["ref"] for i in range(3)]
    kept_ref = vault.seal(kept, "f0", "kept")["ref"]
    assert raw.count("secrets", doomed) == 3 and raw.count("keys", doomed) == 1

    vault.shred(doomed)

    assert raw.count("secrets", doomed) == 0 and raw.count("keys", doomed) == 0
    for i, ref in enumerate(refs):
        with pytest.raises(VaultError):
            vault.open(doomed, f"f{i}", ref)
    assert vault.open(kept, "f0", kept_ref) == "kept"
    vault.shred(doomed)  # idempotent
    vault.shred(uuid.uuid4())  # unknown owner: nothing to do


def test_sealing_after_shred_uses_a_fresh_key(vault: EnvelopeVault) -> None:
    owner = uuid.uuid4()
    before = vault.seal(owner, "token", "same value")
    vault.shred(owner)
    after = vault.seal(owner, "token", "same value")
    assert after["fingerprint"] != before["fingerprint"]  # new DEK, so the old fingerprint is dead
    assert vault.open(owner, "token", after["ref"]) == "same value"
    with pytest.raises(VaultError):
        vault.open(owner, "token", before["ref"])


# -- master key rotation (CR-3) -------------------------------------------------------------------


def test_kek_rotation_and_rewrap(make_vault: VaultFactory, raw: Raw) -> None:
    old_owners = [uuid.uuid4() for _ in range(3)]
    v1 = make_vault(K1)
    old = {o: v1.seal(o, "token", f"old {o}") for o in old_owners}
    assert v1.key_usage() == {kid(K1): 3}
    secrets_before = raw.run("SELECT ref, ciphertext FROM {secrets} ORDER BY ref")
    v1.close()

    v21 = make_vault(f"{K2},{K1}")
    assert {o: v21.open(o, "token", r["ref"]) for o, r in old.items()} == {o: f"old {o}" for o in old_owners}
    new_owner = uuid.uuid4()
    new = v21.seal(new_owner, "token", "new")
    more = v21.seal(old_owners[0], "token", "more under the old owner's DEK")
    assert v21.key_usage() == {kid(K1): 3, kid(K2): 1}

    assert v21.rewrap() == 3
    assert v21.key_usage() == {kid(K2): 4}
    assert v21.rewrap() == 0
    # rewrap touches the wrapped keys only, never the secret rows
    after = dict(raw.run("SELECT ref, ciphertext FROM {secrets}"))
    for ref, ciphertext in secrets_before:
        assert bytes(after[ref]) == bytes(ciphertext)
    v21.close()

    v2 = make_vault(K2)
    assert {o: v2.open(o, "token", r["ref"]) for o, r in old.items()} == {o: f"old {o}" for o in old_owners}
    assert v2.open(new_owner, "token", new["ref"]) == "new"
    assert v2.open(old_owners[0], "token", more["ref"]) == "more under the old owner's DEK"
    # fingerprints are stable across rotation (same DEK, re-wrapped)
    assert v2.seal(old_owners[1], "token", f"old {old_owners[1]}")["fingerprint"] == old[old_owners[1]]["fingerprint"]


def test_unknown_master_key_names_the_missing_kid(make_vault: VaultFactory) -> None:
    owner = uuid.uuid4()
    ref = make_vault(K1).seal(owner, "token", "value")["ref"]
    stranger = make_vault(K3)
    with pytest.raises(VaultError, match=kid(K1)) as info:
        stranger.open(owner, "token", ref)
    assert K1 not in str(info.value) and K3 not in str(info.value)
    with pytest.raises(VaultError, match=kid(K1)):
        stranger.seal(owner, "token", "more")  # existing DEK cannot be unwrapped either
    with pytest.raises(VaultError, match=kid(K1)):
        stranger.rewrap()


# -- concurrency ----------------------------------------------------------------------------------


def test_concurrent_first_seals_create_one_data_key(make_vault: VaultFactory, raw: Raw) -> None:
    vaults = [make_vault(), make_vault()]  # two instances stand in for two processes
    for _round in range(3):
        owner = uuid.uuid4()
        barrier = threading.Barrier(8)
        results: dict[int, SecretRef] = {}
        errors: list[BaseException] = []

        def seal(i: int, owner: uuid.UUID = owner, barrier: threading.Barrier = barrier) -> None:
            try:
                barrier.wait()
                results[i] = vaults[i % 2].seal(owner, "token", f"secret {i}")
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=seal, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert raw.count("keys", owner) == 1
        assert raw.count("secrets", owner) == 8
        for i, ref in results.items():
            assert vaults[(i + 1) % 2].open(owner, "token", ref["ref"]) == f"secret {i}"
        # one DEK means one fingerprint key: equal plaintexts would fingerprint equally
        assert len({r["fingerprint"] for r in results.values()}) == 8


# -- fingerprints ---------------------------------------------------------------------------------


def test_fingerprints_are_stable_per_owner_and_differ_across_owners(make_vault: VaultFactory) -> None:
    vault = make_vault()
    alice, bob = uuid.uuid4(), uuid.uuid4()
    fa1 = vault.seal(alice, "api_key", "same plaintext")["fingerprint"]
    fa2 = vault.seal(alice, "api_key", "same plaintext")["fingerprint"]
    fb = vault.seal(bob, "api_key", "same plaintext")["fingerprint"]
    assert fa1 == fa2
    assert fb != fa1
    assert vault.seal(alice, "api_key", "other plaintext")["fingerprint"] != fa1
    assert vault.seal(alice, "client_secret", "same plaintext")["fingerprint"] != fa1  # field counts
    assert make_vault().seal(alice, "api_key", "same plaintext")["fingerprint"] == fa1  # across instances


def test_seal_many_for_a_new_then_a_known_owner(vault: EnvelopeVault, raw: Raw) -> None:
    """A new owner's data key and secrets are written together (one statement on PostgreSQL); a
    known owner's secrets are sealed under the key it has."""
    owner = uuid.uuid4()
    first = vault.seal_many(owner, {"client_secret": "s1", "api_key": "k1"})
    assert (raw.count("keys", owner), raw.count("secrets", owner)) == (1, 2)
    again = vault.seal_many(owner, {"client_secret": "s2", "refresh_token": "r2"})
    assert (raw.count("keys", owner), raw.count("secrets", owner)) == (1, 4)
    opened = {f: vault.open(owner, f, r["ref"]) for f, r in first.items()}
    opened |= {f + "'": vault.open(owner, f, r["ref"]) for f, r in again.items()}
    assert opened == {"client_secret": "s1", "api_key": "k1", "client_secret'": "s2", "refresh_token'": "r2"}
    # one data key: the fingerprint of equal plaintexts in one field is equal across the two seals
    assert vault.seal(owner, "api_key", "k1")["fingerprint"] == first["api_key"]["fingerprint"]
    assert vault.seal_many(uuid.uuid4(), {}) == {}


def test_prune_shreds_owners_whose_secrets_are_all_of_one_field_and_old(vault: EnvelopeVault, raw: Raw) -> None:
    """For pending authorizations: an owner holding only a PKCE verifier, sealed before the
    cutoff, goes with its key; anything holding another field, or newer, stays."""
    verifier_only, integration, mixed = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    v = vault.seal(verifier_only, "pkce_verifier", "verifier-secret-0001")
    k = vault.seal(integration, "api_key", "api-key-secret-0002")
    vault.seal_many(mixed, {"pkce_verifier": "verifier-secret-0003", "api_key": "api-key-secret-0004"})
    assert vault.prune("pkce_verifier", 3600) == 0  # sealed just now: not older than an hour
    assert vault.open(verifier_only, "pkce_verifier", v["ref"]) == "verifier-secret-0001"
    assert vault.prune("pkce_verifier", -5) == 1  # a cutoff in the future: everything is older
    with pytest.raises(VaultError):
        vault.open(verifier_only, "pkce_verifier", v["ref"])
    assert raw.run("SELECT count(*) FROM {secrets} WHERE owner_id = %s", (str(verifier_only),)) == [(0,)]
    assert raw.run("SELECT count(*) FROM {keys} WHERE owner_id = %s", (str(verifier_only),)) == [(0,)]
    assert vault.open(integration, "api_key", k["ref"]) == "api-key-secret-0002"
    assert raw.run("SELECT count(*) FROM {secrets} WHERE owner_id = %s", (str(mixed),)) == [(2,)]
    assert vault.prune("pkce_verifier", -5) == 0
