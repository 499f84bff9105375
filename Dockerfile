# syntax=docker/dockerfile:1
# One image for canal-controller, canal-agent and canal-cni (and the kubectl
# plugin kubectl-canal, for `kubectl exec ... kubectl-canal` or copying out).
# The chart runs each binary by its path under /usr/local/bin.
#
#   docker build -t registry.example.com/canal:0.1.0 .
#
# builds everything inside Docker (Rust stage, then Debian's packages). With
# release binaries already built on a Debian bookworm host (same glibc):
#
#   cargo build --release --locked --bins -p canal-controller -p canal-agent -p kubectl-canal
#   docker build --build-arg BINARIES=prebuilt -t registry.example.com/canal:0.1.0 .
#
# CI builds this file offline with buildah: BINARIES=prebuilt, and
# RUNTIME_BASE set to a Debian base made with debootstrap carrying exactly
# the packages of the runtime-base stage below (see e2e/src/images/).
# The lab's image (canal-lab images build) is made from the same stages.

# Where the binaries come from: `build` (compile here) or `prebuilt`
# (target/release/ of the build context).
ARG BINARIES=build
# What the runtime stage starts from: the runtime-base stage, or an image
# that already holds its packages.
ARG RUNTIME_BASE=runtime-base

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bins -p canal-controller -p canal-agent -p kubectl-canal \
 && mkdir -p /out \
 && cp target/release/canal-controller target/release/canal-agent target/release/canal-cni target/release/kubectl-canal /out/

FROM scratch AS prebuilt
COPY target/release/canal-controller target/release/canal-agent target/release/canal-cni target/release/kubectl-canal /out/

FROM debian:bookworm-slim AS runtime-base
# What the agent runs: iptables-save/-restore (iptables, nft backend) for
# masquerade and policy, ipset for the policy's address sets, nsenter
# (util-linux, in every Debian base) for another network namespace.
# containernetworking-plugins: /usr/lib/cni/portmap, which canal-cni install
# copies to hosts that have none. conntrack: for inspecting flows with
# kubectl exec. The lab's image (e2e/src/images/) installs this same list.
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables ipset conntrack containernetworking-plugins ca-certificates \
 && rm -rf /var/lib/apt/lists/*

FROM ${BINARIES} AS binaries

FROM ${RUNTIME_BASE} AS runtime
COPY --from=binaries /out/ /usr/local/bin/
# The controller runs as this user (the chart sets runAsNonRoot); the agent
# runs as root with only NET_ADMIN and NET_RAW.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/canal-controller"]
