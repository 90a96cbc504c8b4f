# syntax=docker/dockerfile:1
# Multi-stage build: a static musl binary in a distroless image, running as non-root.

FROM rust:1.95-bookworm AS build
RUN rustup target add x86_64-unknown-linux-musl \
 && apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN cargo build --locked --release --target x86_64-unknown-linux-musl --bin tollgate \
 && cp target/x86_64-unknown-linux-musl/release/tollgate /tollgate

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /tollgate /usr/local/bin/tollgate
COPY crds /etc/tollgate/crds
USER 65532:65532
EXPOSE 8080 8443 9090
ENTRYPOINT ["tollgate", "run"]
