"""The lifecycle over the real server: renewals, replacement, recovery (self and 2-of-3 officers), daemon."""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from sqlalchemy import func, select, update

from registration_app.agent.actions import renew
from registration_app.agent.client import AgentConfig, AgentError, RegistrationClient
from registration_app.agent.store import AgentStore
from registration_app.authorities.key_authority import IssueRequest
from registration_app.core.profiles import get_profile
from registration_app.wiring import build_services
from registration_app.settings import load_settings
from registration_app.store import audit
from registration_app.store.models import Certificate, RecoveryRequest
from bench.platform import SUITE_SETTINGS, make_platform
from tests.e2e.test_enrollment import invite_and_bootstrap, ldap_certificates

# Short signature certificates whose renewal window is always open, so that a daemon whose clock is
# pushed 20 hours ahead renews them against the real server.
PROFILES = """
[profiles.smime-signature]
usage = "signature"
key_type = "ec-p256"
key_source = "either"
validity_days = 1
renew_window_days = 1
groups = ["cn=smime-users,ou=groups,dc=example,dc=org", "cn=recovery-officers,ou=groups,dc=example,dc=org"]

[profiles.smime-encryption-ec]
usage = "encryption"
key_type = "ec-p256"
validity_days = 365
groups = ["cn=smime-users,ou=groups,dc=example,dc=org"]
"""


def backdate_ca(data: Path, years: int = 3) -> None:
    """Give the platform a CA born years ago, so certificates issued in the past can have expired."""
    from cryptography.x509.oid import NameOID

    from registration_app.authorities.certs import build_ca_certificate
    from registration_app.authorities.keys import generate_private_key
    from registration_app.authorities.pki_files import write_cert, write_private_key
    from registration_app.core.model import KeyType
    from registration_app.wiring import key_store
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Autoenroll CA")])
    born = datetime.now(timezone.utc) - timedelta(days=365 * years)
    if not (data / "ca.key").exists():  # the key is in the token: the same key, a certificate born earlier
        cert = build_ca_certificate(key_store(load_settings(data / "autoenroll.toml")).ca_signing_key(), name, born)
        (data / "ca.pem").unlink()
        write_cert(data / "ca.pem", cert)
        return
    key = generate_private_key(KeyType.EC_P256)
    cert = build_ca_certificate(key, name, born)
    for file in ("ca.key", "ca.pem"):
        (data / file).unlink()
    write_private_key(data / "ca.key", key, (data / "passphrase").read_bytes().strip())
    write_cert(data / "ca.pem", cert)


@pytest.fixture(scope="module", params=["files", "softhsm"])
def life(request, tmp_path_factory, slapd):
    """Run twice: keys in files, then every key (CA, TLS CA, KRA) in a SoftHSM2 token."""
    from tests.softhsm import key_store_params
    data = tmp_path_factory.mktemp("lifecycle")
    p = make_platform(data, slapd.url, extra_toml=PROFILES, init_options=key_store_params(request, data, data.name),
                      **SUITE_SETTINGS)
    backdate_ca(p.data)
    with p.running():
        yield p


@pytest.fixture(scope="module")
def officers(life):
    for name in ("oscar", "olivia", "otto"):
        invite_and_bootstrap(life, f"{name}@example.org")
    return "oscar@example.org", "olivia@example.org", "otto@example.org"



def client(platform) -> tuple[RegistrationClient, AgentStore]:
    config = AgentConfig.load(platform.agent_config)
    return RegistrationClient(config), AgentStore(config.store)


def our_values(platform, email) -> list[x509.Certificate]:
    ca = x509.load_pem_x509_certificate((platform.data / "ca.pem").read_bytes())
    certs = [x509.load_der_x509_certificate(v) for v in ldap_certificates(platform, email)]
    return [c for c in certs if c.issuer == ca.subject]


def foreign_certificate(email: str) -> bytes:
    from bench.pki import make_ca, make_user_cert
    other = make_ca("Some Other CA")
    return make_user_cert(other, email).der


