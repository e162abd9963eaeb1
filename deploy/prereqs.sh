# Sourced by ./dev.sh and ./test.sh: finds what a command needs and installs
# what is missing. As root, Debian's packages are installed with apt-get;
# otherwise the one command to run is printed and the script stops.

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# The directory holding initdb and postgres, as the platform looks for it.
pg_bindir() {
  local d
  if [ -n "${LAYER_PG_BINDIR:-}" ]; then
    [ -x "$LAYER_PG_BINDIR/initdb" ] && [ -x "$LAYER_PG_BINDIR/postgres" ] || return 1
    echo "$LAYER_PG_BINDIR"; return
  fi
  if d=$(command -v initdb 2>/dev/null) && [ -x "$(dirname "$(readlink -f "$d")")/postgres" ]; then
    dirname "$(readlink -f "$d")"; return
  fi
  if command -v pg_config >/dev/null 2>&1 && d=$(pg_config --bindir 2>/dev/null) && [ -x "$d/initdb" ] && [ -x "$d/postgres" ]; then
    echo "$d"; return
  fi
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    if [ -x "$d/initdb" ] && [ -x "$d/postgres" ]; then echo "$d"; return; fi
  done
  return 1
}

# install_packages PKG...: Debian packages, as root; else say how and stop.
install_packages() {
  [ $# -eq 0 ] && return 0
  if ! command -v apt-get >/dev/null 2>&1; then
    die "missing: $* (Debian package names); install their equivalents with your system's package manager, then run this again"
  fi
  if [ "$(id -u)" != 0 ]; then
    printf '\nThese Debian packages are missing: %s\nInstall them, then run this again:\n\n  sudo apt-get install -y --no-install-recommends %s\n\n' "$*" "$*" >&2
    exit 1
  fi
  say "installing $* (apt-get)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# check_free_disk MIN_GIB DIR: prints the free space on DIR's filesystem and
# on /tmp's, and stops when either has less than MIN_GIB GiB free.
check_free_disk() {
  local min=$1 dir=$2 d free
  for d in "$dir" /tmp; do
    free=$(df -Pk "$d" | awk 'NR == 2 { print int($4 / 1048576) }')
    say "free disk: ${free} GiB on $(df -P "$d" | awk 'NR == 2 { print $6 }') (for $(cd "$d" && pwd))"
    if [ "$free" -lt "$min" ]; then
      printf '\nerror: only %s GiB free for %s; this needs at least %s GiB (LAYER_MIN_FREE_GIB).\n' "$free" "$(cd "$d" && pwd)" "$min" >&2
      printf 'See what uses it, largest last:\n\n  du -xhd1 %s 2>/dev/null | sort -h | tail\n\n' "$(df -P "$d" | awk 'NR == 2 { print $6 }')" >&2
      printf 'An old target/ of a clone is many GB: cargo clean there, or delete the clone.\n' >&2
      exit 1
    fi
  done
}

need_cargo() {
  command -v cargo >/dev/null 2>&1 ||
    die "cargo is missing: install Rust (1.89 or newer) with rustup, then run this again"
}

# The PostgreSQL server binaries (the platform runs its own cluster from them).
postgres_package() { pg_bindir >/dev/null || echo postgresql; }

# No Docker at all: no `docker` client, which the container tests drive
# (images, inspect). A client whose engine does not answer is a broken
# machine, not a Docker-less one: those tests then run and fail.
no_docker_at_all() { ! command -v docker >/dev/null 2>&1; }

# The user PostgreSQL runs as under root, as `layer dev` picks it.
pg_user() {
  if [ -n "${LAYER_PG_USER:-}" ]; then echo "$LAYER_PG_USER"; return; fi
  local u
  for u in postgres nobody; do
    id "$u" >/dev/null 2>&1 && { echo "$u"; return; }
  done
  return 1
}

# The --data-dir among `layer dev` arguments, else its default.
data_dir_arg() {
  local dir=.layer
  while [ $# -gt 0 ]; do
    case "$1" in
      --data-dir) [ $# -gt 1 ] && dir=$2 && shift ;;
      --data-dir=*) dir=${1#--data-dir=} ;;
    esac
    shift
  done
  echo "$dir"
}

# check_data_dir_reachable DIR: as root, `layer dev` runs PostgreSQL as an
# unprivileged user (initdb refuses root), which must be able to enter every
# directory on the way to DIR. If it cannot, say which and what to run, and
# stop before anything is built or initialised.
check_data_dir_reachable() {
  [ "$(id -u)" = 0 ] || return 0
  local user uid groups dir path part owner group mode bit class
  user=$(pg_user) || return 0 # layer dev itself says there is none
  uid=$(id -u "$user")
  groups=" $(id -G "$user") "
  dir=$(realpath -m "$1")
  local blocked=() fix_u=() fix_g=() fix_o=()
  path=
  IFS=/ read -r -a parts <<<"${dir#/}"
  for part in "" "${parts[@]}"; do
    [ -n "$part" ] && path="$path/$part"
    [ -d "${path:-/}" ] || break
    read -r owner group mode < <(stat -c '%u %g %a' "${path:-/}")
    mode=$((8#$mode))
    if [ "$owner" = "$uid" ]; then bit=$((8#100)) class=u
    elif [[ $groups == *" $group "* ]]; then bit=$((8#10)) class=g
    else bit=1 class=o
    fi
    if ((mode & bit)); then continue; fi
    blocked+=("${path:-/} (mode $(stat -c '%a' "${path:-/}"), owner $(stat -c '%U' "${path:-/}"))")
    case $class in u) fix_u+=("${path:-/}") ;; g) fix_g+=("${path:-/}") ;; o) fix_o+=("${path:-/}") ;; esac
  done
  [ ${#blocked[@]} -eq 0 ] && return 0
  {
    printf '\nerror: layer dev runs PostgreSQL as user %s (initdb refuses root), and %s cannot enter\n' "$user" "$user"
    printf '  %s\n' "${blocked[@]}"
    printf 'on the way to the data directory %s. Nothing was built or initialised.\n' "$dir"
    printf 'Either let it through (+x lets it pass, not list):\n\n'
    [ ${#fix_u[@]} -gt 0 ] && printf '  chmod u+x %s\n' "${fix_u[*]}"
    [ ${#fix_g[@]} -gt 0 ] && printf '  chmod g+x %s\n' "${fix_g[*]}"
    [ ${#fix_o[@]} -gt 0 ] && printf '  chmod o+x %s\n' "${fix_o[*]}"
    printf '\nor keep the data where it can reach, for example:\n\n  ./dev.sh --data-dir /var/tmp/layer-dev\n\n'
  } >&2
  exit 1
}
