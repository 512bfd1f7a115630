"""The split deployment: RA, CA and KRA as three `autoenroll serve` processes (mTLS between them), one
database and the session's slapd. A user's whole path goes through the RA; the KRA refuses evidence the
user did not sign for this key, and the RA runs without the CA's or the KRA's private key."""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives.serialization import pkcs12
from sqlalchemy import select

from bench.platform import SUITE_SETTINGS, ServerPlatform, cli, configure
from bench.postgres import database_url_for
from directory_sync.slapd import free_port
from registration_app.agent.jws import sign_user_request
from registration_app.agent.store import AgentStore
from registration_app.store import audit
from registration_app.store.models import AuditEvent, Certificate, Escrow, RecoveryApproval, RecoveryRequest
from registration_app.authorities.keys import generate_private_key
from registration_app.authorities.pki_files import write_private_key
from registration_app.core.errors import ConfigError
from registration_app.core.model import KeyType
from registration_app.wiring import check_role
from registration_app.settings import load_settings
from tests.softhsm import MODULE, access_of, key_store_options, private_key_blocks, usage_of
from tests.e2e.test_enrollment import invite_and_bootstrap, ldap_certificates

RA_CLIENT = "ra.internal"
# What each host receives from the `autoenroll init` directory (README, "Split deployment").
LAYOUT = {
    "ca": ["ca.key", "ca.pem", "tls-ca.pem", "server.pem", "server.key", "passphrase", "audit.secret"],
    "kra": ["kra.key", "kra.pem", "ca.pem", "tls-ca.pem", "server.pem", "server.key", "passphrase", "audit.secret"],
    "ra": ["ca.pem", "kra.pem", "tls-ca.pem", "server.pem", "server.key", "ra-client.pem", "ra-client.key",
           "agent.pem", "agent.key", "nonce.secret", "codes.secret", "audit.secret"],
}
# The RA client certificate, issued by the TLS CA with openssl exactly as the README says.
RA_CLIENT_EXT = f"""basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectAltName = DNS:{RA_CLIENT}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


def issue_ra_client_certificate(data: Path) -> None:
    (data / "ra-client.ext").write_text(RA_CLIENT_EXT)
    for command in (
        ["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", "ra-client.key", "-subj", f"/CN={RA_CLIENT}", "-out", "ra-client.csr"],
        ["openssl", "x509", "-req", "-in", "ra-client.csr", "-CA", "tls-ca.pem", "-CAkey", "tls-ca.key",
         "-passin", "file:passphrase", "-days", "825", "-sha256", "-extfile", "ra-client.ext",
         "-out", "ra-client.pem"],
    ):
        subprocess.run(command, cwd=data, check=True, capture_output=True)
    (data / "ra-client.key").chmod(0o600)


def move_keys_into_tokens(hsm, init: Path) -> dict[str, dict]:
    """The softhsm variant: init made the CA key in the CA's token; the KRA key and the TLS CA key go
    into tokens of their own with `autoenroll keys import-to-token`, and their files are destroyed (as
    the command says). Returns the [key_store] table of each role that has one."""
    config = str(init / "autoenroll.toml")
    for name, label in (("kra", "split-kra"), ("tls_ca", "split-tls")):
        hsm.new_token(label, init / f"{label}.pin")
        out = cli("autoenroll", "--config", config, "keys", "import-to-token", name, "--token", label,
                  "--pin-file", f"{label}.pin")
        assert "DESTROY THE FILE COPY" in out.stderr
        (init / {"kra": "kra.key", "tls_ca": "tls-ca.key"}[name]).unlink()
    table = {"module": MODULE, "pin_file": "token.pin"}
    return {"ca": {"in_token": ["ca"], **table, "token": "split-ca"},
            "kra": {"in_token": ["kra"], **table, "token": "split-kra"}}


def token_dir(hsm, label: str) -> Path:
    """The folder of SoftHSM's token `label` (its token.object names the label, blank-padded to 32)."""
    (folder,) = [d for d in hsm.tokens.iterdir() if label.encode().ljust(32) in (d / "token.object").read_bytes()]
    return folder