def serials_of(platform, email):
    return [format(c.serial_number, "x") for c in our_values(platform, email)]


def test_daemon_renews_a_signature_certificate_near_expiry(life, new_user):
    _, email = new_user(("smime-users",))
    invite_and_bootstrap(life, email)
    old = json.loads((life.data / "agent-store" / email / "state.json").read_text())["current"]["smime-signature"]
    assert old in serials_of(life, email)
    # Not due yet: nothing happens.
    assert "renewed=0" in life.agent("daemon", "--once").stdout
    later = (datetime.now(timezone.utc) + timedelta(hours=20)).isoformat()
    out = life.agent("daemon", "--once", "--insecure-now", later).stdout
    assert "renewed=" in out and "failed=0" in out
    state = json.loads((life.data / "agent-store" / email / "state.json").read_text())
    new = state["current"]["smime-signature"]
    assert new != old
    published = serials_of(life, email)
    assert new in published and old not in published  # swapped in one modify: added, then old removed
    with life.transaction() as session:
        assert session.get(Certificate, old).status == "superseded"  # superseded, not revoked
    # The renewed key signs: the next request authenticates with it.
    assert "renewed=0" in life.agent("daemon", "--once").stdout
    result = life.agent("list", "--email", email)
    assert new in result.stdout and "superseded" in result.stdout


def test_replacement_encryption_leaves_one_current_value_and_the_foreign_one(life, new_user, ldap_admin):
    dn, email = new_user(("smime-users",))
    invite_and_bootstrap(life, email)
    life.agent("enroll", "--email", email, "--profile", "smime-encryption-ec")
    foreign = foreign_certificate(email)
    assert ldap_admin.modify(dn, {"userCertificate;binary": [("MODIFY_ADD", [foreign])]})
    first = [c for c in our_values(life, email) if _is_encryption(c)]
    assert len(first) == 1
    refused = life.agent("renew", "--email", email, "--profile", "smime-encryption-ec", check=False)
    assert refused.returncode == 1 and "renewal opens on" in refused.stderr
    life.agent("renew", "--email", email, "--profile", "smime-encryption-ec", "--force")
    values = ldap_certificates(life, email)
    assert foreign in values
    encryption = [c for c in our_values(life, email) if _is_encryption(c)]
    assert len(encryption) == 1 and encryption[0].serial_number != first[0].serial_number
    # Among this CA's values the current encryption certificate comes first (dirmngr reads the first);
    # the foreign value keeps its place.
    assert our_values(life, email)[0] == encryption[0]


def _is_encryption(cert: x509.Certificate) -> bool:
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    return ku.key_agreement or ku.key_encipherment


def test_mail_to_an_expired_certificate_is_read_with_the_recovered_key(life, new_user, tmp_path):
    dn, email = new_user(("smime-users",))
    invite_and_bootstrap(life, email)
    # A certificate issued two years ago (injected clock, real authorities) has since expired.
    services = build_services(load_settings(life.config))
    try:
        user = services.directory.find_user(email)
        profile = get_profile(services.settings.profiles, "smime-encryption-ec")
        issued = services.key_authority.issue(IssueRequest(user=user, profile=profile, actor="test",
                                                           password="x"), now=datetime.now(timezone.utc) - timedelta(days=730))
    finally:
        services.close()
    cert_pem = tmp_path / "old.pem"
    cert_pem.write_bytes(issued.certificate.public_bytes(Encoding.PEM))
    (tmp_path / "msg.txt").write_text("old mail\n")
    subprocess.run(["openssl", "cms", "-encrypt", "-aes256", "-in", tmp_path / "msg.txt", "-out",
                    tmp_path / "msg.p7m", cert_pem], check=True)

    listed = life.agent("list", "--email", email).stdout
    assert issued.serial in listed and "expired" in listed
    out = life.agent("recover", "--email", email, "--serial", issued.serial).stdout
    p12 = Path(out.strip().splitlines()[-1].split(": ", 1)[1])
    subprocess.run(["openssl", "pkcs12", "-in", p12, "-passin", f"file:{p12.with_suffix('.pass')}", "-nodes",
                    "-nocerts", "-out", tmp_path / "key.pem"], check=True, capture_output=True)
    subprocess.run(["openssl", "cms", "-decrypt", "-in", tmp_path / "msg.p7m", "-inkey", tmp_path / "key.pem",
                    "-out", tmp_path / "out.txt"], check=True)
    assert (tmp_path / "out.txt").read_text() == "old mail\n"

    everything = life.agent("recover", "--email", email, "--all").stdout
    assert "recovered 1 key(s)" in everything


