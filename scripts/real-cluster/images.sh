# shellcheck shell=bash
# Sourced by scripts/real-cluster.sh: the node's images, all built here (no registry is ever
# pulled from), each an OCI archive under $CACHE/images keyed by what it is built from, so only
# the first run builds:
#   pause, CoreDNS, the Go client (tests/clients/go): static Go programs on an empty image;
#   the webhook: the binary `build` makes, on the distroless stand-in, under the name its chart uses;
#   the proxy: the repository's Dockerfile, unchanged, built by buildah with --pull=never
#     against stand-ins of its two base images (Debian packages via mmdebstrap, plus this
#     machine's Rust toolchain for the builder), tagged with exactly the names its FROM lines
#     use; --layers keeps the dependency layer for the next build;
#   the Python client: Debian's python3 with the pinned azure-identity and
#     tests/clients/python/get_token.py (the pod's command runs whichever script it is given).
# build_images prints one line per image: VARIABLE NAME ARCHIVE.

PYTHON_SDK_PIN=azure-identity==1.27.0
DEBIAN_SUITE=bookworm
DEBIAN_MIRROR=http://deb.debian.org/debian
BUILDAH_STORE=$CACHE/buildah

bah() { # buildah with the cache's own storage (overlay: no copy of each layer)
  buildah --root "$BUILDAH_STORE/root" --runroot "$BUILDAH_STORE/run" --storage-driver overlay "$@"
}

# The key of an image: the hash of the files and words it is built from.
content_key() { # WORD-OR-FILE...
  local x
  for x in "$@"; do
    # Contents only (not where this clone is), so every clone shares the cache.
    if [ -f "$x" ]; then sha256sum <"$x"; elif [ -d "$x" ]; then
      (cd "$x" && find . -type f ! -name '*.tar' | LC_ALL=C sort | xargs sha256sum)
    else echo "$x"; fi
  done | sha256sum | cut -c1-12
}

# An image of static files on nothing: FILE:PATH pairs, then the entrypoint's words.
static_image() { # NAME ARCHIVE LOG FILE:PATH... -- ENTRYPOINT...
  local name=$1 archive=$2 log=$3 c
  shift 3
  c=$(bah from scratch 2>>"$log") || fail "image $name (buildah from)" "$log"
  while [ "$1" != -- ]; do
    run "image $name (copy)" "$log" bah copy "$c" "${1%%:*}" "${1#*:}"
    shift
  done
  shift
  local ep
  ep=$(printf '"%s",' "$@")
  run "image $name (config)" "$log" bah config --entrypoint "[${ep%,}]" "$c"
  commit_image "$c" "$name" "$archive" "$log"
}

commit_image() { # CONTAINER NAME ARCHIVE LOG: committed, tagged NAME, written as an OCI archive
  local c=$1 name=$2 archive=$3 log=$4
  run "image $name (commit)" "$log" bah commit --rm "$c" "$name"
  rm -f "$archive.tmp"
  run "image $name (archive)" "$log" bah push "$name" "oci-archive:$archive.tmp:$name"
  mv "$archive.tmp" "$archive"
}

static_go() { # NAME MODULE-DIR PACKAGE: a static binary in the cache, printed
  local out=$CACHE/bin/$1-$(module_key "$2") log=$CACHE/logs/build-$1.log
  if [ ! -f "$out/.complete" ]; then
    mkdir -p "$out" "$CACHE/logs"
    local start=$SECONDS
    echo "real-cluster: building $1 (log: $log)" >&2
    (cd "$2" && CGO_ENABLED=0 GOMODCACHE=$CACHE/go/mod GOCACHE=$CACHE/go/build \
      GOFLAGS="-buildvcs=false -mod=readonly -p=2" go build -trimpath -ldflags "-s -w" -o "$out/$1" "$3") \
      >"$log" 2>&1 || fail "build $1" "$log"
    echo "real-cluster: built $1 in $((SECONDS - start)) s" >&2
    touch "$out/.complete"
  fi
  echo "$out/$1"
}

