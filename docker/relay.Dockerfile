# The relay binary (serve and mock-upstream). Untested here (no Docker engine on our machines).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release -p pg-quota-relay

FROM debian:12-slim
COPY --from=build /src/target/release/pg-quota-relay /usr/local/bin/pg-quota-relay
USER nobody
ENTRYPOINT ["pg-quota-relay"]
CMD ["serve", "--listen", "0.0.0.0:8080"]
