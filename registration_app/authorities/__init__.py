"""The key authority, CA and KRA.

Pure crypto building blocks (no database, no I/O except `pki_files`):
`certs` (S/MIME, CA and TLS certificates), `crl`, `escrow_crypto` (KRA envelope encryption), `keys`
(generation and the RSA key pool), `pkcs12` (private key delivery), `pki_files` (key and certificate
files, `autoenroll init`).
"""