def test_recover_refuses_unknown_and_foreign_serials(life, new_user):
    _, email = new_user(("smime-users",))
    _, other = new_user(("smime-users",))
    for who in (email, other):
        invite_and_bootstrap(life, who)
    life.agent("enroll", "--email", other, "--profile", "smime-encryption-ec")
    theirs = json.loads((life.data / "agent-store" / other / "state.json").read_text())["current"]["smime-encryption-ec"]
    unknown = life.agent("recover", "--email", email, "--serial", "abcdef", check=False)
    assert unknown.returncode == 1 and "unknown_certificate" in unknown.stderr
    foreign = life.agent("recover", "--email", email, "--serial", theirs, check=False)
    assert foreign.returncode == 1 and "unknown_certificate" in foreign.stderr  # no ownership oracle
    revoke = life.agent("revoke", "--email", email, "--serial", theirs, check=False)
    assert revoke.returncode == 1 and "unknown_certificate" in revoke.stderr


def test_two_concurrent_renewals_produce_one_certificate(life, new_user):
    _, email = new_user(("smime-users",))
    invite_and_bootstrap(life, email)
    life.agent("enroll", "--email", email, "--profile", "smime-encryption-ec")
    with life.transaction() as session:
        before = session.execute(select(func.count()).select_from(Certificate).where(
            Certificate.email == email)).scalar_one()

    def attempt(_):
        c, store = client(life)
        with c:
            try:
                return renew(c, store, email, "smime-encryption-ec", force=True).serial
            except AgentError as exc:
                return exc.code

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(attempt, range(2)))
    assert sorted(o == "conflict" for o in outcomes) == [False, True], outcomes
    with life.transaction() as session:
        after = session.execute(select(func.count()).select_from(Certificate).where(
            Certificate.email == email)).scalar_one()
        current = session.execute(select(func.count()).select_from(Certificate).where(
            Certificate.email == email, Certificate.profile == "smime-encryption-ec",
            Certificate.status == "valid")).scalar_one()
    assert after == before + 1 and current == 1


def officer(life, who, *args, check=True):
    return life.agent("officer", args[0], "--as", who, *args[1:], check=check)


def test_two_of_three_officers_release_once(life, officers, new_user, ldap_admin):
    oscar, olivia, otto = officers
    dn, email = new_user(("smime-users",))
    invite_and_bootstrap(life, email)
    life.agent("enroll", "--email", email, "--profile", "smime-encryption-ec")
    out = officer(life, oscar, "request", "--user", email, "--reason", "legal hold 2026-17").stdout
    request_id = out.split()[2].rstrip(":")

    own = officer(life, oscar, "approve", request_id, check=False)
    assert "self_approval" in own.stderr
    non_officer = life.agent("officer", "approve", "--as", email, request_id, check=False)
    assert "not_officer" in non_officer.stderr
    assert "approvals 1/2" in officer(life, olivia, "approve", request_id).stdout
    early = officer(life, oscar, "release", request_id, check=False)
    assert "recovery_not_ready" in early.stderr
    again = officer(life, olivia, "approve", request_id, check=False)
    assert "already_approved" in again.stderr
    assert "approved" in officer(life, otto, "approve", request_id).stdout
    wrong = officer(life, olivia, "release", request_id, check=False)
    assert "not_requester" in wrong.stderr and "Only the officer who opened" in wrong.stderr
    released = officer(life, oscar, "release", request_id).stdout
    assert "released" in released and ".p12" in released
    twice = officer(life, oscar, "release", request_id, check=False)
    assert twice.returncode == 1 and "recovery_not_ready" in twice.stderr

    with life.transaction() as session:
        events = [e for (e,) in session.execute(select(audit.AuditEvent.event).where(
            audit.AuditEvent.detail.is_not(None)))]
    for event in ("recovery.requested", "recovery.approved", "recovery.released", "key.recovered", "request.denied"):
        assert event in events
    assert "audit log intact" in life.autoenroll("audit", "verify").stdout