@pytest.fixture(scope="module", params=["files", "softhsm"])
def split(request, tmp_path_factory, slapd):
    """Run twice: keys in files, then each authority's key in a SoftHSM2 token of its own."""
    root = tmp_path_factory.mktemp("split")
    init = root / "init"
    init.mkdir(mode=0o700)
    database_url = database_url_for() or f"sqlite:///{init / 'autoenroll.db'}"  # one database for all three
    (init / "autoenroll.toml").write_text(f'data_dir = "."\ndatabase_url = "{database_url}"\n'
                                          f'[ldap]\nurl = "{slapd.url}"\n')
    in_tokens = request.param == "softhsm"
    hsm = request.getfixturevalue("softhsm") if in_tokens else None
    options = key_store_options(hsm, "split-ca", init, "kra", "tls_ca") if hsm else []
    cli("autoenroll", "--config", str(init / "autoenroll.toml"), "init", *options)
    issue_ra_client_certificate(init)
    key_store_tables = move_keys_into_tokens(hsm, init) if hsm else {}
    layout = {role: [name for name in files if (init / name).exists()] for role, files in LAYOUT.items()}
    if hsm:
        layout["ca"].append("token.pin")
        (init / "split-kra.pin").rename(init / "kra-token.pin")
    ports = {role: free_port() for role in LAYOUT}
    ca_http = free_port()
    urls = {role: f"https://localhost:{port}" for role, port in ports.items()}
    role_settings: dict[str, dict] = {
        "ca": {"http_bind": f"127.0.0.1:{ca_http}", "authority_clients": [RA_CLIENT]},
        "kra": {"http_bind": "", "authority_clients": [RA_CLIENT]},
        "ra": {"http_bind": "", "ca_url": urls["ca"], "kra_url": urls["kra"]},
    }
    platforms = {}
    for role, files in layout.items():
        data = root / role
        data.mkdir(mode=0o700)
        for name in files:
            shutil.copy2(init / name, data / name)
        if hsm and role == "kra":
            shutil.copy2(init / "kra-token.pin", data / "token.pin")
        platforms[role] = configure(data, slapd.url, role=role, key_store=key_store_tables.get(role),
                                    database_url=database_url, public_url=urls[role],
                                    http_url=f"http://127.0.0.1:{ca_http}", bind=f"127.0.0.1:{ports[role]}",
                                    **role_settings[role], **SUITE_SETTINGS)
    if hsm:  # each authority's token folder, to take it away mid-run
        platforms["ca"].token_dir = token_dir(hsm, "split-ca")  # type: ignore[attr-defined]
        platforms["kra"].token_dir = token_dir(hsm, "split-kra")  # type: ignore[attr-defined]
    (root / "ra" / "agent.toml").write_text(f'server = "{urls["ra"]}"\ncert = "agent.pem"\nkey = "agent.key"\n'
                                            'server_ca = "tls-ca.pem"\nstore = "agent-store"\n')
    try:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda p: p.start(workers=1), platforms.values()))
        yield platforms
    finally:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda p: p.stop(), platforms.values()))



def audit_rows(split, event: str) -> list[audit.AuditEvent]:
    with split["ra"].transaction() as session:
        return list(session.execute(select(audit.AuditEvent).where(audit.AuditEvent.event == event)).scalars())


def openssl_decrypts(p12: Path, password: str, message: Path, recipient: Path, tmp: Path) -> str:
    subprocess.run(["openssl", "pkcs12", "-in", p12, "-passin", f"pass:{password}", "-nodes", "-nocerts",
                    "-out", tmp / "key.pem"], check=True, capture_output=True)
    subprocess.run(["openssl", "cms", "-decrypt", "-in", message, "-inkey", tmp / "key.pem", "-recip", recipient,
                    "-out", tmp / "out.txt"], check=True)
    return (tmp / "out.txt").read_text()


