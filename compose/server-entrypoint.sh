#!/bin/sh
# `autoenroll init` is idempotent (never overwrites keys); then serve. The CA passphrase is generated into
# the data volume on first start unless AUTOENROLL_CA_PASSPHRASE is set.
set -e
autoenroll init --server-name "${AUTOENROLL_SERVER_NAME:-localhost}" --server-name 127.0.0.1
exec autoenroll serve
