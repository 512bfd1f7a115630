"""LDAP transactions (RFC 5805) over python-ldap: many modifies applied by the server as one.

OpenLDAP's back-mdb applies a transaction's updates in one LMDB write transaction: one commit and one
fsync for all of them instead of one each, several times less of slapd's CPU per modify (PERFORMANCE.md).

A transaction is all or nothing: if one update fails (an entry changed or went away meanwhile), the
server applies none of them, and the caller publishes those entries one by one instead.

bulk.py (reconcile, provisioning) and inline.py (concurrent requests' publications) use this;
python-ldap exceptions pass through to them (they translate them).

slapd answers each update of a transaction as soon as it has queued it, and the thread that queued it
goes on using the update (its Operation) for a moment after answering; an end that arrives meanwhile
commits and frees those Operations under that thread (use after free: OpenLDAP 2.5.13 segfaults, most
often in txn_preop; the code is the same in 2.6 and master). Nothing a client sees tells when that thread
is done, so the end waits SETTLE_SECONDS after the last update's answer: with it, bench/slapd_txn.py ran
every mix it crashed within seconds without it (PERFORMANCE.md, "LDAP transactions and slapd"). It
narrows the race, it cannot close it: the request path leaves transactions off by default.
"""

from __future__ import annotations

import time

import ldap
from ldap.controls import LDAPControl
from ldap.extop import ExtendedRequest
from pyasn1.codec.der import encoder
from pyasn1.type import namedtype, univ

from directory_sync.connection import answered

START = "1.3.6.1.1.21.1"
SPECIFICATION = "1.3.6.1.1.21.2"  # the control that puts an update into a transaction
END = "1.3.6.1.1.21.3"
SETTLE_SECONDS = 0.002  # between the last update's answer and the end (see the module's docstring)


def supported(conn) -> bool:
    """True if the server announces both transaction extended operations in its root DSE."""
    found = conn.search_ext_s("", 0, "(objectClass=*)", ["supportedExtension"])  # 0: SCOPE_BASE
    announced = {v.decode() for v in (found[0][1].get("supportedExtension", []) if found else [])}
    return {START, END} <= announced


def start(conn) -> bytes:
    """A new transaction's identifier (OpenLDAP's is empty: one transaction per connection at a time)."""
    _, identifier = conn.extop_s(ExtendedRequest(START, None))
    return identifier or b""


def control(identifier: bytes) -> LDAPControl:
    """The (critical) control for every update of the transaction."""
    return LDAPControl(SPECIFICATION, True, encodedControlValue=identifier)


def end(conn, identifier: bytes, *, commit: bool) -> None:
    """Commit (or abort) the transaction; raises the server's refusal (nothing applied) as python-ldap does."""
    conn.extop_s(_EndRequest(identifier, commit))


def modify_all(conn, updates: list[tuple[str, list, list[LDAPControl]]], timeout: float) -> bool:
    """Every (dn, modlist, controls) in one transaction: True once committed, False if the server
    refused it (a modify, its assertion, or the commit): then nothing was applied. python-ldap's
    exception passes through when no answer came (the connection is no good any more)."""
    try:
        identifier = start(conn)
    except ldap.LDAPError as exc:
        if not answered(exc):
            raise
        return False
    spec = control(identifier)
    sent = [conn.modify_ext(dn, ops, serverctrls=[spec, *controls]) for dn, ops, controls in updates]
    refused = False
    for msgid in sent:  # each update is only queued here; a refusal now dooms the transaction
        try:
            conn.result3(msgid, timeout=timeout)
        except ldap.LDAPError as exc:
            if not answered(exc):
                raise
            refused = True
    time.sleep(SETTLE_SECONDS)  # let slapd's threads be done with the updates they answered
    try:
        end(conn, identifier, commit=not refused)
    except ldap.LDAPError as exc:
        if not answered(exc):
            raise
        return False
    return not refused


class _TxnEndReq(univ.Sequence):
    componentType = namedtype.NamedTypes(
        namedtype.DefaultedNamedType("commit", univ.Boolean(True)),
        namedtype.NamedType("identifier", univ.OctetString()),
    )


class _EndRequest(ExtendedRequest):
    requestName = END

    def __init__(self, identifier: bytes, commit: bool) -> None:
        super().__init__(END, None)
        self.identifier, self.commit = identifier, commit

    def encodedRequestValue(self) -> bytes:
        value = _TxnEndReq()
        value["commit"] = self.commit
        value["identifier"] = self.identifier
        return encoder.encode(value)
