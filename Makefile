# `make run` and `make test` work on a fresh Debian machine: they install what they need.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
LDAP_PORT ?= 3890
export PATH := $(CURDIR)/$(VENV)/bin:/usr/sbin:/sbin:$(PATH)

.PHONY: run test bench deps debs install stop clean help

help:
	@echo "make run    start a private slapd and the registration server (TLS on https://localhost:8443)"
	@echo "make test   the whole suite, against real slapd, gunicorn and openssl; then again on PostgreSQL"
	@echo "make bench  benchmarks (ratios measured in one run)"
	@echo "make stop   stop the private slapd of make run"

debs:
	@if [ ! -x /usr/sbin/slapd ] || ! command -v ldapsearch >/dev/null || ! command -v openssl >/dev/null || [ ! -f /usr/include/ldap.h ] || [ ! -f /usr/include/sasl/sasl.h ] || ! command -v cfssl >/dev/null || ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || ! command -v gpgsm >/dev/null || ! command -v dirmngr >/dev/null || [ ! -x /usr/sbin/samba ] || ! command -v samba-tool >/dev/null || [ ! -f /usr/lib/softhsm/libsofthsm2.so ] || ! command -v pkcs11-tool >/dev/null; then \
	  echo "installing Debian packages slapd ldap-utils openssl libldap2-dev libsasl2-dev (python-ldap builds against them) golang-cfssl (a peer in the benchmarks) postgresql (the suites' second database) gpgsm dirmngr (a mail client reading LDAP, in the tests) samba samba-ad-dc (an Active Directory domain controller, in the tests) softhsm2 opensc (an HSM and pkcs11-tool, in the tests)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slapd ldap-utils openssl libldap2-dev libsasl2-dev golang-cfssl postgresql gpgsm dirmngr samba samba-ad-dc softhsm2 opensc >/dev/null; \
	fi

# pip's progress goes to .venv/install.log, shown only if the install fails.
$(STAMP): setup.cfg pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@echo "installing the Python packages into $(VENV) (log: $(VENV)/install.log)"
	@{ $(PY) -m pip install --upgrade pip && $(PY) -m pip install -e '.[test]'; } >$(VENV)/install.log 2>&1 \
	  || { tail -n 40 $(VENV)/install.log; exit 1; }
	@# byte-compiled once here: commands start faster where PYTHONDONTWRITEBYTECODE is set
	@$(PY) -m compileall -q registration_app directory_sync ldap_schema bench >/dev/null
	@touch $@

install: debs $(STAMP)

run: install
	@$(PY) -m directory_sync.slapd start --dir var/slapd --port $(LDAP_PORT) --demo
	@AUTOENROLL_LDAP__URL=ldap://127.0.0.1:$(LDAP_PORT) $(VENV)/bin/autoenroll init
	@echo
	@echo "The registration server starts below (Ctrl-C stops it; 'make stop' stops slapd)."
	@echo "In another terminal, from $(CURDIR), enroll the demo user alice:"
	@echo "  source .venv/bin/activate"
	@echo "  CODE=\$$(autoenroll invite alice@example.org)"
	@echo "  autoenroll-agent bootstrap --email alice@example.org --code \$$CODE"
	@echo "  autoenroll-agent enroll --email alice@example.org --profile smime-encryption"
	@echo "  ldapsearch -x -LLL -H ldap://127.0.0.1:$(LDAP_PORT) -b ou=people,dc=example,dc=org '(mail=alice@example.org)' 'userCertificate;binary'"
	@echo "bob@example.org is in no entitled group: 'autoenroll invite bob@example.org' refuses him with"
	@echo "  \"bob@example.org is not a member of a group entitled to profile 'smime-signature' ...\""
	@echo
	@AUTOENROLL_LDAP__URL=ldap://127.0.0.1:$(LDAP_PORT) $(VENV)/bin/autoenroll serve

stop: $(STAMP)
	$(PY) -m directory_sync.slapd stop --dir var/slapd

# The whole suite on SQLite (the default), then what writes through the server's database again on a
# private PostgreSQL server (`--database=postgresql`, bench/postgres.py). The whole suite passes there too
# (`.venv/bin/python -m pytest --database=postgresql tests`, about 5 minutes); this part keeps `make test`
# under 15 minutes on 2 cores: e2e's lifecycle and directory flows run in-process in directory_sync.
POSTGRES_SUITES := tests/store tests/fault tests/directory_sync tests/ra tests/cli tests/e2e/test_enrollment.py \
	tests/e2e/test_split.py tests/e2e/test_entry_identity.py tests/adversarial/test_refusals.py tests/adversarial/test_guessing.py

# Suites in those folders that use no server database (the AD DC, LDAP transport settings): once is enough.
POSTGRES_SKIP := --ignore=tests/directory_sync/test_active_directory.py --ignore=tests/directory_sync/test_transport.py

# The two passes share no server (each starts its own slapd, PostgreSQL, gunicorn and DC on free ports, in
# its own temporary folder), and each keeps about one core busy: they run side by side, the PostgreSQL
# pass's output printed after the SQLite pass's.
test: install
	$(PY) -m mypy
	$(VENV)/bin/lint-imports
	@tmp=$$(mktemp -d /tmp/autoenroll-test.XXXXXX); \
	echo "PostgreSQL pass running beside the SQLite pass (its output follows at the end)"; \
	$(PY) -m pytest --basetemp=$$tmp/postgresql --database=postgresql $(POSTGRES_SUITES) $(POSTGRES_SKIP) \
	  >$$tmp/postgresql.log 2>&1 & postgres=$$!; \
	$(PY) -m pytest --basetemp=$$tmp/sqlite tests; sqlite_rc=$$?; \
	wait $$postgres; postgres_rc=$$?; \
	echo; echo "==================== the PostgreSQL pass ===================="; cat $$tmp/postgresql.log; \
	echo "SQLite pass: exit $$sqlite_rc; PostgreSQL pass: exit $$postgres_rc"; \
	rm -rf $$tmp; [ $$sqlite_rc -eq 0 ] && [ $$postgres_rc -eq 0 ]

bench: install
	$(PY) -m bench

clean:
	-$(PY) -m directory_sync.slapd stop --dir var/slapd
	rm -rf var
