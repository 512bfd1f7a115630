"""TLS material the tests issue for their slapd: a CA, a server certificate for `localhost` and
127.0.0.1, the service account's client certificate (SASL EXTERNAL), and the wrong ones (another CA,
another name) for the refusals."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from directory_sync.slapd import SERVICE_DN, SlapdTls
from bench.pki import DAY, NOW, Issued, make_ca, new_key


@dataclass(frozen=True)
class LdapTlsFiles:
    """PEM files in one folder: what slapd presents, what the client trusts and presents."""

    folder: Path
    ca_file: Path  # the CA that issued slapd's certificate and the client certificate
    other_ca_file: Path  # a CA that issued none of them
    client_cert_file: Path  # subject = the service account's DN
    client_key_file: Path
    slapd: SlapdTls  # slapd's certificate (localhost, 127.0.0.1)
    wrong_name: SlapdTls  # a certificate of the same CA for another host name


def leaf(ca: Issued, subject: x509.Name, names: list[x509.GeneralName], eku: x509.ObjectIdentifier) -> Issued:
    key = new_key("ec")
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca.cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(NOW - DAY).not_valid_after(NOW + timedelta(days=30))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([eku]), critical=False))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


def service_subject() -> x509.Name:
    """SERVICE_DN as a certificate subject: slapd takes the subject DN as the SASL EXTERNAL identity."""
    oids = {"cn": NameOID.COMMON_NAME, "ou": NameOID.ORGANIZATIONAL_UNIT_NAME, "dc": NameOID.DOMAIN_COMPONENT}
    rdns = [rdn.split("=", 1) for rdn in SERVICE_DN.split(",")]
    return x509.Name([x509.NameAttribute(oids[kind], value) for kind, value in reversed(rdns)])


def write_pair(folder: Path, name: str, issued: Issued) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    cert.write_bytes(issued.pem)
    key.write_bytes(issued.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))
    key.chmod(0o600)
    return cert, key


def issue_ldap_tls(folder: Path) -> LdapTlsFiles:
    import ipaddress
    folder.mkdir(parents=True, exist_ok=True)
    ca, other = make_ca("LDAP Test CA"), make_ca("Another CA")
    (folder / "ca.pem").write_bytes(ca.pem)
    (folder / "other-ca.pem").write_bytes(other.pem)
    server_subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    server = leaf(ca, server_subject, [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
                  ExtendedKeyUsageOID.SERVER_AUTH)
    elsewhere = leaf(ca, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ldap.elsewhere.example")]),
                     [x509.DNSName("ldap.elsewhere.example")], ExtendedKeyUsageOID.SERVER_AUTH)
    client = leaf(ca, service_subject(), [], ExtendedKeyUsageOID.CLIENT_AUTH)
    server_cert, server_key = write_pair(folder, "slapd", server)
    wrong_cert, wrong_key = write_pair(folder, "elsewhere", elsewhere)
    client_cert, client_key = write_pair(folder, "service", client)
    return LdapTlsFiles(folder=folder, ca_file=folder / "ca.pem", other_ca_file=folder / "other-ca.pem",
                        client_cert_file=client_cert, client_key_file=client_key,
                        slapd=SlapdTls(server_cert, server_key, folder / "ca.pem"),
                        wrong_name=SlapdTls(wrong_cert, wrong_key, folder / "ca.pem"))
