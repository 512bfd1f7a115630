# The registration server (all-in-one "server platform"): gunicorn with TLS on 8443, CRL/CA over plain
# HTTP on 8080. Build from the repository root: see docker-compose.yml.
FROM python:3.11-slim-bookworm
# python-ldap (the publication fast path) has no wheels: it builds against libldap and libsasl here.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends openssl ldap-utils \
      gcc libc6-dev libldap2-dev libsasl2-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY setup.cfg pyproject.toml README.md ./
COPY registration_app ./registration_app
COPY directory_sync ./directory_sync
COPY ldap_schema ./ldap_schema
RUN pip install --no-cache-dir ".[postgresql]"
COPY compose/server-entrypoint.sh /usr/local/bin/server-entrypoint
RUN useradd --system --uid 10001 --home /var/lib/autoenroll autoenroll && mkdir -p /var/lib/autoenroll \
 && chown autoenroll /var/lib/autoenroll
USER autoenroll
ENV AUTOENROLL_DATA_DIR=/var/lib/autoenroll \
    AUTOENROLL_BIND=0.0.0.0:8443 \
    AUTOENROLL_HTTP_BIND=0.0.0.0:8080
EXPOSE 8443 8080
VOLUME /var/lib/autoenroll
ENTRYPOINT ["/usr/local/bin/server-entrypoint"]
