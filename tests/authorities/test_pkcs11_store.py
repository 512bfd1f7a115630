"""The token's keys as cryptography keys (authorities/pkcs11_store.py), against a real SoftHSM2 token."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from registration_app.authorities.certs import build_ca_certificate
from registration_app.authorities.crl import build_crl
from registration_app.authorities.escrow_crypto import (ALG_RSA_OAEP_SHA1_AES256GCM, ALG_RSA_OAEP_SHA256_AES256GCM,
                                                        EscrowIntegrityError, escrow_aad, escrow_algorithm,
                                                        open_private_key, seal_private_key)
from registration_app.authorities.keys import generate_private_key
from registration_app.authorities.pkcs11_store import Token, _oaep_decode
from registration_app.core.errors import AlreadyExists, ConfigError, KeyStoreUnavailable
from registration_app.core.model import KeyType
from tests.softhsm import MODULE

NOW = datetime(2026, 12, 1, tzinfo=timezone.utc)
OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


@pytest.fixture
def token(softhsm, tmp_path) -> Token:
    label = f"unit-{uuid.uuid4().hex[:8]}"
    softhsm.new_token(label, tmp_path / "token.pin")
    return Token(MODULE, label, tmp_path / "token.pin")


@pytest.mark.parametrize("key_type", [KeyType.EC_P256, KeyType.RSA_3072], ids=["EC CA", "RSA CA"])
def test_a_ca_key_generated_in_the_token_signs_certificates_and_crls_that_verify(token, key_type):
    key = token.generate("ca", key_type)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Token CA")])
    ca = build_ca_certificate(key, name, NOW)
    ca.verify_directly_issued_by(ca)
    crl = build_crl(ca_cert=ca, ca_key=key, revoked=[(12345, NOW, x509.ReasonFlags.key_compromise)], number=1,
                    now=NOW, next_update=NOW + timedelta(hours=24))
    assert crl.is_signature_valid(ca.public_key())
    assert copy.deepcopy(key) is key and copy.copy(key) is key  # the builders copy keys: the same token key
    with pytest.raises(TypeError, match="never extractable"):
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption())


def test_the_kra_key_unwraps_escrows_and_a_tampered_one_fails_like_any_other(token):
    kra = token.generate("kra", KeyType.RSA_3072)
    assert isinstance(kra, rsa.RSAPrivateKey)
    user_key = generate_private_key(KeyType.EC_P256)
    aad = escrow_aad(0xABC, "alice@example.org", "smime-encryption")
    blob = seal_private_key(user_key, kra.public_key(), aad)
    opened = open_private_key(blob, kra, aad)
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert opened.public_key().public_bytes(*spki) == user_key.public_key().public_bytes(*spki)
    tampered = bytearray(blob)
    tampered[50] ^= 1  # inside the wrapped data key
    with pytest.raises(EscrowIntegrityError, match="failed its integrity check"):
        open_private_key(bytes(tampered), kra, aad)
    with pytest.raises(TypeError):
        kra.sign(b"x", padding.PKCS1v15(), hashes.SHA256())  # the KRA key signs nothing


def test_oaep_decoding_outside_the_token_matches_cryptography_and_refuses_any_change():
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    numbers = key.private_numbers()
    k = 256
    for message in (b"", os.urandom(32), os.urandom(190)):
        ciphertext = key.public_key().encrypt(message, OAEP)
        em = pow(int.from_bytes(ciphertext, "big"), numbers.d, numbers.public_numbers.n).to_bytes(k, "big")
        assert _oaep_decode(em) == message
        for position in (0, 1, 40, k - 1):
            changed = bytearray(em)
            changed[position] ^= 0x01
            with pytest.raises(ValueError, match="decryption failed"):
                _oaep_decode(bytes(changed))


def test_a_label_is_generated_once_and_a_missing_one_is_named(token, tmp_path):
    token.generate("tls_ca", KeyType.EC_P256)
    with pytest.raises(AlreadyExists, match="already holds a key labelled 'autoenroll-tls-ca'"):
        token.generate("tls_ca", KeyType.EC_P256)
    other = generate_private_key(KeyType.EC_P256)
    with pytest.raises(ConfigError, match="no private key labelled 'autoenroll-ca'"):
        with token.session(for_admin=True) as entry:
            token.private_key_object(entry, "ca")
    with pytest.raises(ConfigError, match="not the private half"):
        token.key("tls_ca", other.public_key()).check()


def test_two_tokens_of_one_label_are_refused_by_name_not_guessed(softhsm, tmp_path):
    """In a fresh process, as the server starts (a module loaded earlier sees only the tokens that existed
    then)."""
    label = f"twice-{uuid.uuid4().hex[:8]}"
    softhsm.new_token(label, tmp_path / "token.pin")
    (tmp_path / "second").mkdir()
    softhsm.new_token(label, tmp_path / "second" / "token.pin")
    opened = subprocess.run(
        [sys.executable, "-c", "import sys; from registration_app.authorities.pkcs11_store import Token\n"
         "with Token(sys.argv[1], sys.argv[2], sys.argv[3]).session(for_admin=True): pass",
         MODULE, label, str(tmp_path / "token.pin")], capture_output=True, text=True, timeout=60)
    assert opened.returncode != 0
    assert f"several PKCS#11 tokens are labelled '{label}'" in opened.stderr


def kra_key_allowed_only(token: Token, pin_file, *mechanisms: str):
    """A KRA key generated in the token by pkcs11-tool with CKA_ALLOWED_MECHANISMS: the token itself
    refuses every other mechanism with it, so what opens shows which mechanism the token ran."""
    pin = pin_file.read_text().strip()
    subprocess.run(["pkcs11-tool", "--module", MODULE, "--token-label", token.label, "--login", "--pin", pin,
                    "--keypairgen", "--key-type", "rsa:3072", "--label", "autoenroll-kra", "--id", "01",
                    "--usage-decrypt", "--allowed-mechanisms", ",".join(mechanisms)],
                   check=True, capture_output=True)
    from pkcs11 import Attribute, ObjectClass
    from registration_app.authorities.pkcs11_store import _public_key_of
    with token.session() as (session, _):
        [public] = session.get_objects({Attribute.LABEL: "autoenroll-kra", Attribute.CLASS: ObjectClass.PUBLIC_KEY})
        public_key = _public_key_of(public)
    return token.key("kra", public_key)


def test_a_new_escrow_unwraps_with_oaep_inside_a_token_that_allows_nothing_else(token, tmp_path):
    """SoftHSM 2.6.1 does CKM_RSA_PKCS_OAEP with SHA-1 only: new escrows are sealed so (escrow_crypto.py) and
    open with a key the token lets do nothing but OAEP; an escrow of the old algorithm (SHA-256) needs the
    token's raw RSA, which that key refuses: the refusal shows the new path never leaves the OAEP mechanism."""
    kra = kra_key_allowed_only(token, tmp_path / "token.pin", "RSA-PKCS-OAEP")
    user_key = generate_private_key(KeyType.EC_P256)
    aad = escrow_aad(0xABC, "alice@example.org", "smime-encryption")
    blob = seal_private_key(user_key, kra.public_key(), aad)
    assert escrow_algorithm(blob) == ALG_RSA_OAEP_SHA1_AES256GCM
    assert open_private_key(blob, kra, aad).private_numbers() == user_key.private_numbers()
    old = seal_private_key(user_key, kra.public_key(), aad, algorithm=ALG_RSA_OAEP_SHA256_AES256GCM)
    with pytest.raises(KeyStoreUnavailable):
        open_private_key(old, kra, aad)


