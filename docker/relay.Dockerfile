# pg-quota-relay (`serve`, and `mock-upstream` for demos), built on the host by scripts/package.sh.
# Build context: target/docker/context (see postgres.Dockerfile). Configured only by environment
# variables and flags (relay/README.md): DATABASE_URL, PGQ_UPSTREAM_URL, PGQ_UPSTREAM_API_KEY, ...
ARG BASE_IMAGE=debian:12-slim
FROM ${BASE_IMAGE}

ARG DEBIAN_FRONTEND=noninteractive
RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends ca-certificates; \
    rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/apt/archives/*.deb; \
    useradd --system --uid 10001 --user-group --home-dir /nonexistent --no-create-home \
            --shell /usr/sbin/nologin pgq; \
    install -d -o 10001 -g 10001 -m 0700 /var/lib/pg-quota-relay

COPY pg-quota-relay /usr/local/bin/pg-quota-relay

# Listen on all of the container's addresses (the relay's own default is 127.0.0.1:8080).
ENV PGQ_LISTEN=0.0.0.0:8080 \
    PGQ_MOCK_LISTEN=0.0.0.0:9090 \
    PGQ_STATE_DIR=/var/lib/pg-quota-relay
# The settlement journal: settlements still pending at shutdown, replayed at the next start.
VOLUME /var/lib/pg-quota-relay
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["pg-quota-relay"]
CMD ["serve"]