def enroll(ra: ServerPlatform, email: str) -> tuple[str, Path]:
    invite_and_bootstrap(ra, email)
    out = ra.agent("enroll", "--email", email, "--profile", "smime-encryption-ec").stdout
    assert "published in the directory" in out  # the RA asked the CA, which published inline
    state = json.loads((ra.data / "agent-store" / email / "state.json").read_text())
    serial = state["current"]["smime-encryption-ec"]
    return serial, ra.data / "agent-store" / email / f"smime-encryption-ec-{serial}.p12"


def test_a_user_enrolls_reads_mail_and_recovers_through_the_ra(split, new_user, tmp_path):
    ra = split["ra"]
    _, email = new_user(("smime-users",))
    serial, p12 = enroll(ra, email)

    # Anyone encrypts to what the directory shows; the delivered PKCS#12 decrypts it.
    published = ldap_certificates(ra, email)
    (tmp_path / "cert.der").write_bytes(published[0])
    subprocess.run(["openssl", "x509", "-inform", "DER", "-in", tmp_path / "cert.der", "-out", tmp_path / "cert.pem"],
                   check=True)
    assert format(x509.load_pem_x509_certificate((tmp_path / "cert.pem").read_bytes()).serial_number, "x") == serial
    (tmp_path / "msg.txt").write_text("split but readable\n")
    subprocess.run(["openssl", "cms", "-encrypt", "-aes256", "-in", tmp_path / "msg.txt", "-out", tmp_path / "msg.p7m",
                    tmp_path / "cert.pem"], check=True)
    password = p12.with_suffix(".pass").read_text()
    assert openssl_decrypts(p12, password, tmp_path / "msg.p7m", tmp_path / "cert.pem", tmp_path) == \
        "split but readable\n"

    # Self-service recovery: the KRA checked the user's signed request itself, then wrapped the key.
    out = ra.agent("recover", "--email", email, "--serial", serial).stdout
    recovered = Path(out.strip().splitlines()[-1].split(": ", 1)[1])
    assert openssl_decrypts(recovered, recovered.with_suffix(".pass").read_text(), tmp_path / "msg.p7m",
                            tmp_path / "cert.pem", tmp_path) == "split but readable\n"
    assert len([r for r in audit_rows(split, "key.recovered") if r.detail["serial"] == serial]) == 1
    verified = [r for r in audit_rows(split, "recovery.evidence_verified") if r.detail["serial"] == serial]
    assert len(verified) == 1 and verified[0].actor == email

    # Revocation goes through the CA, which publishes: the value leaves the directory, the CRL lists it.
    ra.agent("revoke", "--email", email, "--serial", serial, "--reason", "keyCompromise")
    assert published[0] not in ldap_certificates(ra, email)
    crl = x509.load_der_x509_crl(requests.get(split["ca"].http_url + "/crl/ca.crl", timeout=5).content)
    assert crl.get_revoked_certificate_by_serial_number(int(serial, 16)) is not None
    assert "audit log intact" in ra.autoenroll("audit", "verify").stdout


def officer(ra: ServerPlatform, who: str, *args: str, check: bool = True):
    return ra.agent("officer", args[0], "--as", who, *args[1:], check=check)


def test_two_officers_release_through_the_ra_and_the_kra_checks_their_signatures(split, new_user):
    ra = split["ra"]
    oscar, olivia, otto = "oscar@example.org", "olivia@example.org", "otto@example.org"
    for who in (oscar, olivia, otto):
        invite_and_bootstrap(ra, who)
    _, email = new_user(("smime-users",))
    serial, _ = enroll(ra, email)
    request_id = officer(ra, oscar, "request", "--user", email, "--reason", "legal hold").stdout.split()[2].rstrip(":")
    officer(ra, olivia, "approve", request_id)
    officer(ra, otto, "approve", request_id)
    released = officer(ra, oscar, "release", request_id).stdout
    assert "released" in released and ".p12" in released
    assert len([r for r in audit_rows(split, "key.recovered") if r.detail["serial"] == serial]) == 1
    verified = [r for r in audit_rows(split, "recovery.evidence_verified") if r.detail["serial"] == serial]
    assert len(verified) == 1 and verified[0].actor == ", ".join((oscar, olivia, otto))

    # What the shared database holds (the opening and the approvals) is not enough for a compromised RA:
    # the release is signed by the requester's key, and what was used is not used again.
    with split["ra"].transaction() as session:
        opening = session.get(RecoveryRequest, request_id).evidence
        approvals = [a for (a,) in session.execute(select(RecoveryApproval.evidence).where(
            RecoveryApproval.request_id == request_id))]
    body = recover_body(serial, email, opening, *approvals, kind="officers", request_id=request_id)
    refused(authority(split).post(split["kra"].url + "/authority/v1/kra/recover", json=body, timeout=10),
            403, "evidence_refused")


