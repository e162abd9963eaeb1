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
#   ghcr.io/hev/tag-products:latest
#                               seed 000's classifier as a pull worker
#                               (examples/tag-products-pull/worker.py, as the
#                               seed writes it, started by main.py there) with
#                               the public hevlayer client, so the seed's YAML
#                               runs unchanged
#   ghcr.io/hev/tag-products-writethrough:latest
#                               the seed's write-through pattern
#                               (examples/tag-products-writethrough/worker.py)
#
# The pull images take the hevlayer client (hevlayer==0.7.3 and what it
# needs) from target/pyenv, which ./test.sh makes; this makes it the same way
# when it is missing.
#
# Usage: deploy/images/build.sh [echo] [python] [test] [pull]   (all when none is named)
# An image that exists is kept; LAYER_REBUILD=1 builds it again.
# Needs: docker, cargo, and for the Python base debootstrap (Debian package
# `debootstrap`) with a reachable Debian mirror (LAYER_DEBIAN_MIRROR,
# default http://deb.debian.org/debian), run as root.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
WANT=("$@")
[ ${#WANT[@]} -eq 0 ] && WANT=(echo python test pull)
MIRROR=${LAYER_DEBIAN_MIRROR:-http://deb.debian.org/debian}
target_dir=${CARGO_TARGET_DIR:-target}

have() { [ "${LAYER_REBUILD:-0}" != 1 ] && docker image inspect "$1" >/dev/null 2>&1; }
# Scratch directories (build contexts, the debootstrap root) live under
# TMPDIR and are removed on exit, a failed or interrupted build included.
SCRATCH=()
trap 'rm -rf "${SCRATCH[@]}"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
scratch() { SCRATCH+=("$(mktemp -d "${TMPDIR:-/tmp}/layer-$1.XXXXXX")"); }

build_echo() {
  if have layer/echo-rust:dev; then echo "layer/echo-rust:dev: present"; return; fi
  local host dir
  host=$(rustc -vV | sed -n 's/^host: //p')
  # crt-static links glibc in: the binary runs in an empty image. With an
  # explicit --target the flag reaches only the worker, not build scripts.
  RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release --quiet -p layer-echo-worker --target "$host"
  scratch image; dir=${SCRATCH[-1]}
  cp "$target_dir/$host/release/layer-echo-worker" "$dir/"
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
  scratch rootfs; root=${SCRATCH[-1]}
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
  scratch image; dir=${SCRATCH[-1]}
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

# pull_image IMAGE WORKER: a pull worker image: WORKER (a module with the
# @udf function tag_product) started by examples/tag-products-pull/main.py,
# with the client's packages beside it, run as nobody.
pull_image() {
  local image=$1 script=$2 dir site
  if have "$image"; then echo "$image: present"; return; fi
  if [ ! -x target/pyenv/bin/python ] || ! target/pyenv/bin/python -c 'import hevlayer' 2>/dev/null; then
    python3 -m venv target/pyenv
    target/pyenv/bin/pip install --quiet --disable-pip-version-check hevlayer==0.7.3
  fi
  site=$(target/pyenv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  scratch image; dir=${SCRATCH[-1]}
  mkdir "$dir/site-packages"
  # The client and what it imports; not pip's own tools.
  (cd "$site" && tar -c --exclude='__pycache__' --exclude='pip*' --exclude='setuptools*' \
    --exclude='pkg_resources' --exclude='_distutils_hack' --exclude='distutils-precedence.pth' .) |
    tar -C "$dir/site-packages" -x
  cp "$script" "$dir/worker.py"
  cp examples/tag-products-pull/main.py "$dir/main.py"
  cat > "$dir/Dockerfile" <<'DOCKERFILE'
FROM layer/python-base:bookworm
COPY site-packages /app/site-packages
COPY worker.py main.py /app/
ENV PYTHONPATH=/app/site-packages PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 65534:65534
CMD ["python3", "/app/main.py"]
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
    pull)
      build_python_base
      pull_image ghcr.io/hev/tag-products:latest examples/tag-products-pull/worker.py
      pull_image ghcr.io/hev/tag-products-writethrough:latest examples/tag-products-writethrough/worker.py
      ;;
    *) echo "unknown image set '$w' (echo, python, test, pull)" >&2; exit 2 ;;
  esac
done
cd "$ROOT"
