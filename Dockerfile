# syntax=docker/dockerfile:1
# Production image of identity-binding-proxy: built without the `emulators` feature, run as a
# non-root user on distroless (no shell, no package manager).
#
#   docker build -t identity-binding-proxy:dev .

# ---- build ------------------------------------------------------------------------------
# Debian bookworm matches the glibc of the distroless runtime below; the image carries gcc,
# which aws-lc-sys needs to build its C sources.
FROM rust:1.95.0-bookworm AS build
WORKDIR /src
# A failing stage of a pipe fails the build.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Dependencies first, against stub sources, so this layer is reused until Cargo.toml or
# Cargo.lock change. Cargo checks that every [[test]]/[[bench]] target named in Cargo.toml
# has a file, at every build, so a stub is written for each of those too and kept for the
# build of the real sources below (only src/ is replaced).
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src tests benches \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && awk '/^\[\[(test|bench)\]\]/ { kind = ($0 ~ /test/) ? "tests" : "benches"; next } \
            kind != "" && /^name *=/ { gsub(/[" ]/, "", $0); sub(/^name=/, "", $0); print kind "/" $0 ".rs"; kind = "" }' \
            Cargo.toml | xargs -r touch \
    && cargo build --release --locked --no-default-features \
    && rm -rf src

# The real sources. Their modification times may be older than the stub build's outputs, so
# touch the crate roots to make cargo rebuild the crate itself (dependencies stay cached).
COPY src ./src
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked --no-default-features \
    && cp target/release/identity-binding-proxy /identity-binding-proxy

# ---- runtime ----------------------------------------------------------------------------
# The `cc` variant adds libgcc_s, which the Rust binary links. For reproducible production
# images pin this by digest as well (gcr.io/distroless/cc-debian12:nonroot@sha256:...).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /identity-binding-proxy /usr/local/bin/identity-binding-proxy
# The same uid/gid the DaemonSet's securityContext asserts (runAsUser 65532).
USER 65532:65532
# 8443: token endpoint (TLS); 9090: /livez, /readyz, /metrics (plain HTTP).
EXPOSE 8443 9090
ENTRYPOINT ["/usr/local/bin/identity-binding-proxy", "serve"]
