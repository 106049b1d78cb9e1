#!/usr/bin/env bash
# Debian package of edge-agent for one architecture (see docs/deploy.md):
#
#   bash scripts/package.sh amd64|arm64|armhf      # prints the .deb's path
#
# amd64 is built natively (release profile with `device` settings); arm64/armhf come from
# cross/build.sh. cargo-deb (installed into ~/.cache/edge-vision/tools by scripts/test.sh)
# packs the binary, unit, the agent's sysusers/tmpfiles, default config (conffile), model
# manifest and docs; the package depends on systemd (see Cargo.toml). tests/package.rs installs,
# upgrades, removes and purges it on a bare Debian 12 root. The sink has no package: see
# docs/deploy.md ("The sink") for its install steps.
set -euo pipefail
cd "$(dirname "$0")/.."
ARCH="${1:?usage: $0 amd64|arm64|armhf}"
# The native build needs clang/libclang (V4L2 bindings) and a C toolchain; cross/build.sh setup
# installs its own.
[ "$ARCH" != amd64 ] || bash scripts/deps.sh build >&2
TOOLS="${EDGE_VISION_CACHE:-$HOME/.cache/edge-vision}/tools"
[ -x "$TOOLS/bin/cargo-deb" ] || cargo install cargo-deb --version 3.8.0 --locked --root "$TOOLS" >&2
OUT="${PACKAGE_DIR:-$PWD/target/debian}"
mkdir -p "$OUT"
case "$ARCH" in
  amd64)
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/edge-vision/target}"
    cargo build --locked --profile device --no-default-features --features agent --bin edge-agent >&2
    "$TOOLS/bin/cargo-deb" --no-build --profile device -o "$OUT" >&2 ;;
  arm64)
    bash cross/build.sh aarch64 >/dev/null
    CARGO_TARGET_DIR="${CROSS_TARGET_DIR:-$HOME/.cache/edge-vision/cross-target}" \
      "$TOOLS/bin/cargo-deb" --no-build --no-strip --profile device --target aarch64-unknown-linux-gnu -o "$OUT" >&2 ;;
  armhf)
    bash cross/build.sh armv7 >/dev/null
    CARGO_TARGET_DIR="${CROSS_TARGET_DIR:-$HOME/.cache/edge-vision/cross-target}" \
      "$TOOLS/bin/cargo-deb" --no-build --no-strip --profile device --variant armhf \
      --target armv7-unknown-linux-gnueabihf -o "$OUT" >&2 ;;
  *) echo "unknown architecture $ARCH" >&2; exit 2 ;;
esac
ls -t "$OUT"/edge-agent*_"$ARCH".deb | head -1
