# syntax=docker/dockerfile:1
# One image for canal-controller, canal-agent and canal-cni:
#   docker build -t ghcr.io/canal-dev/canal:0.1.0 .
# The chart runs each binary by its path under /usr/local/bin.

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Manifests first so dependency builds are cached across source edits.
COPY Cargo.toml Cargo.lock ./
COPY crds/Cargo.toml crds/Cargo.toml
COPY runtime/Cargo.toml runtime/Cargo.toml
COPY controller/Cargo.toml controller/Cargo.toml
COPY node-agent/Cargo.toml node-agent/Cargo.toml
COPY e2e/Cargo.toml e2e/Cargo.toml
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p canal-controller -p canal-agent \
 && mkdir -p /out \
 && cp target/release/canal-controller target/release/canal-agent target/release/canal-cni /out/

FROM debian:bookworm-slim AS runtime
# iptables (nft backend), ipset and conntrack: the agent's batch writers
# (iptables-restore, ipset restore) and conntrack cleanup; portmap (from
# containernetworking-plugins) for the conflist's chained plugin.
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables ipset conntrack containernetworking-plugins ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/ /usr/local/bin/
# The controller runs as this user (the chart sets runAsNonRoot); the agent
# runs as root with only NET_ADMIN and NET_RAW.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/canal-controller"]
