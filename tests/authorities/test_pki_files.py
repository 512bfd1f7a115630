"""`autoenroll init` material: right files, right modes, never overwritten, usable by openssl."""

from __future__ import annotations

import os
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

from registration_app.authorities.escrow_crypto import open_private_key, seal_private_key
from registration_app.authorities.keys import generate_private_key
from registration_app.authorities.pki_files import (
    PkiPaths,
    create_pki,
    read_cert,
    read_certs,
    read_private_key,
    read_public_key,
    write_cert,
    write_private_key,
    write_secret,
    write_unencrypted_private_key,
)
from registration_app.core.errors import AlreadyExists, ConfigError
from registration_app.core.model import KeyType

from .conftest import NOW, openssl

PASSPHRASE = b"init passphrase"


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> PkiPaths:
    return create_pki(tmp_path_factory.mktemp("pki") / "var", passphrase=PASSPHRASE, now=NOW, org="Example Org")


def test_create_pki_writes_every_file_with_safe_modes(pki):
    assert sorted(p.name for p in pki.all()) == sorted([
        "ca.key", "ca.pem", "kra.key", "kra.pem", "tls-ca.key", "tls-ca.pem", "server.key", "server.pem",
        "agent.key", "agent.pem",
    ])
    for key in (pki.ca_key, pki.kra_key, pki.tls_ca_key, pki.server_key, pki.agent_key):
        assert mode(key) == 0o600, key.name
    for public in (pki.ca_cert, pki.kra_public_key, pki.tls_ca_cert, pki.server_cert, pki.agent_cert):
        assert mode(public) == 0o644, public.name
    assert mode(pki.ca_key.parent) == 0o700
    assert not [p for p in pki.ca_key.parent.iterdir() if p.name.endswith(".tmp")]

    for encrypted in (pki.ca_key, pki.kra_key, pki.tls_ca_key):
        assert encrypted.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
        with pytest.raises(ConfigError):
            read_private_key(encrypted, b"wrong passphrase")
        with pytest.raises(ConfigError):
            read_private_key(encrypted, None)
    for plain in (pki.server_key, pki.agent_key):
        assert plain.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_the_keys_match_their_certificates_and_roles(pki):
    ca_key = read_private_key(pki.ca_key, PASSPHRASE)
    ca_cert = read_cert(pki.ca_cert)
    assert ca_cert.public_key() == ca_key.public_key()
    assert ca_cert.subject.rfc4514_string() == "CN=Autoenroll CA,O=Example Org"
    kra_key = read_private_key(pki.kra_key, PASSPHRASE)
    assert kra_key.key_size == 3072 and read_public_key(pki.kra_public_key) == kra_key.public_key()
    # The KRA pair works as an escrow pair.
    user_key = generate_private_key(KeyType.EC_P256)
    sealed = seal_private_key(user_key, read_public_key(pki.kra_public_key), b"aad")
    assert open_private_key(sealed, kra_key, b"aad").public_key() == user_key.public_key()

    tls_ca = read_cert(pki.tls_ca_cert)
    assert tls_ca.subject != ca_cert.subject  # a separate TLS root
    server, agent = read_cert(pki.server_cert), read_cert(pki.agent_cert)
    assert server.public_key() == read_private_key(pki.server_key, None).public_key()
    assert agent.public_key() == read_private_key(pki.agent_key, None).public_key()
    for cert in (server, agent):
        assert cert.issuer == tls_ca.subject
        cert.verify_directly_issued_by(tls_ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert list(server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH]
    assert list(agent.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH]
    assert read_certs(pki.ca_cert) == [ca_cert]


def test_openssl_accepts_the_tls_material(pki):
    openssl("verify", "-x509_strict", "-purpose", "sslserver", "-verify_hostname", "localhost",
            "-CAfile", str(pki.tls_ca_cert), str(pki.server_cert))
    openssl("verify", "-x509_strict", "-purpose", "sslclient", "-CAfile", str(pki.tls_ca_cert), str(pki.agent_cert))
    # The S/MIME root does not vouch for TLS identities.
    refused = openssl("verify", "-CAfile", str(pki.ca_cert), str(pki.agent_cert), check=False)
    assert refused.returncode != 0
    openssl("pkey", "-in", str(pki.ca_key), "-passin", f"pass:{PASSPHRASE.decode()}", "-noout")


def test_create_pki_is_idempotent_and_never_overwrites(pki):
    before = {p: (p.read_bytes(), os.stat(p).st_mtime_ns) for p in pki.all()}
    again = create_pki(pki.ca_key.parent, passphrase=PASSPHRASE, now=NOW)
    assert again == pki
    assert {p: (p.read_bytes(), os.stat(p).st_mtime_ns) for p in pki.all()} == before


def test_a_partial_pki_is_refused_naming_what_exists(tmp_path):
    paths = create_pki(tmp_path, passphrase=PASSPHRASE, now=NOW)
    agent_key = paths.agent_key.read_bytes()
    paths.agent_cert.unlink()
    paths.server_key.unlink()
    with pytest.raises(AlreadyExists) as info:
        create_pki(tmp_path, passphrase=PASSPHRASE, now=NOW)
    assert "agent.key" in info.value.detail and "server.key" in info.value.detail  # exists / missing
    assert str(tmp_path) not in info.value.detail  # no internal paths in public messages
    assert paths.agent_key.read_bytes() == agent_key
    assert not paths.server_key.exists()


def test_create_pki_needs_a_passphrase(tmp_path):
    with pytest.raises(ConfigError):
        create_pki(tmp_path / "var", passphrase=b"", now=NOW)
    assert not (tmp_path / "var").exists()


def test_create_pki_with_an_rsa_ca(tmp_path):
    paths = create_pki(tmp_path, ca_key_type=KeyType.RSA_2048, passphrase=PASSPHRASE, now=NOW,
                       server_names=["ra.example.org", "::1"], agent_names=["mx1.example.org", "mx2.example.org"])
    assert read_private_key(paths.ca_key, PASSPHRASE).key_size == 2048
    agent = read_cert(paths.agent_cert)
    assert agent.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName) == ["mx1.example.org", "mx2.example.org"]


