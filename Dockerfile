# syntax=docker/dockerfile:1
# Production image of identity-binding-proxy: the production crate alone (no emulators), run as
# a non-root user on distroless (no shell, no package manager).
#
#   docker build -t identity-binding-proxy:dev .

# ---- build ------------------------------------------------------------------------------
# Debian bookworm matches the glibc of the distroless runtime below; the image carries gcc,
# which aws-lc-sys needs to build its C sources.
FROM rust:1.95.0-bookworm AS build
WORKDIR /src
# A failing stage of a pipe fails the build.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Dependencies first, against stub sources, so this layer is reused until a manifest or
# Cargo.lock change. Cargo reads every member of the workspace, and checks that every target
# it infers has a file, at every build: each member's manifest is copied and each member gets
# stub sources (its lib, its main, and a file for each [[test]]/[[bench]] named in its
# manifest), kept for the build of the real sources below. Only the production crate is built:
# the emulators and the `dev` binary never enter the image.
COPY Cargo.toml Cargo.lock ./
COPY crates/identity-binding-proxy/Cargo.toml crates/identity-binding-proxy/
COPY crates/emulators/Cargo.toml crates/emulators/
RUN for member in . crates/identity-binding-proxy crates/emulators; do \
        mkdir -p "$member/src" "$member/tests" "$member/benches" \
        && echo 'fn main() {}' > "$member/src/main.rs" \
        && touch "$member/src/lib.rs" \
        && awk -v dir="$member" '/^\[\[(test|bench)\]\]/ { kind = ($0 ~ /test/) ? "tests" : "benches"; next } \
            kind != "" && /^name *=/ { gsub(/[" ]/, "", $0); sub(/^name=/, "", $0); print dir "/" kind "/" $0 ".rs"; kind = "" }' \
            "$member/Cargo.toml" | xargs -r touch; \
    done \
    && cargo build --release --locked -p identity-binding-proxy \
    && rm -rf crates/identity-binding-proxy/src

# The real sources of the production crate. Their modification times may be older than the
# stub build's outputs, so touch the crate roots to make cargo rebuild the crate itself
# (dependencies stay cached).
COPY crates/identity-binding-proxy/src ./crates/identity-binding-proxy/src
RUN touch crates/identity-binding-proxy/src/main.rs crates/identity-binding-proxy/src/lib.rs \
    && cargo build --release --locked -p identity-binding-proxy \
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
