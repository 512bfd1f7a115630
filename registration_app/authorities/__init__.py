"""The key authority, CA and KRA, in-process, and the HTTP clients of a CA and KRA running elsewhere.

The authorities, which record what they do in the database: `key_authority` (key pair or CSR →
escrow → signature → PKCS#12), `ca` (the in-house CA: sign, record with the outbox row, revoke, CRL),
`kra` (escrow and recovery), `officers` (who counts as a recovery officer at release), `kra_verify`
(what a KRA in its own process checks before it decrypts), `remote` (RemoteCA, RemoteKRA for a split
deployment).

Pure crypto building blocks (no database, no I/O): `certs` (S/MIME, CA and TLS certificates, serial
numbers), `crl`, `escrow_crypto` (KRA envelope encryption), `keys` (generation and the RSA key pool),
`pkcs12` (private key delivery); `pki_files` reads and writes key and certificate files and creates the
initial PKI (`autoenroll init`).
"""
