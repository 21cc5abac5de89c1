# syntax=docker/dockerfile:1
#
# The causeway image: one binary, `ENTRYPOINT ["causeway"]`, state in /var/lib/causeway.
#
#   docker build -t causeway:dev .
#   docker run --rm causeway:dev --version
#
# Why glibc on debian-slim and not a static musl binary on scratch/distroless:
#  * ring (the TLS and certificate crypto) compiles C and assembly. Here it is built exactly as
#    the tests build it: `cargo build --release --locked`, default (glibc) target, default
#    features. A musl build would be a second, untested target that also needs musl-tools.
#  * The Kubernetes manifests (deploy/gateway) run `causeway init` from an initContainer only
#    when the state volume has no site yet; that check is one line of /bin/sh, which
#    debian-slim has and scratch/distroless do not.
# The cost is the base image (about 75 MB unpacked); the agent needs only libc6 and libgcc-s1 from it.

ARG RUST_VERSION=1
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
WORKDIR /src
# The whole context (.dockerignore keeps out target/, .git/ and token files) so every target
# Cargo.toml may name is present; the caches keep the registry and target dir across builds.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
 && install -D -m 0755 target/release/causeway /out/causeway

FROM debian:${DEBIAN_RELEASE}-slim
# A fixed numeric uid/gid, so Kubernetes `runAsNonRoot` can verify it and volumes can be
# given to it with `fsGroup: 10001`.
# iproute2: with a vips.cidr outside 127.0.0.0/8 the agent adds `ip route replace local
# <cidr> dev lo` itself (given NET_ADMIN); inside 127/8, the default, it is never used.
# nftables: `causeway intercept install` (vips.mode: intercept) loads its table with `nft`,
# run by an initContainer with NET_ADMIN.
RUN apt-get update \
 && apt-get install -y --no-install-recommends iproute2 nftables \
 && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 causeway \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /var/lib/causeway --shell /usr/sbin/nologin causeway \
 && install -d -m 0700 -o 10001 -g 10001 /var/lib/causeway
COPY --from=build /out/causeway /usr/local/bin/causeway
ENV CAUSEWAY_STATE=/var/lib/causeway
USER 10001:10001
WORKDIR /var/lib/causeway
# 7400/udp: QUIC links; 9400/tcp: /metrics, /healthz, /readyz; 53: the clusterset DNS
# responder (when causeway.yaml listens on it).
EXPOSE 7400/udp 9400/tcp 53/udp 53/tcp
ENTRYPOINT ["causeway"]
CMD ["run"]
