# syntax=docker/dockerfile:1
# Multi-stage build: a static musl binary in a distroless image, running as non-root.
#   docker build -t registry.example.com/tollgate:0.1.0 .
# tests/install.rs keeps this file consistent with the repo (COPY sources exist, the Rust image is
# not older than Cargo.toml's rust-version) and with the binary (entrypoint and flags exist).

FROM rust:1.95-bookworm AS build
RUN rustup target add x86_64-unknown-linux-musl \
 && apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# Cargo.toml declares the criterion bench and the bench tools (examples) in bench/, so their
# sources must be present to build.
COPY bench ./bench
# Cache mounts keep the registry and build artefacts between builds (BuildKit).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --locked --release --target x86_64-unknown-linux-musl --bin tollgate \
 && cp target/x86_64-unknown-linux-musl/release/tollgate /tollgate

# distroless/static: no shell, no package manager, CA certificates and /etc/passwd only.
FROM gcr.io/distroless/static-debian12:nonroot
LABEL org.opencontainers.image.title="tollgate" \
      org.opencontainers.image.description="Kubernetes ingress controller and API gateway for AI-agent services" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /tollgate /usr/local/bin/tollgate
COPY crds /etc/tollgate/crds
# 65532 is distroless' "nonroot"; the chart's securityContext runs as the same user.
USER 65532:65532
# --listen, --tls-listen and --admin-listen defaults.
EXPOSE 8080 8443 9090
ENTRYPOINT ["tollgate", "run"]