def test_single_file_writers_refuse_to_overwrite_and_use_0600(tmp_path):
    old_umask = os.umask(0)  # even a permissive umask must not loosen a key file
    try:
        key = generate_private_key(KeyType.EC_P256)
        write_private_key(tmp_path / "k.pem", key, b"pw")
        write_unencrypted_private_key(tmp_path / "plain.pem", key)
        write_secret(tmp_path / "secret", b"\x00\x01 mac key")
    finally:
        os.umask(old_umask)
    for name in ("k.pem", "plain.pem", "secret"):
        assert mode(tmp_path / name) == 0o600
    assert (tmp_path / "secret").read_bytes() == b"\x00\x01 mac key"
    assert read_private_key(tmp_path / "k.pem", b"pw").public_key() == key.public_key()

    original = (tmp_path / "k.pem").read_bytes()
    with pytest.raises(AlreadyExists, match="k.pem"):
        write_private_key(tmp_path / "k.pem", generate_private_key(KeyType.EC_P256), b"pw")
    with pytest.raises(AlreadyExists):
        write_secret(tmp_path / "secret", b"other")
    assert (tmp_path / "k.pem").read_bytes() == original
    with pytest.raises(ConfigError):
        write_private_key(tmp_path / "nopw.pem", key, b"")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.pem", "plain.pem", "secret"]


def test_certificates_round_trip_and_bundles_keep_order(tmp_path, ec_ca, rsa_ca):
    write_cert(tmp_path / "a.pem", ec_ca.cert)
    with pytest.raises(AlreadyExists):
        write_cert(tmp_path / "a.pem", rsa_ca.cert)
    assert read_cert(tmp_path / "a.pem") == ec_ca.cert
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes((tmp_path / "a.pem").read_bytes() + rsa_ca.cert.public_bytes(Encoding.PEM))
    assert read_certs(bundle) == [ec_ca.cert, rsa_ca.cert]
    (tmp_path / "junk.pem").write_bytes(b"not a certificate")
    with pytest.raises(ConfigError):
        read_cert(tmp_path / "junk.pem")
    with pytest.raises(ConfigError):
        read_certs(tmp_path / "junk.pem")
