#!/bin/sh
# First start: build cn=config, the base DIT and the demo users with the private-slapd tool (it listens
# on loopback only), stop it, then run slapd in the foreground on all interfaces.
# The service account's password is drawn here once, into the volume the server reads it from (the
# server refuses the development password for a directory that is not on its loopback). It belongs to
# the server's user (uid 10001, server.Dockerfile), mode 0600, as ldap.password_file must be.
set -e
DIR=/var/lib/autoenroll-ldap/slapd
SECRET=/run/autoenroll-ldap-secret/ldap.pw
if [ ! -s "$SECRET" ]; then
  umask 077
  head -c 18 /dev/urandom | base64 > "$SECRET"
  chown 10001 "$SECRET"
fi
if [ ! -d "$DIR/config" ]; then
  mkdir -p "$DIR"
  python -m directory_sync.slapd start --dir "$DIR" --port 3890 --service-password-file "$SECRET" \
    ${AUTOENROLL_LDAP_DEMO:+--demo}
  python -m directory_sync.slapd stop --dir "$DIR"
fi
exec /usr/sbin/slapd -d 0 -h "ldap://0.0.0.0:389/" -F "$DIR/config"