# ------------------------------------------------------------------------- base stand-ins
# gcr.io/distroless/cc-debian12:nonroot: glibc, libgcc_s, CA certificates, tzdata, the nonroot
# user (65532) — and, like it, no shell and no package manager.
distroless_standin() { # LOG
  local log=$1 tar=$CACHE/images/distroless-standin.tar name=gcr.io/distroless/cc-debian12:nonroot
  bah inspect --type image "$name" >/dev/null 2>&1 && return 0
  mkdir -p "$CACHE/images"
  run "distroless stand-in (mmdebstrap)" "$log" mmdebstrap --variant=extract \
    --include=libc6,libgcc-s1,libssl3,ca-certificates,tzdata,netbase,base-files \
    --customize-hook='cp /etc/ssl/certs/ca-certificates.crt "$1/etc/ssl/certs/ca-certificates.crt"' \
    --customize-hook='printf "root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n" >"$1/etc/passwd"' \
    --customize-hook='printf "root:x:0:\nnonroot:x:65532:\n" >"$1/etc/group"; mkdir -p "$1/home/nonroot" "$1/tmp"; chown 65532:65532 "$1/home/nonroot"; chmod 1777 "$1/tmp"' \
    --customize-hook='rm -rf "$1/usr/share/doc" "$1/usr/share/man" "$1/var/cache/apt" "$1/var/lib/apt/lists"' \
    "$DEBIAN_SUITE" "$tar" "$DEBIAN_MIRROR"
  local c
  c=$(bah from scratch 2>>"$log") || fail "distroless stand-in" "$log"
  run "distroless stand-in (add)" "$log" bah add "$c" "$tar" /
  run "distroless stand-in (config)" "$log" bah config --user 65532:65532 --workingdir /home/nonroot \
    --env PATH=/usr/local/bin:/usr/bin:/bin --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt "$c"
  run "distroless stand-in (commit)" "$log" bah commit --rm "$c" "$name"
  rm -f "$tar"
}

# docker.io/library/rust:1.95.0-bookworm: Debian bookworm with gcc and the Rust toolchain,
# cargo in PATH. The toolchain is this machine's (it must be the version the FROM line names).
rust_standin() { # LOG
  local log=$1 tar=$CACHE/images/rust-standin.tar name version toolchain
  version=$(sed -n 's/^FROM rust:\([0-9.]*\)-bookworm.*/\1/p' "$ROOT/Dockerfile")
  name=docker.io/library/rust:$version-bookworm
  bah inspect --type image "$name" >/dev/null 2>&1 && return 0
  toolchain=$(rustup +"$version" which rustc 2>>"$log" | sed 's|/bin/rustc$||')
  [ -x "$toolchain/bin/cargo" ] || fail "rust stand-in (no Rust $version toolchain on this machine)" "$log"
  "$toolchain/bin/rustc" --version | grep -q "^rustc $version " ||
    fail "rust stand-in (the toolchain found is not $version)" "$log"
  mkdir -p "$CACHE/images"
  run "rust stand-in (mmdebstrap)" "$log" mmdebstrap --variant=minbase \
    --include=gcc,g++,libc6-dev,make,cmake,perl,pkg-config,ca-certificates,git,curl \
    --customize-hook='rm -rf "$1/var/cache/apt/archives"/*.deb "$1/var/lib/apt/lists"/*' \
    "$DEBIAN_SUITE" "$tar" "$DEBIAN_MIRROR"
  local c
  c=$(bah from scratch 2>>"$log") || fail "rust stand-in" "$log"
  run "rust stand-in (add)" "$log" bah add "$c" "$tar" /
  # The toolchain without its documentation, where the official image puts it.
  run "rust stand-in (toolchain)" "$log" sh -c "tar -C '$toolchain' --exclude=share/doc -cf - . | \
    buildah --root '$BUILDAH_STORE/root' --runroot '$BUILDAH_STORE/run' --storage-driver overlay \
    run --isolation chroot '$c' -- sh -c 'mkdir -p /usr/local/rust && tar -C /usr/local/rust -xf -'"
  run "rust stand-in (config)" "$log" bah config --env CARGO_HOME=/usr/local/cargo \
    --env PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env RUST_VERSION="$version" "$c"
  run "rust stand-in (commit)" "$log" bah commit --rm "$c" "$name"
  rm -f "$tar"
}

# ------------------------------------------------------------------------------------ images
proxy_image() { # LOG: the Dockerfile built by buildah; prints the archive
  local log=$1 key archive name
  key=$(content_key "$ROOT/Dockerfile" "$ROOT/.dockerignore" "$ROOT/Cargo.toml" "$ROOT/Cargo.lock" "$ROOT/crates/emulators/Cargo.toml" "$ROOT/crates/identity-binding-proxy" "$(rustc --version)")
  name=ibp.local/identity-binding-proxy:$key
  archive=$CACHE/images/proxy-$key.tar
  if [ ! -f "$archive" ]; then
    distroless_standin "$log"
    rust_standin "$log"
    local start=$SECONDS
    echo "real-cluster: building the proxy image from the Dockerfile (log: $log)" >&2
    # The crates cargo downloads inside the build: this machine's registry cache, so a cold
    # image build fetches nothing the host already has.
    mkdir -p "${CARGO_HOME:-$HOME/.cargo}/registry"
    # --format docker: the OCI format has no SHELL, and buildah would drop the Dockerfile's
    # (bash with pipefail), as Docker does not.
    run "proxy image (buildah bud)" "$log" bah bud --pull=never --layers --isolation chroot --format docker \
      --volume "${CARGO_HOME:-$HOME/.cargo}/registry:/usr/local/cargo/registry" \
      -f "$ROOT/Dockerfile" -t "$name" "$ROOT"
    rm -f "$archive.tmp"
    run "proxy image (archive)" "$log" bah push "$name" "oci-archive:$archive.tmp:$name"
    mv "$archive.tmp" "$archive"
    echo "real-cluster: built the proxy image in $((SECONDS - start)) s" >&2
  fi
  echo "PROXY_IMAGE $name $archive"
}

