#!/usr/bin/env bash
# A bare Debian 12 (bookworm, minbase) root for the tests that need a clean machine
# (tests/bare_machine.rs: the demo's dependency step; tests/package.rs: installing the .deb the
# way a device image gets it). Needs root, debootstrap and unshare (scripts/deps.sh chroot).
#
#   bash scripts/chroot.sh tarball        # debootstrap once into the cache (~1-2 min), print the tarball
#   bash scripts/chroot.sh new DIR        # a fresh copy of it in DIR (seconds)
#   bash scripts/chroot.sh run DIR CMD... # CMD inside DIR, as root, with a clean environment
#   bash scripts/chroot.sh rm DIR         # delete DIR (after checking nothing is mounted in it)
#
# The tarball lives in ~/.cache/edge-vision/chroot (EDGE_VISION_CACHE), outside the clone, and is
# made once (a lock keeps parallel tests from making it twice). Mirror: deb.debian.org, or
# EDGE_VISION_DEBIAN_MIRROR.
#
# `run` mounts /proc, /sys (read-only), /dev (and /dev/pts, /dev/shm) into DIR inside a private
# mount namespace of its own (unshare), so the mounts are gone when CMD ends however it ends,
# and are unmounted explicitly as well (trap). Services are never started inside (a
# policy-rc.d that says no, as on image builders), and processes left running in DIR are
# ended. With CHROOT_APT_CACHE=HOSTDIR, downloaded packages are kept in HOSTDIR across runs
# (bind mount over /var/cache/apt/archives), so repeated tests do not download them again.
set -euo pipefail
CACHE="${EDGE_VISION_CACHE:-$HOME/.cache/edge-vision}/chroot"
SUITE=bookworm
MIRROR="${EDGE_VISION_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
TARBALL="$CACHE/$SUITE-minbase.tar"

die() { echo "chroot.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot, mount)"

tarball() {
  mkdir -p "$CACHE"
  exec 9>"$CACHE/.lock"
  flock 9
  if [ ! -s "$TARBALL" ]; then
    command -v debootstrap >/dev/null || die "debootstrap missing: bash scripts/deps.sh chroot"
    echo "chroot.sh: debootstrap --variant=minbase $SUITE from $MIRROR (once, ~1-2 min)" >&2
    local tmp="$CACHE/build.$$"
    rm -rf "$tmp"
    debootstrap --variant=minbase "$SUITE" "$tmp" "$MIRROR" >&2 ||
      { rm -rf --one-file-system "$tmp"; die "debootstrap failed"; }
    rm -f "$tmp"/var/cache/apt/archives/*.deb
    tar --numeric-owner -C "$tmp" -cf "$TARBALL.part" .
    rm -rf --one-file-system "$tmp"
    mv "$TARBALL.part" "$TARBALL"
  fi
  flock -u 9
  echo "$TARBALL"
}

new() { # DIR
  local dir=$1
  tarball >/dev/null
  mkdir -p "$dir"
  [ -z "$(ls -A "$dir")" ] || die "$dir is not empty"
  tar --numeric-owner -C "$dir" -xpf "$TARBALL"
  cp -L /etc/resolv.conf "$dir/etc/resolv.conf"
  # As image builders do: package scripts may not start services in here.
  printf '#!/bin/sh\nexit 101\n' >"$dir/usr/sbin/policy-rc.d"
  chmod 755 "$dir/usr/sbin/policy-rc.d"
  # A throw-away root: no fsync per file (dpkg is much faster).
  echo force-unsafe-io >"$dir/etc/dpkg/dpkg.cfg.d/unsafe-io"
}

# Processes whose root directory is DIR (anything a command left running in the chroot).
leftovers() { # DIR
  local dir p
  dir=$(realpath "$1")
  for p in /proc/[0-9]*; do
    [ "$(readlink "$p/root" 2>/dev/null)" = "$dir" ] && echo "${p#/proc/}"
  done
  return 0
}

end_leftovers() { # DIR
  local pids
  pids=$(leftovers "$1")
  [ -z "$pids" ] && return 0
  echo "chroot.sh: ending processes left in $1: $pids" >&2
  # shellcheck disable=SC2086
  kill $pids 2>/dev/null || true
  sleep 1
  pids=$(leftovers "$1")
  # shellcheck disable=SC2086
  [ -z "$pids" ] || kill -9 $pids 2>/dev/null || true
}

run() { # DIR CMD...
  local dir
  dir=$(realpath "$1")
  shift
  [ -x "$dir/bin/sh" ] || die "$dir is not a root made by '$0 new'"
  # Inside a private mount namespace (unshare -m): nothing mounted here is seen outside, and it
  # all goes away with the namespace.
  CHROOT_DIR="$dir" unshare --mount --propagation private -- bash -c '
    set -euo pipefail
    dir=$CHROOT_DIR
    mounted=()
    cleanup() {
      local i
      for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do
        umount -R "${mounted[i]}" 2>/dev/null || umount -l "${mounted[i]}" 2>/dev/null || true
      done
    }
    trap cleanup EXIT
    mnt() { # TARGET mount-args...
      local target=$1
      shift
      mkdir -p "$target"
      mount "$@" "$target" || return 1
      mounted+=("$target")
    }
    mnt "$dir/proc" -t proc proc
    mnt "$dir/sys" -t sysfs -o ro sysfs || true
    mnt "$dir/dev" --rbind /dev
    if [ -n "${CHROOT_APT_CACHE:-}" ]; then
      mkdir -p "$CHROOT_APT_CACHE/partial"
      mnt "$dir/var/cache/apt/archives" --bind "$CHROOT_APT_CACHE"
    fi
    set +e
    chroot "$dir" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
      HOME=/root LANG=C.UTF-8 TERM=dumb ${http_proxy:+http_proxy=$http_proxy} \
      ${https_proxy:+https_proxy=$https_proxy} "$@" </dev/null
    rc=$?
    exit $rc
  ' chroot-run "$@"
  local rc=$?
  end_leftovers "$dir"
  return $rc
}

rm_root() { # DIR
  local dir
  [ -e "$1" ] || return 0
  dir=$(realpath "$1")
  end_leftovers "$dir"
  # `run` mounts only inside its own namespace; anything here came from elsewhere: refuse.
  if awk -v d="$dir" '$2 == d || index($2, d "/") == 1 { found = 1 } END { exit !found }' /proc/self/mounts; then
    die "something is mounted under $dir; not deleting"
  fi
  rm -rf --one-file-system "$dir"
}

case "${1:-}" in
  tarball) tarball ;;
  new) new "${2:?usage: $0 new DIR}" ;;
  run)
    [ $# -ge 3 ] || die "usage: $0 run DIR CMD..."
    dir=$2
    shift 2
    set +e
    run "$dir" "$@"
    exit $?
    ;;
  rm) rm_root "${2:?usage: $0 rm DIR}" ;;
  *) echo "usage: $0 tarball | new DIR | run DIR CMD... | rm DIR" >&2; exit 2 ;;
esac
