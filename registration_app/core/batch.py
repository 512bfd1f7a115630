"""What a batch issuance (bulk provisioning) asks of the key authority, and what it answers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from cryptography import x509

from .model import Profile, UserEntry


@dataclass(frozen=True)
class BatchOrder:
    """Server-generated, escrowed keys and certificates of `profile` for `users`, recorded together.

    `replaces[i]` is the serial of the certificate users[i]'s new one supersedes (None: a first one);
    `detail` is added to every certificate.issued audit row (for example the provisioned group)."""

    profile: Profile
    users: tuple[UserEntry, ...]
    actor: str
    replaces: tuple[str | None, ...] = ()
    detail: Mapping[str, object] = field(default_factory=dict)

    def replaced_by(self, index: int) -> str | None:
        return self.replaces[index] if index < len(self.replaces) else None


@dataclass(frozen=True)
class IssuedInBatch:
    user: UserEntry
    serial: str
    certificate: x509.Certificate
    outbox_id: int | None  # the certificate's outbox row, when this process's CA recorded it


@dataclass(frozen=True)
class BatchIssued:
    issued: tuple[IssuedInBatch, ...]
    refused: tuple[tuple[UserEntry, str], ...] = ()  # (user, why): nothing was issued to them
