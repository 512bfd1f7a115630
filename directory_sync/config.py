"""LDAP connection settings (one frozen value, passed in, never imported as a global)."""

from __future__ import annotations

from dataclasses import dataclass, field

# The service password of the private dev/demo/test slapd built from ldap_schema/ (see base.ldif).
# Named as what it is: only a private slapd on loopback may use it.
DEV_SERVICE_PASSWORD = "autoenroll-dev-insecure"

SUFFIX = "dc=example,dc=org"
IN_CHAIN = "1.2.840.113556.1.4.1941"  # LDAP_MATCHING_RULE_IN_CHAIN (Active Directory)
# Where Windows clients look for an enterprise root CA (the container `certutil -dspublish -f ca.crt
# RootCA` writes to; group policy puts these certificates in every domain member's trusted roots),
# under the forest's configuration naming context.
AD_CA_CONTAINER = "CN=Certification Authorities,CN=Public Key Services,CN=Services,CN=Configuration"
PRESETS = ("openldap", "ad")


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
    # Added in the same modify when the entry's classes do not allow `certificate`; "" never adds one.
    certificate_object_class: str = "pkiUser"
    # Also written with the CRL when not empty: AD's certificationAuthority class requires it (our CA has
    # no subordinate CA, so its CRL is also its authority revocation list).
    authority_crl: str = ""
    # The matching rule that evaluates group membership transitively on the server (AD's
    # LDAP_MATCHING_RULE_IN_CHAIN). With it, nested groups cost one search (groups of a user:
    # member:<rule>:=<user>; members of a group: memberOf:<rule>:=<group>), not a walk of member lists.
    in_chain_rule: str = ""

    @classmethod
    def openldap(cls) -> AttributeMap:
        return cls()

    @classmethod
    def ad(cls) -> AttributeMap:
        """Active Directory (and Samba AD): no `;binary` option in its schema, uSNChanged as the entry's
        change stamp, whenChanged for incremental passes, the CA as a certificationAuthority object."""
        return cls(certificate="userCertificate", version="uSNChanged", modify_timestamp="whenChanged",
                   ca_certificate="cACertificate", crl="certificateRevocationList",
                   authority_crl="authorityRevocationList",
                   ca_object_classes=frozenset({"certificationAuthority"}), in_chain_rule=IN_CHAIN)


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
    # Idle connections kept per process: at least a worker's request threads, plus the outbox worker and
    # the inline publisher, or requests beyond it bind a connection of their own each time.
    pool_size: int = 8
    # Concurrent requests' publications in one LDAP transaction (RFC 5805), where the server offers
    # transactions (directory_sync/inline.py); false: each request publishes itself. Off by default:
    # slapd 2.5.13 (and 2.6's same code) can crash when a transaction's end follows its updates' answers
    # closely; ldap_txn.py's pause narrows that race, it does not close it (bench/slapd_txn.py,
    # PERFORMANCE.md, "LDAP transactions and slapd").
    inline_transactions: bool = False
    # Reconcile's, provisioning's and the targets' publications WINDOW at a time in one LDAP transaction
    # where the server offers them (directory_sync/bulk.py): a fraction of slapd's CPU per entry. On by
    # default, with the same pause before each end; false: pipelined modifies, one slapd commit each.
    bulk_transactions: bool = True
    # Addresses are looked up in mail_attribute, and also in these: "proxyAddresses" (its smtp:/SMTP:
    # values, Exchange's aliases) and "userPrincipalName", on Active Directory.
    also_find_by: frozenset[str] = frozenset()
    preset: str = "openldap"  # the defaults the rest of [ldap] starts from: "openldap" | "ad" (see for_preset)
    attributes: AttributeMap = field(default_factory=AttributeMap.openldap)

    @classmethod
    def for_preset(cls, name: str) -> LdapSettings:
        """The defaults of a preset. `ad`: the AD attribute map, entries identified by objectGUID, nested
        groups by the in-chain matching rule, the CA under AD_CA_CONTAINER of `base_dn`. The DNs
        (base_dn, users_base, groups_base, bind_dn) are the domain's: set them in [ldap]."""
        if name == "openldap":
            return cls()
        if name == "ad":
            return cls(preset="ad", attributes=AttributeMap.ad(), entry_id_attribute="objectGUID",
                       use_memberof=True, nested_groups=True, ca_entry_dn="")
        raise ValueError(f"unknown LDAP preset {name!r} (presets: {', '.join(PRESETS)})")

    @property
    def ca_dn(self) -> str:
        """The CA entry: ca_entry_dn, or on the ad preset `CN=Autoenroll CA,<AD_CA_CONTAINER>,<base_dn>`."""
        return self.ca_entry_dn or f"CN=Autoenroll CA,{AD_CA_CONTAINER},{self.base_dn}"
