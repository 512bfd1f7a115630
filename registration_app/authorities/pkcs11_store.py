"""The second KeyStore (core/ports.py): the CA, TLS CA and KRA private keys inside a PKCS#11 token.

The keys are generated in the token (or imported once from a file, `autoenroll keys import-to-token`)
with CKA_SENSITIVE true and CKA_EXTRACTABLE false, so they never leave it. What the rest of the code
holds is a `TokenEcKey` or `TokenRsaKey`: a cryptography private key whose `sign` (certificates, CRLs,
TLS client certificates) and `decrypt` (the KRA's unwrap of an escrow's data key, CKM_RSA_PKCS_OAEP with
SHA-1, which every module implements: escrow_crypto.py) go to the token; cryptography's builders accept such a key as it is (the "custom signer" pattern), so the
certificate and CRL code does not know where the key is.

Sessions: a PKCS#11 session does not survive fork, so each process opens its own on first use
(`Token.session`): the gunicorn master (or the provisioning parent) may have used the token before it
forked its workers; a worker opens its sessions through the module it inherited, and initialises the module
again if that fails. Sessions are pooled per process (a thread takes one for one operation, and one thread
at a time calls the module: `_calls`); any token
failure throws the whole pool away and initialises the module again, so the first request after the token
comes back opens fresh sessions instead of tripping over dead ones.

Failures: at start (`Token.check`) a wrong PIN, a missing token, a module that does not load or a key
label not found is a ConfigError that names it; at run time any token failure is KeyStoreUnavailable
(503), raised before anything is recorded, so nothing is half-issued. The PIN is read from a file that
others may not read (as ssh does) and is never logged nor put into an error message.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes

from ..core.errors import AlreadyExists, ConfigError, KeyStoreUnavailable
from ..core.model import KeyType

log = logging.getLogger("autoenroll.pkcs11")

# The keys a KeyStore may hold, by the names the configuration uses (key_store.in_token).
KEY_NAMES = ("ca", "tls_ca", "kra")
_LABELS = {"ca": "autoenroll-ca", "tls_ca": "autoenroll-tls-ca", "kra": "autoenroll-kra"}
_CAN_SIGN = {"ca": True, "tls_ca": True, "kra": False}  # the KRA key only unwraps


def key_label(name: str) -> str:
    """The CKA_LABEL of a key in the token (what `pkcs11-tool --list-objects` shows)."""
    return _LABELS[name]


def read_pin(path: Path) -> str:
    """The user PIN from its file, refused if others may read it; the PIN itself is never in a message."""
    from .pki_files import check_private
    if not path.exists():
        raise ConfigError(f"the token PIN file {path} does not exist (key_store.pin_file)")
    check_private(path)
    try:
        pin = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the token PIN file {path}: {exc.strerror}") from None
    if not pin:
        raise ConfigError(f"the token PIN file {path} is empty")
    return pin


@dataclass
class _Pool:
    pid: int
    generation: int = 0  # of the module's initialisation (_INITIALISED) the sessions belong to
    sessions: list = field(default_factory=list)  # (session, {label: private key object})


# How many times each module was initialised in this process: python-pkcs11 loads a module once per
# process, so every Token of that module shares its initialisation, and a re-initialisation by one ends
# the sessions of all.
_INITIALISED: dict[str, int] = {}
_INITIALISED_IN: dict[str, int] = {}  # the process (pid) that initialised each module last

# One call at a time into each module, in each process. python-pkcs11 initialises a module with
# C_Initialize(NULL), which per PKCS#11 promises it that no two threads call it at once, and SoftHSM then
# turns its own locks off (MutexFactory disabled): threads signing on sessions of their own failed with
# GeneralError, ObjectHandleInvalid and SessionHandleInvalid, or crashed the process (SIGSEGV), even
# with no other process near the token; one thread per process never did, other processes' logins or not.
_CALLS: dict[str, threading.RLock] = {}
os.register_at_fork(after_in_child=_CALLS.clear)  # a lock held by a thread of the parent stays held in a child


def _calls(module: str) -> threading.RLock:
    return _CALLS.setdefault(module, threading.RLock())

# Opening a session: how many attempts, and the pause before the next (times the attempt number). SoftHSM's
# window (Token._open) is microseconds wide, but processes that log in back to back reopen it every few
# milliseconds: three of them made four attempts without a pause fail (a token not found each time). A
# module's real failure costs 0.21 s more this way.
_OPEN_ATTEMPTS = 7
_OPEN_PAUSE = 0.01
_GENERAL_ERROR_CAUSE = ("\"a token file was read while another process rewrote it (SoftHSM rewrites token.object at "
                        "every login); initialising the module again\"")


class Token:
    """One token of one PKCS#11 module, opened with the PIN of `pin_file`, with a pool of sessions for
    the current process."""

    def __init__(self, module: str, label: str, pin_file: Path):
        if not module or not label:
            raise ConfigError("a PKCS#11 key store needs key_store.module and key_store.token")
        self.module, self.label, self.pin_file = module, label, Path(pin_file)
        self._lock = threading.Lock()
        self._pool = _Pool(pid=os.getpid())
        self._lib: Any = None
        self.oaep_sha256: bool | None = None  # whether the module does CKM_RSA_PKCS_OAEP with SHA-256
        self._stale = False  # a failure was seen: initialise the module again before the next session

    def __repr__(self) -> str:  # never the PIN
        return f"Token(module={self.module!r}, label={self.label!r})"

    # --- sessions -------------------------------------------------------------------------------

    def _library(self, *, rescan: bool = False):
        import pkcs11
        if self._lib is None:
            try:
                self._lib = pkcs11.lib(self.module)  # one per process and module, maybe loaded before a fork
            except (pkcs11.PKCS11Error, OSError, RuntimeError) as exc:
                raise ConfigError(f"cannot load the PKCS#11 module {self.module}: {exc}") from None
            _INITIALISED_IN.setdefault(self.module, os.getpid())
        if self._stale or rescan:
            # after a failure, when a token is not found, and in a forked child whose first session failed
            # (_open): the module looks for its tokens afresh (SoftHSM sees only the tokens that existed
            # when it was initialised, and keeps a removed token's slot broken until then)
            self._lib.reinitialize()  # under _calls(module): no other thread has a call in flight
            _INITIALISED_IN[self.module] = os.getpid()
            _INITIALISED[self.module] = _INITIALISED.get(self.module, 0) + 1
            self._stale = False
        return self._lib

    def _open(self):
        """A new session, logged in. In a forked child the module inherited from the parent is tried first
        (SoftHSM carries on across fork; a child that initialises it again sees the token list of an
        older initialisation) and initialised again if that fails (PKCS#11 §6.7.7 asks it of a child).

        A CKR_GENERAL_ERROR (or a token not found) is tried again a few times, the module initialised
        afresh each time: SoftHSM 2.6 rewrites a token's token.object on every C_Login (ftruncate, unlock,
        then the write at fclose), so another process that reads the file in that window (C_GetTokenInfo of
        every token, as get_token does, or its own login to that token) gets GeneralError, and keeps getting
        it until the module is initialised again. The CA and the KRA of a split deployment starting together
        on one token folder hit it. A read-only session would not help: C_Login rewrites the file all the same."""
        import pkcs11
        forked = _INITIALISED_IN.get(self.module, os.getpid()) != os.getpid()
        for attempt in range(1, _OPEN_ATTEMPTS + 1):
            last = attempt == _OPEN_ATTEMPTS
            try:
                return self._open_once()
            except pkcs11.NoSuchToken:
                if last:
                    raise ConfigError(f"no PKCS#11 token labelled {self.label!r} in {self.module}") from None
                # SoftHSM sees only the tokens that existed when it was initialised (and misses one whose
                # token.object it read while another process rewrote it): look again, after a pause
                log.warning("event=key_store.open_retry token=%s attempt=%d error=NoSuchToken", self.label, attempt)
                time.sleep(_OPEN_PAUSE * attempt)
            except pkcs11.GeneralError:
                if last:
                    raise
                log.warning("event=key_store.open_retry token=%s attempt=%d error=GeneralError cause=%s",
                            self.label, attempt, _GENERAL_ERROR_CAUSE)
                time.sleep(_OPEN_PAUSE * attempt)
            except (pkcs11.PKCS11Error, ConfigError) as exc:
                if not (forked and attempt == 1) or (isinstance(exc, ConfigError) and "PIN" in exc.detail):
                    raise
            self._library(rescan=True)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _open_once(self):
        import pkcs11
        try:
            token = self._library().get_token(token_label=self.label)
        except pkcs11.MultipleTokensReturned:  # which one holds our keys is a guess: name one label once
            raise ConfigError(f"several PKCS#11 tokens are labelled {self.label!r} in {self.module}; "
                              "give each token a label of its own") from None
        try:
            return token.open(user_pin=read_pin(self.pin_file), rw=True)
        except pkcs11.UserAlreadyLoggedIn:  # the login is the process's: a further session shares it
            return token.open(rw=True)
        except pkcs11.PinIncorrect:
            raise ConfigError(f"the PIN in {self.pin_file} is not the user PIN of token {self.label!r}") from None
        except pkcs11.PinLocked:
            raise ConfigError(f"the user PIN of token {self.label!r} is locked") from None

    @contextmanager
    def session(self, *, for_admin: bool = False) -> Iterator[tuple[Any, dict]]:
        """A session of this process (and the cache of key objects found through it), returned to the
        pool after use. A token failure empties the pool and raises KeyStoreUnavailable, or the failure
        as it is for an administrative command (`for_admin`). The whole use holds the module's call lock
        (`_calls`): the module was promised one thread at a time."""
        with _calls(self.module):
            with self._session(for_admin=for_admin) as entry:
                yield entry

    @contextmanager
    def _session(self, *, for_admin: bool) -> Iterator[tuple[Any, dict]]:
        import pkcs11
        entry = self._take()
        try:
            if entry is None:
                entry = (self._open(), {})
            yield entry
        except pkcs11.PKCS11Error as exc:
            self._discard(entry)
            log.error("event=key_store.error token=%s error=%s", self.label, type(exc).__name__)
            if for_admin:
                raise ConfigError(f"token {self.label!r}: {type(exc).__name__} {exc}".strip()) from None
            raise KeyStoreUnavailable(f"the key store (token {self.label!r}) failed: {type(exc).__name__}; "
                                      "nothing was signed or recorded") from None
        except ConfigError as exc:
            self._discard(entry)
            if for_admin:
                raise
            log.error("event=key_store.error token=%s error=%r", self.label, exc.detail)
            raise KeyStoreUnavailable(f"the key store is unavailable: {exc.detail}") from None
        except BaseException:
            self._give_back(entry)
            raise
        else:
            self._give_back(entry)

    def _take(self):
        with self._lock:
            generation = _INITIALISED.get(self.module, 0)
            if self._pool.pid != os.getpid() or self._pool.generation != generation:
                # sessions of the parent are no use in a child, nor any after the module was initialised again
                self._pool = _Pool(pid=os.getpid(), generation=generation)
            return self._pool.sessions.pop() if self._pool.sessions else None

    def _give_back(self, entry) -> None:
        if entry is None:
            return
        with self._lock:
            if self._pool.pid == os.getpid() and self._pool.generation == _INITIALISED.get(self.module, 0):
                self._pool.sessions.append(entry)

    def _discard(self, entry) -> None:
        with self._lock:
            stale, self._pool = self._pool.sessions, _Pool(pid=os.getpid(), generation=_INITIALISED.get(self.module, 0))
            self._stale = True
        for session, _keys in [*stale, *([entry] if entry is not None else [])]:
            try:
                session.close()
            except Exception:  # a dead session cannot be closed cleanly: dropping it is all we can do
                pass

    def close(self) -> None:
        """Close this process's sessions of the token (the login ends with the last one)."""
        with _calls(self.module), self._lock:
            pool, self._pool = self._pool, _Pool(pid=os.getpid(), generation=self._pool.generation)
            if pool.pid == os.getpid():  # a parent's sessions are not this process's to close
                for session, _keys in pool.sessions:
                    session.close()

    def private_key_object(self, entry, name: str):
        import pkcs11
        from pkcs11 import ObjectClass
        session, keys = entry
        label = key_label(name)
        if label not in keys:
            try:
                keys[label] = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=label)
            except pkcs11.NoSuchKey:
                raise ConfigError(f"no private key labelled {label!r} in token {self.label!r}") from None
        return keys[label]

    # --- what the KeyStore hands out -----------------------------------------------------------

    def key(self, name: str, public_key) -> TokenEcKey | TokenRsaKey:
        """The token's key `name` as a cryptography private key, given its public key (from the
        certificate or kra.pem of the data folder)."""
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            return TokenEcKey(self, name, public_key)
        if isinstance(public_key, rsa.RSAPublicKey):
            return TokenRsaKey(self, name, public_key)
        raise ConfigError(f"the public key of {name} is neither EC nor RSA")

    def labels(self) -> set[str]:
        """The labels of the private keys in the token."""
        from pkcs11 import Attribute, ObjectClass
        with self.session(for_admin=True) as (session, _keys):
            return {obj[Attribute.LABEL] for obj in session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY})}

    def check(self, keys: dict[str, Any]) -> None:
        """At start: the module loads, the token is there, the PIN opens it, and each key of `keys`
        (name → its public key) is in the token and is the private half of that public key."""
        for name, public_key in keys.items():
            self.key(name, public_key).check()

    # --- init and import ----------------------------------------------------------------------

    def generate(self, name: str, key_type: KeyType) -> TokenEcKey | TokenRsaKey:
        """Generate key `name` in the token: private half sensitive and never extractable, both halves
        labelled; the CKA_ID is the SHA-1 of the public key (as a certificate's subject key identifier)."""
        from pkcs11 import Attribute, KeyType as P11KeyType
        from pkcs11.util.ec import encode_named_curve_parameters
        label = key_label(name)
        with self.session(for_admin=True) as entry:
            session = entry[0]
            self._refuse_existing(session, label)
            usage = ({Attribute.SIGN: True, Attribute.DECRYPT: False, Attribute.UNWRAP: False} if _CAN_SIGN[name]
                     else {Attribute.SIGN: False, Attribute.DECRYPT: True, Attribute.UNWRAP: True})
            private = {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False, Attribute.PRIVATE: True, **usage}
            if key_type.is_rsa:
                bits = {KeyType.RSA_2048: 2048, KeyType.RSA_3072: 3072}[key_type]
                pub, _priv = session.generate_keypair(P11KeyType.RSA, bits, store=True, label=label,
                                                      private_template=private)
            else:
                params = session.create_domain_parameters(
                    P11KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")}, local=True)
                pub, _priv = params.generate_keypair(store=True, label=label, private_template=private)
            public_key = _public_key_of(pub)
            key_id = _key_id(public_key)
            for obj in (pub, _priv):
                obj[Attribute.ID] = key_id
        return self.key(name, public_key)

    def import_key(self, name: str, private_key) -> None:
        """Create key `name` in the token from a private key read from its file: sensitive and not
        extractable there (PKCS#11 marks it CKA_NEVER_EXTRACTABLE false: it was outside a token once,
        which is why the file copy must be destroyed). Refused if the token already holds that label."""
        from pkcs11 import Attribute, ObjectClass
        from pkcs11.util.ec import decode_ec_private_key
        from pkcs11.util.rsa import decode_rsa_private_key
        label = key_label(name)
        der = private_key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL,
                                        serialization.NoEncryption())
        usage = ({Attribute.SIGN: True, Attribute.DECRYPT: False, Attribute.UNWRAP: False} if _CAN_SIGN[name]
                 else {Attribute.SIGN: False, Attribute.DECRYPT: True, Attribute.UNWRAP: True})
        if isinstance(private_key, rsa.RSAPrivateKey):
            attrs = decode_rsa_private_key(der)
        elif isinstance(private_key, ec.EllipticCurvePrivateKey):
            attrs = decode_ec_private_key(der)
        else:
            raise ConfigError(f"{name}: only RSA and EC keys go into a token")
        key_id = _key_id(private_key.public_key())
        attrs.update({Attribute.TOKEN: True, Attribute.LABEL: label, Attribute.ID: key_id,
                      Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False, Attribute.PRIVATE: True, **usage})
        public = _public_attributes(private_key.public_key())
        public.update({Attribute.TOKEN: True, Attribute.LABEL: label, Attribute.ID: key_id,
                       Attribute.CLASS: ObjectClass.PUBLIC_KEY})
        with self.session(for_admin=True) as entry:
            session = entry[0]
            self._refuse_existing(session, label)
            session.create_object(attrs)
            session.create_object(public)

    def _refuse_existing(self, session, label: str) -> None:
        from pkcs11 import Attribute
        if list(session.get_objects({Attribute.LABEL: label})):
            raise AlreadyExists(f"token {self.label!r} already holds a key labelled {label!r}; refusing to "
                                "make a second one", present=[label])


