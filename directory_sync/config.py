"""LDAP connection settings (one frozen value, passed in, never imported as a global)."""

from __future__ import annotations

from dataclasses import dataclass, field

# The service password of the private dev/demo/test slapd built from ldap_schema/ (see base.ldif).
# Named as what it is: only a private slapd on loopback may use it.
DEV_SERVICE_PASSWORD = "autoenroll-dev-insecure"

SUFFIX = "dc=example,dc=org"


@dataclass(frozen=True)
class AttributeMap:
    """The attribute and object-class names directory_sync reads and writes (besides `mail_attribute`,
    `entry_id_attribute` and `group_member_attribute` of LdapSettings). The defaults are OpenLDAP's
    (`AttributeMap.openldap()`); `[ldap.attributes]` in the TOML file overrides them one by one."""

    certificate: str = "userCertificate;binary"  # plain "userCertificate" on Active Directory
    common_name: str = "cn"
    member_of: str = "memberOf"
    version: str = "entryCSN"  # the entry's change stamp (UserEntry.version): asserted by publish
    modify_timestamp: str = "modifyTimestamp"  # "whenChanged" on Active Directory
    ca_certificate: str = "cACertificate;binary"
    crl: str = "certificateRevocationList;binary"
    ca_object_classes: frozenset[str] = frozenset({"applicationProcess", "pkiCA"})  # of a CA entry we create

    @classmethod
    def openldap(cls) -> AttributeMap:
        return cls()


@dataclass(frozen=True)
class LdapSettings:
    """Where the directory is and how it is shaped. Defaults match the demo DIT of `make run`."""

    # One URL, or several separated by spaces: libldap tries them in order (a replica takes over when the
    # first does not answer within timeout_seconds). ldap://, ldaps:// or ldapi://.
    url: str = "ldap://127.0.0.1:3890"
    bind_dn: str = f"cn=autoenroll,ou=services,{SUFFIX}"
    password: str = field(default=DEV_SERVICE_PASSWORD, repr=False)  # only the private slapd's, on loopback
    password_file: str = ""  # the service password's file (mode 0600, first line), read once at start
    # Transport (directory_sync/transport.py, checked at start): ldaps:// in url, or StartTLS on ldap://.
    # The server's certificate is verified against ca_file (empty: the system store), host name included.
    start_tls: bool = False
    ca_file: str = ""
    # "" (simple bind as bind_dn) or "EXTERNAL" (SASL: the directory maps the TLS client certificate).
    sasl_mechanism: str = ""
    client_cert_file: str = ""  # a TLS client certificate (PEM) and its key, for EXTERNAL (or mutual TLS)
    client_key_file: str = ""
    # A simple bind over plaintext to anything but loopback is refused at start unless this is true.
    insecure_plaintext: bool = False
    base_dn: str = SUFFIX
    users_base: str = f"ou=people,{SUFFIX}"
    groups_base: str = f"ou=groups,{SUFFIX}"
    ca_entry_dn: str = f"cn=Autoenroll CA,ou=services,{SUFFIX}"
    mail_attribute: str = "mail"
    # The entry's stable identity, which survives renames and moves (modrdn) and is never reused: every
    # certificate is bound to it as well as to the address. "objectGUID" on Active Directory.
    entry_id_attribute: str = "entryUUID"
    group_member_attribute: str = "member"  # "uniqueMember" for groupOfUniqueNames
    use_memberof: bool = True  # read memberOf (overlay) instead of searching groups for member=<dn>
    nested_groups: bool = False  # follow groups that are members of groups
    timeout_seconds: float = 5.0  # connect and per-operation timeout: a dead slapd must fail fast
    pool_size: int = 4  # idle connections kept per process (gthread workers share them)
    attributes: AttributeMap = field(default_factory=AttributeMap.openldap)
