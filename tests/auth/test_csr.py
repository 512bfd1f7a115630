import base64

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from registration_app.auth.csr import verify_csr
from registration_app.core.errors import CsrMismatch, MalformedCSR, WeakKey
from registration_app.core.model import KeyType
from bench import pki

EMAIL = "alice@example.org"


def make_csr(*, key_type="ec", key=None, subject_email=EMAIL, san=(x509.RFC822Name(EMAIL),), extensions=()):
    key = key or pki.new_key(key_type)
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, "Alice")]
    if subject_email:
        attrs.append(x509.NameAttribute(NameOID.EMAIL_ADDRESS, subject_email))
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attrs))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(san)), critical=False)
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(key, hashes.SHA256())


def pem(csr) -> str:
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def der(csr) -> bytes:
    return csr.public_bytes(serialization.Encoding.DER)


def test_pem_text():
    csr = make_csr()
    assert verify_csr(pem(csr), email=EMAIL) == csr


def test_der_bytes_and_pem_bytes():
    csr = make_csr()
    assert verify_csr(der(csr), email=EMAIL) == csr
    assert verify_csr(pem(csr).encode(), email=EMAIL) == csr


@pytest.mark.parametrize("encode", [
    lambda d: base64.b64encode(d).decode(),
    lambda d: base64.urlsafe_b64encode(d).decode().rstrip("="),
    lambda d: base64.encodebytes(d).decode(),  # with line breaks
])
def test_base64_text(encode):
    csr = make_csr()
    assert verify_csr(encode(der(csr)), email=EMAIL) == csr


def test_email_is_compared_case_insensitively():
    csr = make_csr(subject_email="Alice@EXAMPLE.org", san=(x509.RFC822Name("ALICE@example.org"),))
    assert verify_csr(pem(csr), email=EMAIL) == csr


def test_minimal_csr_without_email():
    csr = make_csr(subject_email=None, san=())
    assert verify_csr(pem(csr), email=EMAIL) == csr


def test_rsa_keys():
    rsa2048, rsa3072 = make_csr(key_type="rsa"), make_csr(key_type="rsa3072")
    assert verify_csr(pem(rsa2048), email=EMAIL, allowed_key_types={KeyType.RSA_2048}) == rsa2048
    assert verify_csr(pem(rsa3072), email=EMAIL, allowed_key_types={KeyType.RSA_3072}) == rsa3072
    with pytest.raises(MalformedCSR, match="RSA-2048"):
        verify_csr(pem(make_csr(key_type="rsa")), email=EMAIL, allowed_key_types={KeyType.RSA_3072})


@pytest.mark.parametrize("key", [pki.new_key("rsa1024"), ec.generate_private_key(ec.SECP192R1()),
                                 ec.generate_private_key(ec.SECP256K1())], ids=["rsa1024", "p192", "secp256k1"])
def test_weak_keys_are_refused_by_the_key_policy(key):
    with pytest.raises(WeakKey, match="RSA-1024|secp192r1|secp256k1"):
        verify_csr(pem(make_csr(key=key)), email=EMAIL)


def test_a_key_the_policy_accepts_but_the_profile_does_not():
    with pytest.raises(MalformedCSR, match="secp384r1"):
        verify_csr(pem(make_csr(key_type="ec384")), email=EMAIL)


def test_ec_key_when_only_rsa_is_allowed():
    with pytest.raises(MalformedCSR, match="secp256r1"):
        verify_csr(pem(make_csr()), email=EMAIL, allowed_key_types={KeyType.RSA_3072})


def test_ed25519_key():
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, None)
    with pytest.raises(WeakKey, match="key type"):
        verify_csr(pem(csr), email=EMAIL)


@pytest.mark.parametrize("data", [
    b"",
    b"\x00",
    b"garbage",
    "",
    "garbage!",
    "QUJD",  # base64 of ABC
    "-----BEGIN CERTIFICATE REQUEST-----\nQUJD\n-----END CERTIFICATE REQUEST-----\n",
    "-----BEGIN CERTIFICATE REQUEST-----\n",
    "é" * 10,
    "A" * 70_000,
])
def test_garbage(data):
    with pytest.raises(MalformedCSR):
        verify_csr(data, email=EMAIL)


def test_truncated_der():
    data = der(make_csr())
    for cut in (1, 10, len(data) // 2, len(data) - 1):
        with pytest.raises(MalformedCSR):
            verify_csr(data[:cut], email=EMAIL)


def test_wrong_type():
    with pytest.raises(MalformedCSR):
        verify_csr(12345, email=EMAIL)  # type: ignore[arg-type]


def test_a_certificate_is_not_a_csr():
    with pytest.raises(MalformedCSR):
        verify_csr(pki.make_ca("CA").pem, email=EMAIL)


def test_signature_must_verify():
    data = bytearray(der(make_csr()))
    data[-1] ^= 0x01  # the last byte of the ECDSA signature's s
    with pytest.raises(MalformedCSR, match="signature does not verify"):
        verify_csr(bytes(data), email=EMAIL)


def test_subject_email_of_someone_else():
    with pytest.raises(CsrMismatch, match="subject"):
        verify_csr(pem(make_csr(subject_email="bob@example.org")), email=EMAIL)


def test_san_email_of_someone_else():
    with pytest.raises(CsrMismatch, match="subjectAltName"):
        verify_csr(pem(make_csr(san=(x509.RFC822Name(EMAIL), x509.RFC822Name("bob@example.org")))), email=EMAIL)


def test_san_with_a_dns_name():
    with pytest.raises(MalformedCSR, match="subjectAltName"):
        verify_csr(pem(make_csr(san=(x509.RFC822Name(EMAIL), x509.DNSName("example.org")))), email=EMAIL)


def test_ca_rights_are_refused():
    with pytest.raises(MalformedCSR, match="2.5.29.19"):
        verify_csr(pem(make_csr(extensions=[(x509.BasicConstraints(ca=True, path_length=None), True)])), email=EMAIL)


def test_unknown_extension_is_named():
    unknown = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.2.3.4.5"), b"\x05\x00")
    with pytest.raises(MalformedCSR, match=r"1\.2\.3\.4\.5"):
        verify_csr(pem(make_csr(extensions=[(unknown, False)])), email=EMAIL)


def test_allowed_key_usage_and_eku():
    ku = x509.KeyUsage(True, False, False, False, False, False, False, False, False)
    eku = x509.ExtendedKeyUsage([pki.EMAIL_PROTECTION])
    csr = make_csr(extensions=[(ku, True), (eku, False)])
    assert verify_csr(pem(csr), email=EMAIL) == csr


def test_key_cert_sign_is_refused():
    ku = x509.KeyUsage(True, False, False, False, False, True, False, False, False)
    with pytest.raises(MalformedCSR, match="keyCertSign"):
        verify_csr(pem(make_csr(extensions=[(ku, True)])), email=EMAIL)


def test_server_auth_eku_is_refused():
    eku = x509.ExtendedKeyUsage([pki.EMAIL_PROTECTION, pki.SERVER_AUTH])
    with pytest.raises(MalformedCSR, match="emailProtection"):
        verify_csr(pem(make_csr(extensions=[(eku, False)])), email=EMAIL)
