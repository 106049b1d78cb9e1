#!/usr/bin/env bash
# Cross-builds edge-agent for the devices, on an x86-64 Debian 12 machine, without Docker:
#
#   bash cross/build.sh aarch64    # Jetson, Raspberry Pi 4/5 (64-bit OS)
#   bash cross/build.sh armv7      # Raspberry Pi 2/3/4 with a 32-bit OS
#   bash cross/build.sh setup      # install the toolchain only (Debian packages, needs root)
#
# Prints the path of the stripped binary. Profile `device` (Cargo.toml): fat LTO, one codegen
# unit, stripped, panic=abort. Feature `agent` only (no sink dependencies on the device).
#
# Toolchain: Debian's rustc-web 1.96 and its target standard library (rustup cannot be relied on
# for extra targets here), gcc cross compilers, qemu-user for running the result. librdkafka's
# own (mklove) build ignores CC_<target>, so plain CC/CXX/AR point at the cross tools and
# HOST_CC/HOST_CXX/HOST_AR at the native ones. armv7's std is built from rust-web-src with
# -Zbuild-std (the armhf std package is not installable next to arm64's).
# Users with Docker can use `cross build --target ...` instead (see Cross.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
ARCH="${1:?usage: $0 aarch64|armv7|setup}"

setup() {
  local need=()
  command -v aarch64-linux-gnu-gcc >/dev/null || need+=(gcc-aarch64-linux-gnu g++-aarch64-linux-gnu libc6-dev-arm64-cross)
  command -v arm-linux-gnueabihf-gcc >/dev/null || need+=(gcc-arm-linux-gnueabihf g++-arm-linux-gnueabihf)
  [ -x /usr/bin/rustc ] && /usr/bin/rustc --version | grep -q '^rustc 1\.9[6-9]' || need+=(rustc-web cargo-web)
  [ -d /usr/lib/rustlib/aarch64-unknown-linux-gnu ] || need+=(libstd-rust-web-dev:arm64)
  [ -d /usr/lib/rustlib/src/rust/library ] || need+=(rust-web-src)
  command -v qemu-aarch64-static >/dev/null || need+=(qemu-user-static)
  command -v cmake >/dev/null || need+=(cmake)
  command -v clang >/dev/null || need+=(clang libclang-dev)
  if [ ${#need[@]} -gt 0 ]; then
    echo "installing: ${need[*]}" >&2
    dpkg --add-architecture arm64
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >&2
  fi
}

setup
[ "$ARCH" = setup ] && exit 0

export CARGO_TARGET_DIR="${CROSS_TARGET_DIR:-$HOME/.cache/edge-vision/cross-target}"
export RUSTC=/usr/bin/rustc
export HOST_CC=gcc HOST_CXX=g++ HOST_AR=ar
CARGO=/usr/bin/cargo
case "$ARCH" in
  aarch64)
    TARGET=aarch64-unknown-linux-gnu
    export CC=aarch64-linux-gnu-gcc CXX=aarch64-linux-gnu-g++ AR=aarch64-linux-gnu-ar
    export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
    EXTRA=()
    ;;
  armv7)
    TARGET=armv7-unknown-linux-gnueabihf
    export CC=arm-linux-gnueabihf-gcc CXX=arm-linux-gnueabihf-g++ AR=arm-linux-gnueabihf-ar
    export CARGO_TARGET_ARMV7_UNKNOWN_LINUX_GNUEABIHF_LINKER=arm-linux-gnueabihf-gcc
    export RUSTC_BOOTSTRAP=1
    EXTRA=(-Zbuild-std=std,panic_abort)
    ;;
  *) echo "unknown architecture $ARCH (aarch64 or armv7)" >&2; exit 2 ;;
esac
"$CARGO" build --locked --profile device --target "$TARGET" --no-default-features --features agent \
  --bin edge-agent "${EXTRA[@]}" >&2
echo "$CARGO_TARGET_DIR/$TARGET/device/edge-agent"