def test_an_expired_recovery_request_cannot_be_completed(life, officers, new_user):
    oscar, olivia, otto = officers
    _, email = new_user(("smime-users",))
    invite_and_bootstrap(life, email)
    life.agent("enroll", "--email", email, "--profile", "smime-encryption-ec")
    request_id = officer(life, oscar, "request", "--user", email, "--reason", "left").stdout.split()[2].rstrip(":")
    officer(life, olivia, "approve", request_id)
    with life.transaction() as session:  # the clock moves past the deadline
        session.execute(update(RecoveryRequest).where(RecoveryRequest.id == request_id).values(
            expires_at=datetime.now(timezone.utc) - timedelta(minutes=1)))
    late = officer(life, otto, "approve", request_id, check=False)
    assert "recovery_expired" in late.stderr
    release = officer(life, oscar, "release", request_id, check=False)
    assert "recovery_expired" in release.stderr


def test_a_scoped_agent_is_refused_for_users_outside_its_domain(tmp_path_factory, slapd, new_user):
    """agent_scopes limits a user server to mail domains: the demo agent may act for example.net only."""
    p = make_platform(tmp_path_factory.mktemp("scoped"), slapd.url, agent_scopes=["agent.example.org=example.net"],
                      **SUITE_SETTINGS)
    try:
        p.start()
        _, email = new_user(("smime-users",))
        code = p.autoenroll("invite", email).stdout.strip()
        refused = p.agent("bootstrap", "--email", email, "--code", code, check=False)
        assert refused.returncode == 1 and "agent_not_allowed" in refused.stderr and "example.net" in refused.stderr
    finally:
        p.stop()


# --- an approval counts at release only while its officer still is one -------------------

OFFICERS_GROUP = "cn=recovery-officers,ou=groups,dc=example,dc=org"


def fresh_officers(life, new_user, count: int = 3) -> list[tuple[str, str]]:
    """(dn, email) of new members of the officers' group, each with a signature certificate."""
    made = [new_user(("recovery-officers",)) for _ in range(count)]
    for _, email in made:
        invite_and_bootstrap(life, email)
    return made


def set_officer(ldap_admin, dn: str, member: bool) -> None:
    change = "MODIFY_ADD" if member else "MODIFY_DELETE"
    assert ldap_admin.modify(OFFICERS_GROUP, {"member": [(change, [dn])]}), ldap_admin.result


def keys_released(life, request_id: str) -> list[str]:
    with life.transaction() as session:
        return [e.detail.get("serial") for (e,) in session.execute(select(audit.AuditEvent).where(
            audit.AuditEvent.event == "key.recovered")) if e.detail.get("request_id") == request_id]


def refused_release(life, requester: str, request_id: str) -> str:
    """The release is refused with 409 recovery_not_ready and hands out no key; returns the message."""
    out = officer(life, requester, "release", request_id, check=False)
    assert out.returncode == 1 and "recovery_not_ready" in out.stderr, out.stdout + out.stderr
    assert ".p12" not in out.stdout and keys_released(life, request_id) == []
    with life.transaction() as session:
        assert session.get(RecoveryRequest, request_id).status == "approved"  # nothing was claimed
    return out.stderr


def release_refusals(life, request_id: str) -> list[dict]:
    with life.transaction() as session:
        return [e.detail for (e,) in session.execute(select(audit.AuditEvent).where(
            audit.AuditEvent.event == "recovery.release_refused")) if e.detail["request_id"] == request_id]