def _public_attributes(public_key) -> dict:
    """The attributes of a public key object for `import_key` (the private half's twin, for the operator)."""
    from pkcs11 import Attribute, KeyType as P11KeyType
    from pkcs11.util import biginteger
    from pkcs11.util.ec import encode_named_curve_parameters
    if isinstance(public_key, rsa.RSAPublicKey):
        numbers = public_key.public_numbers()
        return {Attribute.KEY_TYPE: P11KeyType.RSA, Attribute.MODULUS: biginteger(numbers.n),
                Attribute.PUBLIC_EXPONENT: biginteger(numbers.e)}
    point = public_key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    return {Attribute.KEY_TYPE: P11KeyType.EC, Attribute.EC_PARAMS: encode_named_curve_parameters(public_key.curve.name),
            Attribute.EC_POINT: b"\x04" + _der_length(len(point)) + point}  # a DER OCTET STRING


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def _public_key_of(pub):
    from pkcs11 import Attribute, KeyType as P11KeyType
    from pkcs11.util.ec import encode_ec_public_key
    if pub.key_type == P11KeyType.RSA:
        return rsa.RSAPublicNumbers(int.from_bytes(pub[Attribute.PUBLIC_EXPONENT], "big"),
                                    int.from_bytes(pub[Attribute.MODULUS], "big")).public_key()
    return serialization.load_der_public_key(encode_ec_public_key(pub))