python_client_image() { # LOG
  local log=$1 key archive name script=$ROOT/tests/clients/python/get_token.py
  key=$(content_key "$PYTHON_SDK_PIN" "$script" "$DEBIAN_SUITE")
  name=ibp.local/python-client:$key
  archive=$CACHE/images/python-client-$key.tar
  if [ ! -f "$archive" ]; then
    local tmp=$CACHE/images/python-client.tmp
    rm -rf "$tmp" && mkdir -p "$tmp/site"
    run "python client (mmdebstrap)" "$log" mmdebstrap --variant=minbase --include=python3,ca-certificates \
      --customize-hook='rm -rf "$1/var/cache/apt/archives"/*.deb "$1/var/lib/apt/lists"/*' \
      "$DEBIAN_SUITE" "$tmp/root.tar" "$DEBIAN_MIRROR"
    # The SDK from PyPI, for the image's Python (3.11, as this machine's): wheels only.
    run "python client (pip)" "$log" python3 -m pip install --quiet --no-cache-dir --only-binary=:all: \
      --python-version 3.11 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
      --platform manylinux_2_17_x86_64 --target "$tmp/site" "$PYTHON_SDK_PIN"
    local c
    c=$(bah from scratch 2>>"$log") || fail "python client" "$log"
    run "python client (add)" "$log" bah add "$c" "$tmp/root.tar" /
    run "python client (sdk)" "$log" bah copy "$c" "$tmp/site" /usr/local/lib/python3.11/dist-packages
    run "python client (script)" "$log" bah copy "$c" "$script" /client/get_token.py
    run "python client (config)" "$log" bah config --entrypoint '["python3"]' --cmd /client/get_token.py \
      --user 1000:1000 "$c"
    commit_image "$c" "$name" "$archive" "$log"
    rm -rf "$tmp"
  fi
  echo "PYTHON_CLIENT_IMAGE $name $archive"
}

static_images() { # LOG: pause, CoreDNS, the Go client, the webhook
  local log=$1 bin key archive name
  bin=$(static_go pause "$MODS/pause" .) || exit 1
  key=$(content_key "$bin")
  archive=$CACHE/images/pause-$key.tar
  [ -f "$archive" ] || static_image "$PAUSE_IMAGE" "$archive" "$log" "$bin:/pause" -- /pause
  echo "PAUSE_IMAGE $PAUSE_IMAGE $archive"

  bin=$(static_go coredns "$MODS/coredns" .) || exit 1
  key=$(content_key "$bin")
  name=ibp.local/coredns:$COREDNS_VERSION-$key
  archive=$CACHE/images/coredns-$key.tar
  [ -f "$archive" ] || static_image "$name" "$archive" "$log" "$bin:/coredns" -- /coredns
  echo "COREDNS_IMAGE $name $archive"

  bin=$(static_go go-client "$ROOT/tests/clients/go" .) || exit 1
  key=$(content_key "$bin")
  name=ibp.local/go-client:$key
  archive=$CACHE/images/go-client-$key.tar
  [ -f "$archive" ] || static_image "$name" "$archive" "$log" "$bin:/client" -- /client
  echo "GO_CLIENT_IMAGE $name $archive"

  # The webhook, under the exact name its chart's values give (imagePullPolicy IfNotPresent).
  # The binary the control plane's tests run (it links glibc, which the stand-in has).
  bin=$(build_webhook)/webhook || exit 1
  key=$(content_key "$bin")
  name=mcr.microsoft.com/oss/azure/workload-identity/webhook:$WEBHOOK_VERSION
  archive=$CACHE/images/webhook-$key.tar
  if [ ! -f "$archive" ]; then
    distroless_standin "$log"
    local c
    c=$(bah from --pull=never gcr.io/distroless/cc-debian12:nonroot 2>>"$log") || fail "webhook image" "$log"
    run "webhook image (copy)" "$log" bah copy "$c" "$bin" /manager
    run "webhook image (config)" "$log" bah config --entrypoint '["/manager"]' "$c"
    commit_image "$c" "$name" "$archive" "$log"
  fi
  echo "WEBHOOK_IMAGE $name $archive"
}

build_images() { # prints VARIABLE NAME ARCHIVE lines
  local log=$CACHE/logs/images.log
  mkdir -p "$CACHE/images" "$CACHE/logs" "$BUILDAH_STORE"
  # One image build at a time across parallel runs (the buildah store is shared).
  exec 8>"$CACHE/images.lock"
  flock 8
  static_images "$log"
  python_client_image "$log"
  proxy_image "$log"
  flock -u 8
  exec 8>&-
}
