#!/usr/bin/env bash
# ./test.sh [nextest args]: installs what the tests need, then runs the suite.
#
#   cargo-nextest                    cargo install (from crates.io)
#   the PostgreSQL server binaries   Debian package postgresql
#   promtool                         Debian package prometheus
#   debootstrap                      Debian package debootstrap (the Python image base)
#   target/pyenv                     a venv with the public client, hevlayer==0.7.3,
#                                    and schemathesis==4.32.5 (API fuzzing)
#   the example worker images        deploy/images/build.sh (needs Docker)
#
# First it prints the free disk space and refuses to start with less than
# LAYER_MIN_FREE_GIB (default 8) GiB free: a full disk fails builds,
# PostgreSQL and Docker in ways that look like test failures.
#
# Then it starts a throwaway PostgreSQL (unless DATABASE_URL names one),
# runs `cargo nextest run --workspace` with any arguments given here, and
# stops that PostgreSQL again. Everything the run writes to a temporary
# directory (that PostgreSQL, the tests' scratch directories: TMPDIR points
# into it) lives under one /tmp/layer-test.XXXXXX, removed on exit, whether
# the tests pass, fail or are interrupted.
#
# The nextest profile (.config/nextest.toml): `default`, or `ci` when the
# CI variable is set (every failure reported, a JUnit report under
# target/nextest/ci/). On a machine with no Docker at all (no `docker`
# client) the container tests are skipped with the `no-docker` (or
# `ci-no-docker`) profile, and this says so loudly; where Docker exists
# they all run, and an engine that does not answer fails them.
set -euo pipefail
cd "$(dirname "$0")"
. deploy/prereqs.sh

check_free_disk "${LAYER_MIN_FREE_GIB:-8}" .
need_cargo
command -v python3 >/dev/null 2>&1 || install_packages python3 python3-venv
missing=()
pkg=$(postgres_package) && [ -n "$pkg" ] && missing+=("$pkg")
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
docker=yes
if no_docker_at_all; then
  docker=no
else
  command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
fi
python3 -m venv --help >/dev/null 2>&1 || missing+=(python3-venv)
install_packages "${missing[@]}"

if ! cargo nextest --version >/dev/null 2>&1; then
  say "installing cargo-nextest (cargo install; a few minutes)"
  cargo install cargo-nextest --locked
fi

if [ ! -x target/pyenv/bin/python ] || ! target/pyenv/bin/python -c 'import hevlayer' 2>/dev/null; then
  say "making target/pyenv with the public hevlayer client"
  mkdir -p target
  python3 -m venv target/pyenv
  target/pyenv/bin/pip install --quiet --disable-pip-version-check hevlayer==0.7.3
fi
if ! target/pyenv/bin/st --version 2>/dev/null | grep -q 4.32.5; then
  say "installing schemathesis 4.32.5 into target/pyenv (the API fuzzing tests)"
  target/pyenv/bin/pip install --quiet --disable-pip-version-check schemathesis==4.32.5
fi

# One temporary directory for everything this run writes there, removed on
# exit however the run ends.
RUN_TMP=$(mktemp -d /tmp/layer-test.XXXXXX)
# Traversable by the unprivileged users PostgreSQL and some tests run as.
chmod 755 "$RUN_TMP"
mkdir -m 1777 "$RUN_TMP/tmp"
PG_STOP=()
cleanup() {
  [ ${#PG_STOP[@]} -gt 0 ] && "${PG_STOP[@]}" >/dev/null 2>&1
  rm -rf "$RUN_TMP"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
export TMPDIR=$RUN_TMP/tmp
say "this run's temporary files: $RUN_TMP (removed on exit)"

profile=default
case "${CI:-}" in "" | 0 | false) ;; *) profile=ci ;; esac
if [ "$docker" = yes ]; then
  say "building the example worker images (deploy/images/build.sh; the first time takes a few minutes)"
  flock /tmp/layer-images.lock deploy/images/build.sh
else
  cat >&2 <<'MSG'

  ***************************************************************************
  *  SKIPPING the container tests (tests/tests/it/containers.rs): this      *
  *  machine has no Docker at all (no `docker` client on PATH). nextest     *
  *  counts them as skipped below. Install Docker to run them.              *
  ***************************************************************************

MSG
  if [ "$profile" = ci ]; then profile=ci-no-docker; else profile=no-docker; fi
fi

# A throwaway PostgreSQL for this run, unless DATABASE_URL names a server.
if [ -z "${DATABASE_URL:-}" ]; then
  PG_BIN=$(pg_bindir)
  PG_DIR=$RUN_TMP/pg
  mkdir -m 755 "$PG_DIR"
  RUN_AS=()
  if [ "$(id -u)" = 0 ]; then
    PG_USER=${LAYER_PG_USER:-postgres}
    id "$PG_USER" >/dev/null 2>&1 || PG_USER=nobody
    chown "$PG_USER" "$PG_DIR"
    RUN_AS=(runuser -u "$PG_USER" --)
  fi
  "${RUN_AS[@]}" "$PG_BIN/initdb" -D "$PG_DIR/data" -U layer --auth=trust -E UTF8 --locale=C >/dev/null
  PG_STOP=("${RUN_AS[@]}" "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m fast -w stop)
  "${RUN_AS[@]}" "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/postgres.log" -w start -o \
    "-k $PG_DIR -c listen_addresses= -c max_connections=300 -c fsync=off -c synchronous_commit=off -c full_page_writes=off" >/dev/null
  export DATABASE_URL="postgres://layer@localhost/postgres?host=$PG_DIR"
fi
say "running the tests: cargo nextest run --workspace --profile $profile $*"
cargo nextest run --workspace --profile "$profile" "$@"
