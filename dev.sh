#!/usr/bin/env bash
# ./dev.sh [layer dev flags]: installs what `layer dev` needs (the PostgreSQL
# server binaries), builds the release binary, and starts `layer dev`: the
# platform on http://127.0.0.1:8080 over an embedded PostgreSQL in .layer/,
# with one local runner. Ctrl-C stops it; the data stays for the next start.
set -euo pipefail
cd "$(dirname "$0")"
. deploy/prereqs.sh

install_packages $(postgres_package)
check_data_dir_reachable "$(data_dir_arg "$@")"
need_cargo
say "building the layer binary (release; the first build takes a few minutes)"
cargo build --release --bin layer
exec ./target/release/layer dev "$@"
