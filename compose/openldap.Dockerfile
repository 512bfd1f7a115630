# OpenLDAP (Debian's slapd) built from ldap_schema/ by the same code as `make run` and the tests, then
# served on all interfaces. Build from the repository root: see docker-compose.yml.
FROM python:3.11-slim-bookworm
# python-ldap (a dependency of the package) has no wheels: it builds against libldap and libsasl here.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends slapd ldap-utils \
      gcc libc6-dev libldap2-dev libsasl2-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY setup.cfg pyproject.toml README.md ./
COPY registration_app ./registration_app
COPY directory_sync ./directory_sync
COPY ldap_schema ./ldap_schema
RUN pip install --no-cache-dir .
COPY compose/openldap-entrypoint.sh /usr/local/bin/openldap-entrypoint
EXPOSE 389
VOLUME /var/lib/autoenroll-ldap
ENTRYPOINT ["/usr/local/bin/openldap-entrypoint"]
