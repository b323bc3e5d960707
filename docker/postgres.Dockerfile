# PostgreSQL 15 (Debian's packages) with pg_quota preloaded.
# Build context: the directory that scripts/package.sh fills (target/docker/context), which holds
# the `cargo pgrx package` tree built on the host and this image's entrypoint:
#   scripts/package.sh && docker build -f target/docker/context/postgres.Dockerfile \
#       -t pg-quota-postgres target/docker/context
# No secret is baked in: passwords come from the environment (or *_FILE) at the first start.
ARG BASE_IMAGE=debian:12-slim
FROM ${BASE_IMAGE}

ARG DEBIAN_FRONTEND=noninteractive
# Debian's packages; no "main" cluster: the entrypoint makes its own in $PGDATA.
RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends postgresql-common; \
    sed -ri 's/^#?\s*create_main_cluster\s*=.*/create_main_cluster = false/' /etc/postgresql-common/createcluster.conf; \
    apt-get install -y --no-install-recommends postgresql-15; \
    rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/apt/archives/*.deb; \
    mkdir -p /var/lib/postgresql/data /var/run/postgresql /docker-entrypoint-initdb.d; \
    chown postgres:postgres /var/lib/postgresql/data /var/run/postgresql; \
    chmod 700 /var/lib/postgresql/data; chmod 2775 /var/run/postgresql

# The extension (shared library, control file, install scripts) from `cargo pgrx package`.
COPY pg_quota-pg15/usr/lib/postgresql/15/lib/ /usr/lib/postgresql/15/lib/
COPY pg_quota-pg15/usr/share/postgresql/15/extension/ /usr/share/postgresql/15/extension/
COPY entrypoint-postgres.sh /usr/local/bin/pg-quota-entrypoint

ENV PATH=/usr/lib/postgresql/15/bin:$PATH \
    PGDATA=/var/lib/postgresql/data \
    PGQ_DB=pg_quota \
    PGQ_RELAY_USER=pgq_relay
VOLUME /var/lib/postgresql/data
USER postgres
EXPOSE 5432
HEALTHCHECK --interval=5s --timeout=5s --start-period=60s --retries=5 CMD ["pg_isready", "-q", "-h", "/var/run/postgresql"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["pg-quota-entrypoint"]
CMD ["postgres"]