def opened_and_approved(life, new_user, requester: str, *approvers: str) -> tuple[str, str]:
    _, email = new_user(("smime-users",))
    invite_and_bootstrap(life, email)
    life.agent("enroll", "--email", email, "--profile", "smime-encryption-ec")
    request_id = officer(life, requester, "request", "--user", email, "--reason", "audit 12.1").stdout.split()[2].rstrip(":")
    for who in approvers:
        officer(life, who, "approve", request_id)
    return request_id, email


def test_an_officer_removed_before_the_release_no_longer_counts_and_putting_them_back_restores(
        life, new_user, ldap_admin):
    (_, requester), (_, first), (third_dn, third) = fresh_officers(life, new_user)
    request_id, _ = opened_and_approved(life, new_user, requester, first, third)
    set_officer(ldap_admin, third_dn, member=False)

    assert f"approval by {third} no longer counts: not an officer" in officer(life, requester, "show", request_id).stdout
    assert "1 approvals by current officers; 2 are needed" in refused_release(life, requester, request_id)
    [refusal] = release_refusals(life, request_id)
    assert refusal["counted"] == [first] and refusal["discounted"] == [{"officer": third, "why": "not an officer"}]

    set_officer(ldap_admin, third_dn, member=True)
    assert "no longer counts" not in officer(life, requester, "show", request_id).stdout
    released = officer(life, requester, "release", request_id).stdout
    assert "released" in released and ".p12" in released and len(keys_released(life, request_id)) == 1
    assert "audit log intact" in life.autoenroll("audit", "verify").stdout


def test_an_officer_removed_between_the_two_approvals_does_not_make_the_quorum(life, new_user, ldap_admin):
    (_, requester), (first_dn, first), (_, third) = fresh_officers(life, new_user)
    request_id, _ = opened_and_approved(life, new_user, requester, first)
    set_officer(ldap_admin, first_dn, member=False)
    assert "approved" in officer(life, third, "approve", request_id).stdout  # two recorded approvals

    refused_release(life, requester, request_id)
    assert release_refusals(life, request_id)[0]["discounted"] == [{"officer": first, "why": "not an officer"}]
    # The KRA of the server platform checks again by itself: a request marked released is not enough.
    settings = load_settings(life.config)
    services = build_services(settings, run_migrations=False)
    try:
        with services.db.transaction() as session:
            session.execute(update(RecoveryRequest).where(RecoveryRequest.id == request_id).values(status="released"))
            row = session.get(RecoveryRequest, request_id)
            serial, target = row.serials[0], row.target_email
        from registration_app.authorities.kra import RecoveryGrant
        from registration_app.core.errors import Forbidden
        grant = RecoveryGrant(kind="officers", email=target, actor=requester, request_id=request_id)
        with pytest.raises(Forbidden, match="1 approvals .* come from current officers"):
            services.kra.recover(serial, grant)
    finally:
        services.close()


def test_an_approval_signed_with_a_certificate_revoked_since_no_longer_counts(life, new_user):
    (_, requester), (_, first), (_, third) = fresh_officers(life, new_user)
    request_id, _ = opened_and_approved(life, new_user, requester, first, third)
    _, store = client(life)
    serial = format(store.user(first).signature_chain()[0].serial_number, "x")
    life.autoenroll("revoke", serial, "--reason", "keyCompromise")

    assert f"approval by {first} no longer counts: certificate revoked" in \
        officer(life, requester, "show", request_id).stdout
    refused_release(life, requester, request_id)
    assert release_refusals(life, request_id)[0]["discounted"] == [{"officer": first, "why": "certificate revoked"}]

    # With a new certificate the officer approves again; that approval replaces the one that lapsed.
    invite_and_bootstrap(life, first)
    officer(life, first, "approve", request_id)
    assert "no longer counts" not in officer(life, requester, "show", request_id).stdout
    assert ".p12" in officer(life, requester, "release", request_id).stdout