def _key_id(public_key) -> bytes:
    return x509.SubjectKeyIdentifier.from_public_key(public_key).digest


def _digest(data: bytes, algorithm) -> bytes:
    if isinstance(algorithm, utils.Prehashed):
        return data
    h = hashes.Hash(algorithm)
    h.update(data)
    return h.finalize()


class _InToken:
    """What a key held in a token answers the same whatever its kind: never extractable, and the same
    object when copied (cryptography copies keys it is given)."""

    _token: Token
    _name: str

    def private_numbers(self):
        raise TypeError("this key lives in a token and is never extractable")

    def private_bytes(self, encoding, format, encryption_algorithm) -> bytes:
        raise TypeError("this key lives in a token and is never extractable")

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}({key_label(self._name)!r} in {self._token!r})"


class TokenEcKey(_InToken, ec.EllipticCurvePrivateKey):
    """An EC private key in the token: signs (CKM_ECDSA over a digest computed here: SoftHSM 2.6 has no
    CKM_ECDSA_SHA256), never exported."""

    def __init__(self, token: Token, name: str, public_key: ec.EllipticCurvePublicKey):
        self._token, self._name, self._public = token, name, public_key

    def sign(self, data, signature_algorithm) -> bytes:
        from pkcs11 import Mechanism
        from pkcs11.util.ec import encode_ecdsa_signature
        if not isinstance(signature_algorithm, ec.ECDSA):
            raise TypeError("a token EC key signs with ECDSA only")
        digest = _digest(bytes(data), signature_algorithm.algorithm)
        with self._token.session() as entry:
            raw = self._token.private_key_object(entry, self._name).sign(digest, mechanism=Mechanism.ECDSA)
        return encode_ecdsa_signature(raw)

    def check(self) -> None:
        probe = b"autoenroll start-up check"
        try:
            self._public.verify(self.sign(probe, ec.ECDSA(hashes.SHA256())), probe, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise ConfigError(f"the key {key_label(self._name)!r} in token {self._token.label!r} is not the "
                              f"private half of the {self._name} certificate") from None

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public.curve

    @property
    def key_size(self) -> int:
        return self._public.key_size

    def exchange(self, algorithm, peer_public_key) -> bytes:
        raise TypeError("this key lives in a token and is used only to sign")



class TokenRsaKey(_InToken, rsa.RSAPrivateKey):
    """An RSA private key in the token: signs with PKCS#1 v1.5 (a CA key) or unwraps with
    CKM_RSA_PKCS_OAEP (the KRA key: the data key leaves the token, the storage key never does)."""

    _SIGN = {"sha256": "SHA256_RSA_PKCS", "sha384": "SHA384_RSA_PKCS", "sha512": "SHA512_RSA_PKCS"}
    _OAEP = {"sha1": ("SHA_1", "SHA1"), "sha256": ("SHA256", "SHA256")}  # CKM_RSA_PKCS_OAEP: hash, MGF

    def __init__(self, token: Token, name: str, public_key: rsa.RSAPublicKey):
        self._token, self._name, self._public = token, name, public_key

    def sign(self, data, padding_, algorithm) -> bytes:
        from pkcs11 import Mechanism
        if not _CAN_SIGN[self._name]:
            raise TypeError("the KRA storage key only unwraps; it signs nothing")
        if not isinstance(padding_, padding.PKCS1v15) or isinstance(algorithm, utils.Prehashed) \
                or algorithm.name not in self._SIGN:
            raise TypeError("a token RSA key signs with PKCS#1 v1.5 and SHA-256, -384 or -512 only")
        with self._token.session() as entry:
            return self._token.private_key_object(entry, self._name).sign(
                bytes(data), mechanism=getattr(Mechanism, self._SIGN[algorithm.name]))

    def decrypt(self, ciphertext: bytes, padding_) -> bytes:
        """RSA-OAEP in the token (CKM_RSA_PKCS_OAEP): with SHA-1 and MGF1-SHA-1, what every escrow is sealed
        with now (escrow_crypto.py) and every module implements; with SHA-256 and MGF1-SHA-256 for escrows
        sealed before, in the token too where the module takes those parameters. Only for such an old escrow
        on a module that refuses them (SoftHSM 2.6.1) is the token's raw RSA operation (CKM_RSA_X_509)
        used and the OAEP decoding done here (_oaep_decode). Either way the storage key never leaves the
        token and every failure is the same ValueError."""
        import pkcs11
        from pkcs11 import MGF, Mechanism
        if not (isinstance(padding_, padding.OAEP) and isinstance(padding_.mgf, padding.MGF1)
                and padding_.algorithm.name in self._OAEP and padding_.mgf._algorithm.name == padding_.algorithm.name
                and not padding_._label):
            raise TypeError("a token RSA key decrypts RSA-OAEP with SHA-1 or SHA-256 (and the same MGF1) only")
        hash_name = padding_.algorithm.name
        ciphertext = bytes(ciphertext)
        if len(ciphertext) != (self.key_size + 7) // 8:
            raise ValueError("decryption failed")
        with self._token.session() as entry:
            key = self._token.private_key_object(entry, self._name)
            if hash_name == "sha1" or self._token.oaep_sha256 is not False:
                hash_mechanism, mgf = self._OAEP[hash_name]
                param = (getattr(Mechanism, hash_mechanism), getattr(MGF, mgf), None)
                try:
                    plain = key.decrypt(ciphertext, mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=param)
                    if hash_name == "sha256":
                        self._token.oaep_sha256 = True
                    return plain
                except _bad_ciphertext() as exc:  # the blob is wrong, not the token: escrow_crypto says so
                    raise ValueError("decryption failed") from exc
                except pkcs11.GeneralError as exc:
                    # SoftHSM answers a bad OAEP padding with CKR_GENERAL_ERROR, as it does a failing token:
                    # a probe of our own making tells which (it opens only if the token works)
                    if not self._oaep_works(key, padding_, param):
                        raise
                    raise ValueError("decryption failed") from exc
                except (pkcs11.ArgumentsBad, pkcs11.MechanismParamInvalid, pkcs11.MechanismInvalid):
                    if hash_name == "sha1" or self._token.oaep_sha256:  # a real failure of the token
                        raise
                    self._token.oaep_sha256 = False
                    log.info("event=key_store.oaep_fallback token=%s mechanism=CKM_RSA_X_509", self._token.label)
            try:
                em = key.decrypt(ciphertext, mechanism=Mechanism.RSA_X_509)
            except _bad_ciphertext() as exc:
                raise ValueError("decryption failed") from exc
        return _oaep_decode(bytes(em).rjust(len(ciphertext), b"\0"))

    def _oaep_works(self, key, padding_, param) -> bool:
        """Whether the token opens a ciphertext made here with the public key (the probe of `decrypt`)."""
        import pkcs11
        from pkcs11 import Mechanism
        probe = os.urandom(32)
        try:
            return bytes(key.decrypt(self._public.encrypt(probe, padding_), mechanism=Mechanism.RSA_PKCS_OAEP,
                                     mechanism_param=param)) == probe
        except pkcs11.PKCS11Error:
            return False

    def check(self) -> None:
        probe = os.urandom(32)
        oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)  # escrow's
        if _CAN_SIGN[self._name]:
            try:
                self._public.verify(self.sign(probe, padding.PKCS1v15(), hashes.SHA256()), probe,
                                    padding.PKCS1v15(), hashes.SHA256())
                return
            except InvalidSignature:
                pass
        else:
            try:
                if self.decrypt(self._public.encrypt(probe, oaep), oaep) == probe:
                    return
            except ValueError:
                pass
        raise ConfigError(f"the key {key_label(self._name)!r} in token {self._token.label!r} is not the "
                          f"private half of the {self._name} public key")

    def public_key(self) -> rsa.RSAPublicKey:
        return self._public

    @property
    def key_size(self) -> int:
        return self._public.key_size



