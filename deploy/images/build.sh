#!/usr/bin/env bash
# Builds the example workers into local Docker images, with no registry and
# nothing pulled:
#
#   layer/echo-rust:dev         FROM scratch: the Rust echo worker
#                               (examples/echo-rust) as a static binary
#   layer/python-base:bookworm  Debian bookworm (minbase + python3), made
#                               with debootstrap and `docker import`
#   layer/tag-products:dev      the Python classifier (examples/tag-products)
#                               on that base
#   layer/test-worker:dev       the tests' misbehaving push worker
#                               (tests/python/push_worker.py) on that base
#   layer/test-worker-tmp0700:dev  the same worker on a base whose /tmp is
#                               root's, mode 0700 (the container tests'
#                               check that the runner's /tmp tmpfs is
#                               writable whatever the image's /tmp is)
#
# Usage: deploy/images/build.sh [echo] [python] [test]   (all when none is named)
# An image that exists is kept; LAYER_REBUILD=1 builds it again.
# Needs: docker, cargo, and for the Python base debootstrap (Debian package
# `debootstrap`) with a reachable Debian mirror (LAYER_DEBIAN_MIRROR,
# default http://deb.debian.org/debian), run as root.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
WANT=("$@")
[ ${#WANT[@]} -eq 0 ] && WANT=(echo python test)
MIRROR=${LAYER_DEBIAN_MIRROR:-http://deb.debian.org/debian}

have() { [ "${LAYER_REBUILD:-0}" != 1 ] && docker image inspect "$1" >/dev/null 2>&1; }
ctx() { mktemp -d /tmp/layer-image.XXXXXX; }

build_echo() {
  if have layer/echo-rust:dev; then echo "layer/echo-rust:dev: present"; return; fi
  local host dir
  host=$(rustc -vV | sed -n 's/^host: //p')
  # crt-static links glibc in: the binary runs in an empty image. With an
  # explicit --target the flag reaches only the worker, not build scripts.
  RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release --quiet -p layer-echo-worker --target "$host"
  dir=$(ctx)
  cp "target/$host/release/layer-echo-worker" "$dir/"
  strip "$dir/layer-echo-worker" 2>/dev/null || true
  cat > "$dir/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY layer-echo-worker /layer-echo-worker
# In a container the worker listens on every interface of its own network.
ENV BIND=0.0.0.0 PORT=8080
USER 65534:65534
EXPOSE 8080
ENTRYPOINT ["/layer-echo-worker"]
DOCKERFILE
  docker build --quiet -t layer/echo-rust:dev "$dir" >/dev/null
  rm -rf "$dir"
  echo "layer/echo-rust:dev: built"
}

build_python_base() {
  if have layer/python-base:bookworm; then echo "layer/python-base:bookworm: present"; return; fi
  command -v debootstrap >/dev/null || { echo "debootstrap is missing: apt-get install debootstrap" >&2; exit 1; }
  local root
  root=$(mktemp -d /tmp/layer-rootfs.XXXXXX)
  debootstrap --variant=minbase --include=python3 bookworm "$root" "$MIRROR" >/dev/null
  # What a worker never needs.
  rm -rf "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* \
    "$root"/usr/share/man/* "$root"/usr/share/locale/*
  tar -C "$root" -c . | docker import - layer/python-base:bookworm >/dev/null
  rm -rf "$root"
  echo "layer/python-base:bookworm: built"
}

# on_python_base IMAGE SCRIPT [LINE]: the Python script as a worker image on
# the debootstrap base, run as nobody and listening on every interface. A
# LINE (a Dockerfile instruction) runs as root before the worker's USER.
on_python_base() {
  local image=$1 script=$2 extra=${3:-} dir name
  if have "$image"; then echo "$image: present"; return; fi
  dir=$(ctx)
  name=$(basename "$script")
  cp "$script" "$dir/"
  cat > "$dir/Dockerfile" <<DOCKERFILE
FROM layer/python-base:bookworm
COPY $name /app/$name
$extra
ENV BIND=0.0.0.0 PORT=8080 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 65534:65534
EXPOSE 8080
CMD ["python3", "/app/$name"]
DOCKERFILE
  docker build --quiet -t "$image" "$dir" >/dev/null
  rm -rf "$dir"
  echo "$image: built"
}

for w in "${WANT[@]}"; do
  case "$w" in
    echo) build_echo ;;
    python) build_python_base; on_python_base layer/tag-products:dev examples/tag-products/worker.py ;;
    test)
      build_python_base
      on_python_base layer/test-worker:dev tests/python/push_worker.py
      on_python_base layer/test-worker-tmp0700:dev tests/python/push_worker.py "RUN chown 0:0 /tmp && chmod 0700 /tmp"
      ;;
    *) echo "unknown image set '$w' (echo, python, test)" >&2; exit 2 ;;
  esac
done
cd "$ROOT"