def test_an_approver_removed_from_the_officers_group_is_discounted_by_the_ra_and_by_the_kra(
        split, new_user, ldap_admin):
    """Approvals count at release, in the split deployment: the RA refuses the release, and the KRA, given the very same
    signed evidence by a compromised RA, refuses it by itself; putting the officer back restores."""
    ra, group = split["ra"], "cn=recovery-officers,ou=groups,dc=example,dc=org"
    officers = [new_user(("recovery-officers",)) for _ in range(3)]
    for _, who in officers:
        invite_and_bootstrap(ra, who)
    (_, requester), (_, first), (third_dn, third) = officers
    dn, email = new_user(("smime-users",))
    serial, _ = enroll(ra, email)
    ldap_admin.search(dn, "(objectClass=*)", "BASE", attributes=["entryUUID"])
    with ra.transaction() as session:  # the CA service recorded the entry the RA found (entryUUID)
        assert session.get(Certificate, serial).entry_id == ldap_admin.response[0]["attributes"]["entryUUID"][0]
    request_id = officer(ra, requester, "request", "--user", email, "--reason", "hold").stdout.split()[2].rstrip(":")
    officer(ra, first, "approve", request_id)
    officer(ra, third, "approve", request_id)
    assert ldap_admin.modify(group, {"member": [("MODIFY_DELETE", [third_dn])]}), ldap_admin.result

    assert f"approval by {third} no longer counts: not an officer" in officer(ra, requester, "show", request_id).stdout
    early = officer(ra, requester, "release", request_id, check=False)
    assert early.returncode == 1 and "recovery_not_ready" in early.stderr and ".p12" not in early.stdout
    [refusal] = [r for r in audit_rows(split, "recovery.release_refused") if r.detail["request_id"] == request_id]
    assert refusal.detail["discounted"] == [{"officer": third, "why": "not an officer"}]

    with ra.transaction() as session:
        opening = session.get(RecoveryRequest, request_id).evidence
        approvals = [a for (a,) in session.execute(select(RecoveryApproval.evidence).where(
            RecoveryApproval.request_id == request_id))]
    release = owner_evidence(ra, requester, {"password": "pw-12"}, path=f"recovery-requests/{request_id}/release")
    body = recover_body(serial, email, opening, *approvals, release, kind="officers", request_id=request_id)
    answer = authority(split).post(split["kra"].url + "/authority/v1/kra/recover", json=body, timeout=10)
    refused(answer, 403, "evidence_refused")
    assert f"{third}: not an officer" in answer.json()["detail"]
    assert not [r for r in audit_rows(split, "key.recovered") if r.detail["serial"] == serial]

    assert ldap_admin.modify(group, {"member": [("MODIFY_ADD", [third_dn])]}), ldap_admin.result
    released = officer(ra, requester, "release", request_id).stdout
    assert "released" in released and ".p12" in released
    assert len([r for r in audit_rows(split, "key.recovered") if r.detail["serial"] == serial]) == 1


# --- a compromised RA talking to the KRA directly -----------------------------------------------


def authority(split, client: str | None = "ra-client") -> requests.Session:
    s = requests.Session()
    s.trust_env = False
    s.verify = str(split["ra"].data / "tls-ca.pem")
    if client is not None:
        s.cert = tuple(str(split["ra"].data / f"{client}.{ext}") for ext in ("pem", "key"))
    return s


