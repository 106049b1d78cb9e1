#!/usr/bin/env bash
# The whole test suite, on a fresh machine: fetches the real model and photos (pinned, into a
# cache outside the clone), checks formatting and lints, checks that the agent and the sink
# build without each other's dependencies, runs every test, and builds the benches.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/edge-vision/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

step() { echo; echo "==> $*"; }

step "toolchain: $(cargo --version), $(rustc --version)"
rustup component add rustfmt clippy >/dev/null 2>&1 || true
command -v python3 >/dev/null || { apt-get update -qq && apt-get install -y -qq python3 python3-pip; }

step "fixtures (real weights and photos)"
EDGE_VISION_FIXTURES="$(bash scripts/fetch-fixtures.sh)"
export EDGE_VISION_FIXTURES

step "Kafka-protocol broker for the test rig (tansu + scripts/tansu fixes, cached outside the clone)"
command -v patch >/dev/null && command -v curl >/dev/null || { apt-get update -qq && apt-get install -y -qq patch curl; }
command -v openssl >/dev/null || { apt-get update -qq && apt-get install -y -qq openssl; }  # test CA for TLS to PostgreSQL
TANSU="$(bash scripts/broker.sh install)"
export TANSU

step "packaging and device tools (cargo-deb, cross toolchain for aarch64/armv7, systemd-analyze)"
TOOLS="${EDGE_VISION_CACHE:-$HOME/.cache/edge-vision}/tools"
[ -x "$TOOLS/bin/cargo-deb" ] || cargo install cargo-deb --version 3.8.0 --locked --root "$TOOLS"
bash cross/build.sh setup
command -v systemd-analyze >/dev/null || { apt-get update -qq && apt-get install -y -qq systemd; }
command -v clang >/dev/null || { apt-get update -qq && apt-get install -y -qq clang libclang-dev; }

step "PostgreSQL on 127.0.0.1:5432 (the sink's tests)"
bash scripts/postgres.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --release --all-targets -- -D warnings

step "feature split: agent without sink deps, sink without agent deps"
cargo check --release --no-default-features --features agent --bin edge-agent
cargo check --release --no-default-features --features sink --bin edge-sink

step "benches build"
cargo bench --no-run --quiet

step "cargo test --release"
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
