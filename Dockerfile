# berth's container image, for users who build with Docker (BuildKit: the default builder
# since Docker 23; podman and buildah build it too):
#
#   docker build -t berth .
#
# scripts/image builds the same image offline from a local build (no daemon, no base
# image): the same binary path, user, store, environment, port, entrypoint and labels.
# tests/image.sh checks that this file and scripts/image agree on those.
#
# The store is /var/lib/berth (mount a volume or a hostPath there); berth runs as 65532:65532
# and listens on 0.0.0.0:5000. `--listen`, `--store` and `--config` override the defaults
# (the BERTH_LISTEN and BERTH_STORE below also override a configuration file's [server]
# listen and store: pass the flags, or -e BERTH_STORE=..., to change them).

ARG RUST_IMAGE=rust:bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

# --- build ----------------------------------------------------------------------------------
FROM ${RUST_IMAGE} AS build
# clang/libclang for RocksDB's bindings, cmake for libz-ng-sys (as scripts/setup installs).
RUN apt-get update \
 && apt-get install -y --no-install-recommends clang libclang-dev cmake pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The cargo registry and target directory are build caches: a rebuild after a source change
# does not compile RocksDB again. The binary leaves the cache in the same step; its debug
# info is stripped (the symbol table stays, so backtraces still name functions).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p berth-proxy \
 && objcopy --strip-debug target/release/berth /usr/local/bin/berth \
 && /usr/local/bin/berth --version

# --- runtime --------------------------------------------------------------------------------
FROM ${RUNTIME_IMAGE}
# The workspace version (Cargo.toml [workspace.package] version).
ARG VERSION=0.1.0
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 65532 berth \
 && useradd --uid 65532 --gid 65532 --comment berth --home-dir /var/lib/berth \
            --no-create-home --shell /usr/sbin/nologin berth \
 && install -d -o 65532 -g 65532 -m 0755 /var/lib/berth
COPY --from=build /usr/local/bin/berth /usr/local/bin/berth
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    BERTH_LISTEN=0.0.0.0:5000 \
    BERTH_STORE=/var/lib/berth
WORKDIR /var/lib/berth
USER 65532:65532
EXPOSE 5000/tcp
STOPSIGNAL SIGTERM
LABEL org.opencontainers.image.title="berth" \
      org.opencontainers.image.description="A pull-through caching proxy and private registry for OCI container images" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}"
ENTRYPOINT ["/usr/local/bin/berth", "serve"]