def owner_evidence(ra: ServerPlatform, email: str, payload: dict, path: str = "recover") -> bytes:
    folder = AgentStore(ra.data / "agent-store").user(email)
    return sign_user_request(payload, key=folder.signature_key(), chain=folder.signature_chain(), nonce="spent",
                             url=f"{ra.url}/api/v1/{path}", agent_thumbprint="not-checkable-by-the-kra")


def recover_body(serial: str, email: str, *evidence: bytes, kind: str = "owner", request_id: str | None = None):
    return {"serial": serial, "friendly_name": "x",
            "grant": {"kind": kind, "email": email, "actor": "compromised ra", "request_id": request_id,
                      "evidence": [base64.b64encode(e).decode() for e in evidence]}}


def refused(response: requests.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/problem+json")
    assert response.json()["code"] == code, response.json()


def test_the_kra_refuses_evidence_the_owner_did_not_sign_for_this_key(split, new_user):
    ra, kra_url = split["ra"], split["kra"].url + "/authority/v1/kra/recover"
    _, email = new_user(("smime-users",))
    _, other = new_user(("smime-users",))
    serial, _ = enroll(ra, email)
    invite_and_bootstrap(ra, other)
    s = authority(split)

    def post(body, session=s):
        return session.post(kra_url, json=body, timeout=10)

    genuine = owner_evidence(ra, email, {"password": "pw-1", "serials": [serial]})
    refused(post(recover_body(serial, email, genuine), authority(split, None)), 401, "no_client_certificate")
    refused(post(recover_body(serial, email, genuine), authority(split, "agent")), 403, "agent_not_allowed")
    refused(authority(split, "agent").post(split["ca"].url + "/authority/v1/ca/revoke", json={
        "serial": serial, "reason": "keyCompromise", "actor": "an agent"}, timeout=10), 403, "agent_not_allowed")

    forged = json.loads(genuine)
    forged["payload"] = base64.urlsafe_b64encode(json.dumps({"password": "mine", "all": True}).encode()).rstrip(
        b"=").decode()
    refused(post(recover_body(serial, email, json.dumps(forged).encode())), 401, "bad_signature")
    someone_else = owner_evidence(ra, other, {"password": "pw", "serials": [serial]})
    refused(post(recover_body(serial, email, someone_else)), 403, "evidence_refused")
    refused(post(recover_body(serial, other, someone_else)), 403, "evidence_refused")
    wrong_path = owner_evidence(ra, email, {"password": "pw", "serials": [serial]}, path="certificates")
    refused(post(recover_body(serial, email, wrong_path)), 403, "evidence_refused")
    other_serial = owner_evidence(ra, email, {"password": "pw", "serials": ["abcdef0123"]})
    refused(post(recover_body(serial, email, other_serial)), 403, "evidence_refused")
    refused(post(recover_body(serial, email)), 403, "evidence_refused")
    refused(post(recover_body(serial, email, genuine, kind="officers", request_id="x")), 403, "evidence_refused")

    # What the user did sign works once: the PKCS#12 opens with the password of the signed payload.
    answer = post(recover_body(serial, email, genuine))
    assert answer.status_code == 200, answer.text
    key, cert, _ = pkcs12.load_key_and_certificates(base64.b64decode(answer.json()["pkcs12"]), b"pw-1")
    assert format(cert.serial_number, "x") == serial and key is not None
    refused(post(recover_body(serial, email, genuine)), 403, "evidence_refused")  # replayed

    # Escrow accepts only a blob that opens with the KRA's key for this serial and user.
    refused(s.post(split["kra"].url + "/authority/v1/kra/escrow", json={
        "serial": "abcdef0123456789abcdef", "sealed": base64.b64encode(b"not sealed").decode(), "email": email,
        "profile": "smime-encryption-ec", "actor": "compromised ra"}, timeout=10), 400, "bad_request")
    assert [r for r in audit_rows(split, "key.recovery_refused") if r.detail["serial"] == serial]


def test_the_ra_runs_without_authority_keys_and_refuses_to_start_with_one(split, new_user):
    ra = split["ra"]
    serial, _ = enroll(ra, new_user(("smime-users",))[1])  # it issues, holding no authority key
    assert not any((ra.data / name).exists() for name in ("ca.key", "kra.key", "tls-ca.key"))
    with split["ra"].transaction() as session:
        assert session.execute(select(Certificate.serial).where(Certificate.serial == serial)).first() is not None
    if (ra.data.parent / "init" / "ca.key").exists():
        shutil.copy2(ra.data.parent / "init" / "ca.key", ra.data / "ca.key")
    else:  # the softhsm variant: the CA key is in a token; a CA key file is refused all the same
        write_private_key(ra.data / "ca.key", generate_private_key(KeyType.EC_P256), b"any passphrase")
    try:
        result = ra.autoenroll("serve", check=False)
    finally:
        (ra.data / "ca.key").unlink()
    assert result.returncode != 0 and "must not hold ca.key" in result.stderr


def test_no_authority_key_is_a_file_and_the_tokens_show_them_sensitive_never_extractable(split, softhsm):
    if not load_settings(split["ca"].config).key_store.in_token:
        pytest.skip("the files variant: keys in files (test above)")
    for data in (split["ca"].data, split["kra"].data, split["ra"].data, split["ca"].data.parent / "init"):
        assert not [p.name for p in data.iterdir() if p.name in ("ca.key", "kra.key", "tls-ca.key")]
    for role, label, holds in (("ca", "split-ca", "autoenroll-ca"), ("kra", "split-kra", "autoenroll-kra")):
        keys = private_key_blocks(softhsm.list_objects(label, split[role].data / "token.pin"))
        assert list(keys) == [holds]  # each token holds its authority's key only
        access = access_of(keys[holds])
        assert "sensitive" in access and "extractable" not in access
    # Generated in its token, the CA key never was extractable; the KRA key was imported from its file.
    ca_keys = private_key_blocks(softhsm.list_objects("split-ca", split["ca"].data / "token.pin"))
    assert {"never extractable", "local"} <= access_of(ca_keys["autoenroll-ca"])
    kra_keys = private_key_blocks(softhsm.list_objects("split-kra", split["kra"].data / "token.pin"))
    assert usage_of(kra_keys["autoenroll-kra"]) == {"decrypt", "unwrap"}  # it signs nothing


@contextmanager
def a_key_in_the_token(service, token: str, key_type: str, label: str) -> Iterator[None]:
    """A key pair labelled `label` generated in the service's token for the block, deleted after it (the
    token variant only: the files variant skips)."""
    if not load_settings(service.config).key_store.in_token:
        pytest.skip("the files variant: keys in files (test above)")
    pin = (service.data / "token.pin").read_text().strip()
    tool = ["pkcs11-tool", "--module", MODULE, "--token-label", token, "--login", "--pin", pin]
    subprocess.run([*tool, "--keypairgen", "--key-type", key_type, "--label", label], check=True, capture_output=True)
    try:
        yield
    finally:
        for kind in ("privkey", "pubkey"):
            subprocess.run([*tool, "--delete-object", "--type", kind, "--label", label],
                           check=True, capture_output=True)


def test_the_ca_refuses_to_start_with_the_kras_key_in_its_token(split, softhsm):
    """The "holds no key it does not use" check covers tokens: a key labelled as the KRA's in the CA's token."""
    ca = split["ca"]
    with a_key_in_the_token(ca, "split-ca", "rsa:2048", "autoenroll-kra"):
        result = ca.autoenroll("serve", check=False)
    assert result.returncode != 0 and "must not hold autoenroll-kra in token 'split-ca'" in result.stderr


def test_the_kra_refuses_to_start_with_the_cas_key_in_its_token(split, softhsm):
    """The same check the other way round: a key labelled as the CA's in the KRA's token."""
    kra = split["kra"]
    with a_key_in_the_token(kra, "split-kra", "EC:prime256v1", "autoenroll-ca"):
        with pytest.raises(ConfigError, match="must not hold autoenroll-ca in token 'split-kra'"):
            check_role(load_settings(kra.config))
    check_role(load_settings(kra.config))  # as it was: it starts


@pytest.mark.parametrize("role, in_token, refused", [
    ("kra", {"kra", "ca"}, "role 'kra' must not use ca (key_store.in_token)"),
    ("ca", {"ca", "kra"}, "role 'ca' must not use kra (key_store.in_token)"),
    ("ca", {"ca", "tls_ca"}, "role 'ca' must not use tls_ca (key_store.in_token)"),
    ("ra", {"kra"}, "role 'ra' must not use kra (key_store.in_token)"),
], ids=["kra names the CA key", "ca names the KRA key", "ca names the TLS CA key", "ra names a key"])
def test_a_split_role_whose_token_configuration_names_a_key_it_does_not_use_is_refused(split, role, in_token,
                                                                                        refused):
    settings = load_settings(split[role].config)
    if not settings.key_store.in_token and role != "ra":
        pytest.skip("the files variant: keys in files")
    token = settings.key_store if role != "ra" else dataclasses.replace(settings.key_store, module=MODULE,
                                                                          token="split-kra")
    with pytest.raises(ConfigError, match=re.escape(refused)):
        check_role(dataclasses.replace(settings, key_store=dataclasses.replace(token, in_token=frozenset(in_token))))


def test_the_ca_refuses_to_start_with_the_ras_nonce_key(split):
    ca = split["ca"]
    assert not (ca.data / "nonce.secret").exists() and (ca.data / "audit.secret").exists()
    shutil.copy2(ca.data.parent / "init" / "nonce.secret", ca.data / "nonce.secret")
    try:
        result = ca.autoenroll("serve", check=False)
    finally:
        (ca.data / "nonce.secret").unlink()
    assert result.returncode != 0 and "must not hold nonce.secret" in result.stderr


def test_the_kra_refuses_the_old_holder_of_an_address_the_keys_of_its_new_holder(split, new_user, ldap_admin):
    """Certificates belong to the entry, at the KRA too: the old holder's own signed request, for the address it had, does not open
    the keys escrowed since for the entry that holds the address now."""
    ra, kra_url = split["ra"], split["kra"].url + "/authority/v1/kra/recover"
    old_dn, email = new_user(("smime-users",))
    old_serial, _ = enroll(ra, email)
    captured = owner_evidence(ra, email, {"password": "pw-old", "all": True})  # signed while it was theirs
    assert ldap_admin.modify(old_dn, {"mail": [("MODIFY_REPLACE", ["gone-" + email])]}), ldap_admin.result
    new_dn, _ = new_user(("smime-users",))
    assert ldap_admin.modify(new_dn, {"mail": [("MODIFY_REPLACE", [email])]}), ldap_admin.result
    # The old holder's encryption certificate ends (as reconcile would end it), the signature one does not.
    split["ca"].autoenroll("revoke", old_serial, "--reason", "affiliationChanged")
    serial, _ = enroll(ra, email)  # the new holder's own certificates (the agent folder is reused)
    with ra.transaction() as session:
        assert session.get(Certificate, serial).user_dn == new_dn

    answer = authority(split).post(kra_url, json=recover_body(serial, email, captured), timeout=10)
    refused(answer, 403, "evidence_refused")
    assert "another directory entry" in answer.json()["detail"]


def escrows_of(split, email: str) -> dict[str, str]:
    """The state of each escrow of `email` at the KRA, by serial."""
    with split["ra"].transaction() as session:
        return dict(session.execute(select(Escrow.serial, Escrow.state).where(Escrow.email == email)).all())


def test_the_cas_token_removed_mid_run_leaves_no_recoverable_escrow_and_the_next_request_is_issued(
        split, new_user, tmp_path):
    """Nothing half-issued in the split deployment: the KRA recorded the key pending before the CA signed;
    the CA's token failed, so the key authority withdrew it (void, kept, never recoverable), the agent got
    the 503, and the audit log tells each step. The token back, the next request is issued, its escrow
    confirmed and recoverable."""
    ca, ra = split["ca"], split["ra"]
    token_dir = getattr(ca, "token_dir", None)
    if token_dir is None:
        pytest.skip("the files variant: the CA key is a file")
    _, email = new_user(("smime-users",))
    invite_and_bootstrap(ra, email)
    away = tmp_path / "ca-token-away"
    shutil.move(token_dir, away)  # out of SoftHSM's token folder: the CA's token is gone
    try:
        failed = ra.agent("enroll", "--email", email, "--profile", "smime-encryption-ec", check=False)
    finally:
        shutil.move(away, token_dir)
    assert failed.returncode == 1 and "key_store_unavailable" in failed.stderr
    [(serial, state)] = escrows_of(split, email).items()
    assert state == "void"
    with ra.transaction() as session:
        assert session.get(Certificate, serial) is None
        steps = session.execute(select(AuditEvent.event, AuditEvent.actor, AuditEvent.detail).where(
            AuditEvent.subject == email).order_by(AuditEvent.id)).all()
    assert [event for event, _, detail in steps if detail.get("serial") == serial] == [
        "key.escrow_pending", "key.escrow_withdrawn"]
    [withdrawn] = [detail for event, _, detail in steps if event == "key.escrow_withdrawn"]
    assert withdrawn["reason"] == "the CA failed: key_store_unavailable"
    assert [detail["code"] for event, _, detail in steps if event == "key_store.unavailable"] == \
        ["key_store_unavailable"]
    # The KRA gives nothing back for it, even to what its owner signed.
    genuine = owner_evidence(ra, email, {"password": "pw-void", "serials": [serial]})
    refused(authority(split).post(split["kra"].url + "/authority/v1/kra/recover",
                                  json=recover_body(serial, email, genuine), timeout=10), 404, "unknown_certificate")

    # The token is back: the next request is issued, escrowed (confirmed) and recoverable.
    out = ra.agent("enroll", "--email", email, "--profile", "smime-encryption-ec").stdout
    assert "published in the directory" in out
    issued = json.loads((ra.data / "agent-store" / email / "state.json").read_text())["current"]["smime-encryption-ec"]
    assert escrows_of(split, email) == {serial: "void", issued: "confirmed"}
    recovered = ra.agent("recover", "--email", email, "--serial", issued).stdout
    p12 = Path(recovered.strip().splitlines()[-1].split(": ", 1)[1])
    key, cert, _ = pkcs12.load_key_and_certificates(p12.read_bytes(), p12.with_suffix(".pass").read_text().encode())
    assert format(cert.serial_number, "x") == issued and key is not None
    for role in ("ra", "ca", "kra"):
        log = split[role].log.read_text()
        assert "request.bug" not in log and "Traceback" not in log, role  # no 5xx but the 503


def test_the_kras_token_removed_mid_run_issues_nothing_and_the_next_request_is_issued(split, new_user, tmp_path):
    """The first phase failing: the KRA cannot open the sealed key, so it records nothing, the CA signs
    nothing, the agent gets a 503 and the KRA's audit log says why."""
    kra, ra = split["kra"], split["ra"]
    token_dir = getattr(kra, "token_dir", None)
    if token_dir is None:
        pytest.skip("the files variant: the KRA key is a file")
    _, email = new_user(("smime-users",))
    invite_and_bootstrap(ra, email)
    away = tmp_path / "kra-token-away"
    shutil.move(token_dir, away)
    try:
        failed = ra.agent("enroll", "--email", email, "--profile", "smime-encryption-ec", check=False)
    finally:
        shutil.move(away, token_dir)
    assert failed.returncode == 1 and "escrow_failed" in failed.stderr
    assert escrows_of(split, email) == {}
    with ra.transaction() as session:
        assert not session.execute(select(Certificate.serial).where(
            Certificate.email == email, Certificate.usage == "encryption")).all()
        failures = session.execute(select(AuditEvent.detail).where(AuditEvent.event == "key_store.unavailable")).scalars()
        assert [d for d in failures if d["path"] == "/authority/v1/kra/escrow" and d["code"] == "key_store_unavailable"]

    out = ra.agent("enroll", "--email", email, "--profile", "smime-encryption-ec").stdout
    assert "published in the directory" in out
    assert list(escrows_of(split, email).values()) == ["confirmed"]
