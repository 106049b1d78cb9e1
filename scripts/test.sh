#!/usr/bin/env bash
# The whole test suite, on a fresh machine: fetches the real model and photos (pinned, into a
# cache outside the clone), checks formatting and lints, checks that the agent and the sink
# build without each other's dependencies, runs every test, and builds the benches.
#
# First run on a bare 2-core machine: roughly 1.5-2 h, most of it compiling (the broker ~15 min,
# cargo-deb ~4 min, the cross toolchain's packages ~3 min, clippy + checks + benches + tests of
# this crate ~60 min); later runs only rebuild what changed. Every step announces itself, with
# its first-run cost where it is long.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/edge-vision/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

step() { echo; echo "==> $*"; }

step "system packages (scripts/deps.sh test: clang/libclang, gcc, PostgreSQL, Python/pip, curl, patch, openssl, systemd, debootstrap; first run: ~2-5 min)"
bash scripts/deps.sh test

step "toolchain: $(cargo --version), $(rustc --version)"
rustup component add rustfmt clippy >/dev/null 2>&1 || true

step "fixtures (real weights and photos; first run: ~1 min)"
EDGE_VISION_FIXTURES="$(bash scripts/fetch-fixtures.sh)"
export EDGE_VISION_FIXTURES

step "Kafka-protocol broker for the test rig (tansu + scripts/tansu fixes, cached outside the clone; first run: ~15 min)"
TANSU="$(bash scripts/broker.sh install)"
export TANSU

step "packaging and device tools (cargo-deb ~4 min and the cross toolchain ~3 min, first run only)"
TOOLS="${EDGE_VISION_CACHE:-$HOME/.cache/edge-vision}/tools"
[ -x "$TOOLS/bin/cargo-deb" ] || cargo install cargo-deb --version 3.8.0 --locked --root "$TOOLS"
bash cross/build.sh setup

step "bare Debian 12 root for the bare-machine and package tests (scripts/chroot.sh; first run: ~1-2 min debootstrap)"
bash scripts/chroot.sh tarball

step "PostgreSQL on 127.0.0.1:5432 (the sink's tests)"
bash scripts/postgres.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --release --all-targets -- -D warnings

step "cargo doc with warnings denied (the layout maps in the module docs link to real items)"
RUSTDOCFLAGS="-D warnings" cargo doc --release --no-deps --lib

step "feature split: agent without sink deps, sink without agent deps"
cargo check --release --no-default-features --features agent --bin edge-agent
cargo check --release --no-default-features --features sink --bin edge-sink

step "benches build (first run: the release build of every dependency, ~15 min)"
cargo bench --no-run

step "cargo test --release (first run: builds the test binaries, ~10-15 min; tests/package.rs runs apt on bare Debian 12 roots, ~1.5 min)"
LOG="$(mktemp)"
trap 'rm -f "$LOG"' EXIT
set +e
cargo test --release 2>&1 | tee "$LOG"
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole suite (unit, integration and doc tests together).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) s += $i } }
     END { printf "\nsuite: %d passed, %d failed, %d skipped\n", p, f, s }' "$LOG"
exit "$status"