def _mgf1_sha256(seed: bytes, length: int) -> bytes:
    out = b""
    for counter in range((length + 31) // 32):
        out += hashlib.sha256(seed + counter.to_bytes(4, "big")).digest()
    return out[:length]


def _oaep_decode(em: bytes) -> bytes:
    """EME-OAEP decoding (RFC 8017 §7.1.2 step 3) with SHA-256, MGF1-SHA-256 and an empty label. Every
    check is made before the one answer, and every failure is the same ValueError, so that no caller
    learns which part was wrong (the Manger attack needs that difference)."""
    import hmac
    h = 32
    if len(em) < 2 * h + 2:
        raise ValueError("decryption failed")
    y, masked_seed, masked_db = em[0], em[1:h + 1], em[h + 1:]
    seed = bytes(a ^ b for a, b in zip(masked_seed, _mgf1_sha256(masked_db, h)))
    db = bytes(a ^ b for a, b in zip(masked_db, _mgf1_sha256(seed, len(masked_db))))
    good = hmac.compare_digest(db[:h], hashlib.sha256(b"").digest()) & (y == 0)
    separator, looking, bad_padding = 0, 1, 0
    for i, byte in enumerate(db[h:]):
        is_one, is_zero = int(byte == 1), int(byte == 0)
        separator += looking * is_one * i
        bad_padding |= looking * (1 - is_one) * (1 - is_zero)
        looking &= 1 - is_one
    if not good or looking or bad_padding:
        raise ValueError("decryption failed")
    return db[h + separator + 1:]


def _bad_ciphertext() -> tuple[type[Exception], ...]:
    import pkcs11
    return tuple(getattr(pkcs11.exceptions, n) for n in ("EncryptedDataInvalid", "EncryptedDataLenRange")
                 if hasattr(pkcs11.exceptions, n))


@dataclass
class Pkcs11KeyStore:
    """The KeyStore of core/ports.py with the keys of `in_token` in `token` and the others in the files of
    `files` (a PemKeyStore): the choice is per key (README, Keys in an HSM). The public halves come from
    the data folder (ca.pem, tls-ca.pem, kra.pem), which every role has."""

    token: Token
    in_token: frozenset[str]
    files: Any  # PemKeyStore
    _keys: dict = field(default_factory=dict)

    def _key(self, name: str, public_key):
        if name not in self._keys:
            self._keys[name] = self.token.key(name, public_key)
        return self._keys[name]

    def ca_signing_key(self) -> CertificateIssuerPrivateKeyTypes:
        if "ca" not in self.in_token:
            return cast(CertificateIssuerPrivateKeyTypes, self.files.ca_signing_key())
        from .pki_files import read_cert
        return cast(CertificateIssuerPrivateKeyTypes, self._key("ca", read_cert(self.files.paths.ca_cert).public_key()))

    def tls_ca_signing_key(self) -> CertificateIssuerPrivateKeyTypes:
        if "tls_ca" not in self.in_token:
            return cast(CertificateIssuerPrivateKeyTypes, self.files.tls_ca_signing_key())
        from .pki_files import read_cert
        return cast(CertificateIssuerPrivateKeyTypes,
                    self._key("tls_ca", read_cert(self.files.paths.tls_ca_cert).public_key()))

    def kra_storage_key(self) -> rsa.RSAPrivateKey:
        if "kra" not in self.in_token:
            return cast(rsa.RSAPrivateKey, self.files.kra_storage_key())
        from .pki_files import read_public_key
        return cast(rsa.RSAPrivateKey, self._key("kra", read_public_key(self.files.paths.kra_public_key)))

    def check(self, names: Iterable[str]) -> None:
        """At start: every key of `names` that is in the token answers (ConfigError otherwise)."""
        getters = {"ca": self.ca_signing_key, "tls_ca": self.tls_ca_signing_key, "kra": self.kra_storage_key}
        try:
            for name in names:
                if name in self.in_token:
                    cast(Any, getters[name]()).check()
        except KeyStoreUnavailable as exc:  # at start a token failure is the operator's to fix, now
            raise ConfigError(exc.detail) from None


def key_fingerprint(public_key) -> str:
    """SHA-256 of a public key's SubjectPublicKeyInfo, in hex: how the report of an import names a key."""
    spki = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


if TYPE_CHECKING:  # mypy (make test) checks that Pkcs11KeyStore has the signatures of the Protocol
    from ..core.ports import KeyStore

    def _is_key_store(implementation: Pkcs11KeyStore) -> KeyStore:
        return implementation
