"""The interfaces between the parts (DESIGN.md "Parts and where they live"), as Protocols.

Each has the methods its callers use, and no more. The in-process implementations (LocalCA, LocalKRA,
the PEM files of the data folder) and the split deployment's HTTP clients (RemoteCA, RemoteKRA) satisfy
the same signatures; mypy checks it (`make test`; the `if TYPE_CHECKING:` lines at the bottom of each
implementing module). A caller holds one of these and never asks which implementation it is.
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.types import (CertificateIssuerPrivateKeyTypes,
                                                             CertificatePublicKeyTypes, PrivateKeyTypes)

from .batch import BatchIssued, BatchOrder
from .model import Profile, RecoveryGrant, Subject, UserEntry, Wanted


class CaStatus(Protocol):
    """The CA as every role sees it: its certificate, its CRL and the revocation status of a certificate
    (the KRA service holds only this: authorities/kra_verify.py CaView)."""

    @property
    def certificate(self) -> x509.Certificate: ...

    @property
    def chain(self) -> list[x509.Certificate]: ...

    def is_revoked(self, cert: x509.Certificate) -> bool:
        """Read on every call (no cache), so a revocation refuses the next request."""
        ...

    def crl(self, now: datetime | None = None) -> x509.CertificateRevocationList: ...


class CertificateAuthority(CaStatus, Protocol):
    """Signs and records certificates, revokes them, builds the CRL."""

    def sign(self, public_key: CertificatePublicKeyTypes, profile: Profile, subject: Subject, *, user_dn: str,
             serial: int, replaces: str | None, key_source: str, actor: str, now: datetime | None = None,
             entry_id: str | None = None) -> x509.Certificate:
        """Sign and record; the predecessor `replaces` (if any) becomes superseded in the same step."""
        ...

    def revoke(self, serial: int | str, reason: x509.ReasonFlags, *, actor: str = "operator",
               now: datetime | None = None) -> bool:
        """True if the status changed; the CRL is rebuilt."""
        ...

    def revoke_many(self, serials: list[str], reason: x509.ReasonFlags, *, actor: str = "operator",
                    now: datetime | None = None, must_exist: bool = False,
                    details: dict[str, dict] | None = None) -> list[str]:
        """Several revocations and one new CRL in one transaction; returns the serials that changed."""
        ...

    def refresh_crl(self, now: datetime | None = None) -> x509.CertificateRevocationList: ...

    def refresh_crl_if_due(self, now: datetime | None = None) -> x509.CertificateRevocationList | None:
        """The new CRL if the last one was missing or past half its validity, else None."""
        ...


class RecoveryAuthority(Protocol):
    """The KRA: escrows encryption keys, and gives one back (as PKCS#12) only with a grant."""

    def escrow(self, serial: str, key: PrivateKeyTypes, *, email: str, profile: str, actor: str,
               now: datetime | None = None) -> int:
        """Seal and commit; returns the escrow id. Any failure raises EscrowFailed."""
        ...

    def recover_pkcs12(self, serial: str, grant: RecoveryGrant, password: str, legacy: bool, friendly_name: str,
                       chain: list[x509.Certificate], *, now: datetime | None = None) -> bytes:
        """The escrowed key with its certificate, wrapped under `password`: never the raw key."""
        ...


class KeyAuthority(Protocol):
    """Generates keys, escrows them, has them signed and recorded (authorities/key_authority.py)."""

    def issue_batch(self, order: BatchOrder, now: datetime | None = None) -> BatchIssued:
        """generate → escrow → sign → store for every user of the order, with the invariants of one
        enrollment: nothing signed is recorded without its escrowed key, one transaction for the batch,
        each certificate's outbox row queued in it. Users who got a certificate meanwhile are refused."""
        ...


class Directory(Protocol):
    """The user directory (directory_sync/ldap.py LdapDirectory): entries, groups, published certificates."""

    def find_user(self, email: str) -> UserEntry | None: ...

    def groups_of(self, user: UserEntry | str) -> frozenset[str]: ...

    def attribute_values(self, dn: str, attribute: str) -> list[bytes]: ...

    def publish(self, user: UserEntry | str, wanted: Wanted) -> None:
        """Make the entry's certificate attribute hold what `wanted` asks of it (one modify)."""
        ...

    def publish_ca(self, ca_cert_der: bytes, crl_der: bytes | None = None) -> None: ...

    def check_bind(self) -> None:
        """A fresh bind as the service account (for /health): DirectoryUnavailable if refused or down."""
        ...


class KeyStore(Protocol):
    """Where the authorities' private keys are held: the seam for keys that never leave a token.
    The default is the encrypted PEM files of the data folder (authorities/pki_files.py PemKeyStore); the
other is a PKCS#11 token (authorities/pkcs11_store.py Pkcs11KeyStore), chosen per key."""

    def ca_signing_key(self) -> CertificateIssuerPrivateKeyTypes:
        """The key that signs users' certificates and the CRL."""
        ...

    def tls_ca_signing_key(self) -> CertificateIssuerPrivateKeyTypes:
        """The key that signs TLS certificates (agents, the RA's client certificate)."""
        ...

    def kra_storage_key(self) -> rsa.RSAPrivateKey:
        """The KRA's storage key, which unwraps escrowed keys."""
        ...
