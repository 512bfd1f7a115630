#!/bin/sh
# First start: build cn=config, the base DIT and the demo users with the private-slapd tool (it listens
# on loopback only), stop it, then run slapd in the foreground on all interfaces.
set -e
DIR=/var/lib/autoenroll-ldap/slapd
if [ ! -d "$DIR/config" ]; then
  mkdir -p "$DIR"
  python -m directory_sync.slapd start --dir "$DIR" --port 3890 ${AUTOENROLL_LDAP_DEMO:+--demo}
  python -m directory_sync.slapd stop --dir "$DIR"
fi
exec /usr/sbin/slapd -d 0 -h "ldap://0.0.0.0:389/" -F "$DIR/config"