def test_an_escrow_sealed_before_still_opens_with_a_kra_key_in_the_token(token):
    kra = token.generate("kra", KeyType.RSA_3072)
    user_key = generate_private_key(KeyType.RSA_2048)
    aad = escrow_aad(0xABD, "bob@example.org", "smime-encryption")
    old = seal_private_key(user_key, kra.public_key(), aad, algorithm=ALG_RSA_OAEP_SHA256_AES256GCM)
    assert open_private_key(old, kra, aad).private_numbers() == user_key.private_numbers()
    # and a KRA accepts new escrows of the current algorithm only
    with pytest.raises(EscrowIntegrityError, match="unknown format"):
        open_private_key(old, kra, aad, algorithms=(ALG_RSA_OAEP_SHA1_AES256GCM,))


# A server starting as the CA or the KRA of a split deployment does: open a session of its own token, check its
# key, close (the login ends with the last session, so every round logs in again, which rewrites token.object).
STARTS = """import sys
from cryptography.hazmat.primitives import serialization
from registration_app.authorities.pkcs11_store import Token
module, label, pin, pem, rounds = sys.argv[1:]
public_key = serialization.load_pem_public_key(open(pem, "rb").read())
for _ in range(int(rounds)):
    token = Token(module, label, pin)
    token.check({"ca": public_key})
    token.close()
print("started", rounds, "times")
"""


def finished(commands: list[list[str]], timeout: float) -> list[tuple[int, str, str]]:
    """Run the commands side by side; (returncode, stdout, stderr) of each once all have ended. Each is
    waited for (or killed at the timeout) before anything is asserted, so a failing one leaves no process
    running and no pipe open behind it for a later test to trip over (pytest's unraisable warnings)."""
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for command in commands]
    results = []
    for process in processes:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
            err += f"\n(killed after {timeout} s)"
        results.append((process.returncode, out, err))
    return results


