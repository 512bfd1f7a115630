"""The registration authority: its use cases. `authority.py` (`RegistrationAuthority`: an agent's
bootstrap, enrollment, renewal, replacement, revocation, the certificates of a user), `recovery.py`
(key recovery and the officers' approvals), `provision.py` (bulk pre-provisioning through the key
authority's `issue_batch`), `operators.py` (the operator's invite, revoke, revoke-agent, directory status), and the rest of the
`autoenroll` commands' use cases: `setup.py` (init, client-cert), `directory.py` (sync status, drain and
reconcile, provision, crl), `audit.py` (audit verify), `keys.py` (keys import-to-token).
The wiring of the parts for a role is `registration_app/wiring.py`."""
