"""PKCS#12 files, modern and legacy, open in openssl and in cryptography with the agent's password."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from registration_app.authorities.certs import build_smime_certificate
from registration_app.authorities.pkcs12 import to_pkcs12
from registration_app.core.errors import BadRequest
from registration_app.core.model import KeyType, Profile, Subject, Usage

from .conftest import NOW, URLS, openssl

PASSWORD = "correct horse battery staple é"


@pytest.fixture(scope="module")
def issued(ec_ca, user_keys):
    key = user_keys[KeyType.RSA_2048]
    cert = build_smime_certificate(
        ca_cert=ec_ca.cert, ca_key=ec_ca.key, public_key=key.public_key(),
        profile=Profile(name="smime-encryption", usage=Usage.ENCRYPTION, key_type=KeyType.RSA_2048),
        subject=Subject("carol@example.org"), now=NOW, urls=URLS,
    )
    return key, cert, ec_ca.cert


def der(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.mark.parametrize("legacy", [False, True], ids=["pbes2-aes256", "legacy-3des"])
def test_pkcs12_opens_in_cryptography_and_openssl(tmp_path, issued, legacy):
    key, cert, ca_cert = issued
    p12 = to_pkcs12(key=key, cert=cert, chain=[ca_cert], password=PASSWORD, friendly_name="carol encryption",
                    legacy=legacy, iterations=2048)

    loaded = pkcs12.load_pkcs12(p12, PASSWORD.encode())
    assert der(loaded.key) == der(key)
    assert loaded.cert.certificate == cert and loaded.cert.friendly_name == b"carol encryption"
    assert [c.certificate for c in loaded.additional_certs] == [ca_cert]
    with pytest.raises(ValueError):
        pkcs12.load_pkcs12(p12, b"wrong")

    path = tmp_path / "carol.p12"
    path.write_bytes(p12)
    # No -legacy needed: OpenSSL 3 keeps 3DES in the default provider (only RC2-40 moved to "legacy").
    info = openssl("pkcs12", "-info", "-noout", "-in", str(path), "-passin", f"pass:{PASSWORD}")
    text = (info.stdout + info.stderr).decode()
    if legacy:
        assert "MAC: sha1, Iteration 2048" in text
        assert "pbeWithSHA1And3-KeyTripleDES-CBC, Iteration 2048" in text
        assert "PBES2" not in text
    else:
        assert "MAC: sha256, Iteration 2048" in text
        assert "PBES2, PBKDF2, AES-256-CBC, Iteration 2048, PRF hmacWithSHA256" in text
        assert "3-KeyTripleDES" not in text and "RC2" not in text
    wrong = openssl("pkcs12", "-info", "-noout", "-in", str(path), "-passin", "pass:wrong", check=False)
    assert wrong.returncode != 0


def test_default_iterations_are_the_macs_2048(tmp_path, issued):
    key, cert, ca_cert = issued
    path = tmp_path / "default.p12"
    path.write_bytes(to_pkcs12(key=key, cert=cert, chain=[], password="pw", friendly_name="x"))
    info = openssl("pkcs12", "-info", "-noout", "-in", str(path), "-passin", "pass:pw")
    text = (info.stdout + info.stderr).decode()
    assert "PBES2, PBKDF2, AES-256-CBC, Iteration 2048, PRF hmacWithSHA256" in text
    # What the default relies on: the MAC keeps cryptography's fixed count, the bags' count matches it.
    assert "MAC: sha256, Iteration 2048" in text


def test_a_higher_count_reaches_the_bags_but_not_the_mac(tmp_path, issued):
    key, cert, ca_cert = issued
    path = tmp_path / "stronger.p12"
    path.write_bytes(to_pkcs12(key=key, cert=cert, chain=[], password="pw", friendly_name="x", iterations=20000))
    info = openssl("pkcs12", "-info", "-noout", "-in", str(path), "-passin", "pass:pw")
    text = (info.stdout + info.stderr).decode()
    assert "Iteration 20000" in text
    assert "MAC: sha256, Iteration 2048" in text


def test_empty_password_is_refused(issued):
    key, cert, ca_cert = issued
    with pytest.raises(BadRequest, match="password"):
        to_pkcs12(key=key, cert=cert, chain=[ca_cert], password="", friendly_name="x")