@pytest.fixture
def token_folder(tmp_path, monkeypatch):
    """A SoftHSM folder of this test's own (the servers of the session do not read it), with two tokens,
    each with a CA key: as a CA's and a KRA's beside each other."""
    from tests.softhsm import SoftHsm
    monkeypatch.setenv("SOFTHSM2_CONF", "")  # SoftHsm.start sets it; restored after the test
    hsm = SoftHsm(tmp_path / "hsm")
    hsm.start()
    tokens = {}
    for label in ("left", "right"):
        pin = tmp_path / f"{label}.pin"
        hsm.new_token(label, pin)
        key = subprocess.run(
            [sys.executable, "-c", "import sys\nfrom cryptography.hazmat.primitives import serialization as s\n"
             "from registration_app.authorities.pkcs11_store import Token\nfrom registration_app.core.model import KeyType\n"
             "key = Token(*sys.argv[1:]).generate('ca', KeyType.EC_P256)\n"
             "print(key.public_key().public_bytes(s.Encoding.PEM, s.PublicFormat.SubjectPublicKeyInfo).decode())",
             MODULE, label, str(pin)], check=True, capture_output=True, text=True, timeout=60).stdout
        (tmp_path / f"{label}.pem").write_text(key)
        tokens[label] = (str(pin), str(tmp_path / f"{label}.pem"))
    return hsm, tokens


def test_two_servers_start_together_on_tokens_of_one_folder(token_folder):
    """The split deployment's flake: each process's login rewrites its token's token.object, which the other
    reads as it looks for its own token; before Token._open tried again, about one start in 200 failed
    with `token 'split-ca': GeneralError` (here, a few hundred rounds each)."""
    hsm, tokens = token_folder
    starts = finished([[sys.executable, "-c", STARTS, MODULE, label, *tokens[label], "300"] for label in tokens],
                      timeout=120)
    for returncode, out, err in starts:
        assert returncode == 0, err
        assert out.strip() == "started 300 times"


def test_a_token_file_left_empty_by_another_process_is_read_again_with_the_cause_logged(token_folder):
    """What the other process's login leaves for a moment (token.object truncated, not yet written), frozen:
    this process knew the token beside its own, finds it unreadable, and opens its own token all the same,
    after initialising the module again, with the cause in the log."""
    hsm, tokens = token_folder
    (right,) = [d / "token.object" for d in hsm.tokens.iterdir() if b"right".ljust(32) in (d / "token.object").read_bytes()]
    script = """import logging, sys
from cryptography.hazmat.primitives import serialization
from registration_app.authorities.pkcs11_store import Token
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
module, label, pin, pem, other = sys.argv[1:]
public_key = serialization.load_pem_public_key(open(pem, "rb").read())
token = Token(module, label, pin)
token.check({"ca": public_key})
token.close()
open(other, "wb").close()  # the other token's file, as SoftHSM leaves it between ftruncate and write
token.check({"ca": public_key})
print("checked")
"""
    saved = right.read_bytes()
    try:
        opened = subprocess.run([sys.executable, "-c", script, MODULE, "left", *tokens["left"], str(right)],
                                capture_output=True, text=True, timeout=60)
    finally:
        right.write_bytes(saved)
    assert opened.returncode == 0, opened.stderr
    retry, checked = opened.stdout.strip().splitlines()
    assert retry.startswith("event=key_store.open_retry token=left attempt=1 error=GeneralError cause=")
    assert "rewrites token.object" in retry
    assert checked == "checked"


# A gunicorn worker under load: threads signing on sessions of their own, as many signatures as it has time
# for, each verified; a failure is printed with its PKCS#11 error and the process goes on.
SIGNS = """import sys, threading, time
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from registration_app.authorities.pkcs11_store import Token
module, label, pin, pem, seconds = sys.argv[1:]
public_key = serialization.load_pem_public_key(open(pem, "rb").read())
key = Token(module, label, pin).key("ca", public_key)
key.check()
signed, failed, end = [], [], time.monotonic() + float(seconds)
def sign():
    while time.monotonic() < end:
        data = str(time.monotonic()).encode()
        try:
            public_key.verify(key.sign(data, ec.ECDSA(hashes.SHA256())), data, ec.ECDSA(hashes.SHA256()))
            signed.append(1)
        except Exception as exc:
            failed.append(repr(exc))
threads = [threading.Thread(target=sign) for _ in range(4)]
[t.start() for t in threads]
[t.join() for t in threads]
print(len(signed), len(failed), failed[:3])
"""


def test_threads_of_two_processes_sign_on_one_token_while_others_log_in(token_folder):
    """Bench row (10)'s 503s: python-pkcs11 initialises the module with C_Initialize(NULL), which lets
    SoftHSM drop its own locks, so before Token serialised the calls four threads of one process failed
    within seconds (GeneralError, ObjectHandleInvalid, SessionHandleInvalid) or crashed it. Now every
    signature verifies, with the token's server starting again and again beside them (logins)."""
    hsm, tokens = token_folder
    *signers, starts = finished([[sys.executable, "-c", SIGNS, MODULE, "left", *tokens["left"], "6"]] * 2
                                + [[sys.executable, "-c", STARTS, MODULE, "left", *tokens["left"], "100"]], timeout=60)
    for returncode, out, err in signers:
        assert returncode == 0, err[-2000:]
        signed, failed, first = out.split(" ", 2)
        assert int(signed) > 0 and int(failed) == 0, first
    returncode, out, err = starts
    assert returncode == 0, err[-2000:]
