# PostgreSQL 15 with pg_quota installed. Untested here (no Docker engine on our machines):
# it runs the same scripts/bootstrap.sh and `cargo pgrx install` that CI exercises.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN bash scripts/bootstrap.sh \
 && cd pg_quota && cargo pgrx package --pg-config /usr/lib/postgresql/15/bin/pg_config --out-dir /pkg

FROM postgres:15-bookworm
COPY --from=build /pkg/usr/lib/postgresql/15/lib/ /usr/lib/postgresql/15/lib/
COPY --from=build /pkg/usr/share/postgresql/15/extension/ /usr/share/postgresql/15/extension/
# The sweeper background worker runs when the library is preloaded.
CMD ["postgres", "-c", "shared_preload_libraries=pg_quota", "-c", "pg_quota.sweep_database=pg_quota"]
